"""The CUDA engine: kernels and the file -> GPU pipeline against the CPU engine and the plain-torch
reference. Tests that need a GPU skip with a reason when none is visible; the build/boundary tests
run everywhere."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

import fastsoup  # noqa: E402
from fastsoup import _core, _reference, _torch  # noqa: E402
from fastsoup import engine as engine_mod  # noqa: E402

from conftest import bits_equal  # noqa: E402

HAS_GPU = bool(_core.cuda_compiled) and _core.cuda_device_count() > 0 and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible (the CUDA engine is compile-checked only)")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI


# --- everywhere -------------------------------------------------------------------------------------


def test_native_info_reports_cuda():
    info = fastsoup.native_info()
    assert info["cuda_compiled"] == bool(_core.cuda_compiled)
    assert info["cuda_available"] == (bool(_core.cuda_compiled) and _core.cuda_device_count() > 0)
    assert info["cuda_devices"] == _core.cuda_device_count()


@pytest.mark.skipif(HAS_GPU, reason="checks the errors of a machine without a GPU")
def test_cuda_device_without_gpu_is_a_clear_error(tmp_path):
    sd = {"w": torch.ones(4)}
    with pytest.raises(ValueError, match="cuda"):
        fastsoup.average([sd, sd], device="cuda")
    with pytest.raises(ValueError, match="cuda"):
        fastsoup.Soup.like(sd, device="cuda:0")


def test_bad_device_strings():
    sd = {"w": torch.ones(4)}
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(ValueError, match="device="):
            fastsoup.average([sd, sd], device=bad)


@pytest.mark.skipif(not _core.cuda_compiled, reason="this build has no CUDA")
def test_cuda_entry_points_exist_in_a_cuda_build():
    for name in ("weighted_sum_cuda", "multi_dot_cuda", "gram_cuda", "release_cuda_buffers", "cuda_device_count"):
        assert callable(getattr(_core, name))
    assert callable(_core.MergePlan.run_cuda)


def test_cpu_merge_refuses_device_inputs():
    segs = engine_mod.Segments(1)
    out = torch.empty(8)
    src = torch.ones(8)
    segs.weighted(8, -1, out.data_ptr(), 2, [(src.data_ptr(), 2, 2)])
    with pytest.raises(ValueError, match="device"):
        segs.run([1.0])


# --- on a GPU ---------------------------------------------------------------------------------------


def _rand(n, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3).to(dtype).to(device)


@needs_gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: "out-" + DT_IDS[d])
@pytest.mark.parametrize("in_dtype", DTYPES + [torch.float64], ids=lambda d: "in-" + DT_IDS[d])
@pytest.mark.parametrize("n", [0, 1, 7, 4097, 100_003])
@pytest.mark.parametrize("k", [1, 3, 17, 33])
def test_weighted_sum_matches_reference(in_dtype, out_dtype, n, k):
    xs = [_rand(n, in_dtype, s) for s in range(k)]
    ws = [0.5 - 0.1 * i for i in range(k)]
    got = _torch.weighted_sum(xs, ws, dtype=out_dtype)
    torch.cuda.synchronize()
    want = _reference.weighted_sum([x.cpu() for x in xs], ws, out_dtype)
    assert bits_equal(got.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_weighted_sum_unaligned_views(offset):
    base = [_rand(10_000, torch.float16, s) for s in range(3)]
    xs = [b[offset:] for b in base]  # not 16-byte aligned: the scalar path
    got = _torch.weighted_sum(xs, [1.0, 2.0, -1.0], dtype=torch.float16)
    torch.cuda.synchronize()
    want = _reference.weighted_sum([x.cpu() for x in xs], [1.0, 2.0, -1.0], torch.float16)
    assert bits_equal(got.cpu(), want)


@needs_gpu
def test_weighted_sum_accumulate_and_cpu_equality():
    xs = [_rand(5000, torch.bfloat16, s) for s in range(4)]
    acc = _rand(5000, torch.float32, 9)
    start = acc.clone()
    _torch.weighted_sum(xs, [0.25] * 4, out=acc, accumulate=True)
    torch.cuda.synchronize()
    want = _reference.weighted_sum([x.cpu() for x in xs], [0.25] * 4, torch.float32, accumulate_into=start.cpu())
    assert bits_equal(acc.cpu(), want)
    cpu = _torch.weighted_sum([x.cpu() for x in xs], [0.25] * 4, out=start.cpu().clone(), accumulate=True)
    assert bits_equal(acc.cpu(), cpu)


@needs_gpu
@pytest.mark.parametrize("n", [1, 4096, 4097, 1_000_001])
def test_multi_dot_and_gram(n):
    xs = [_rand(n, d, s) for s, d in enumerate([torch.float16, torch.bfloat16, torch.float32])]
    g = _rand(n, torch.float32, 7)
    got = _torch.multi_dot(xs, g)
    again = _torch.multi_dot(xs, g)
    assert torch.equal(got, again)  # deterministic
    want = torch.stack([(x.double() * g.double()).sum().cpu() for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * n)
    gram = _torch.gram(xs)
    want_g = torch.stack([torch.stack([(a.double() * b.double()).sum() for b in xs]) for a in xs]).cpu()
    torch.testing.assert_close(gram, want_g, rtol=1e-5, atol=1e-6 * n)
    assert torch.equal(gram, gram.T)


def _zoo(tmp_path, k, dtype, shards=False):
    paths, sds = [], []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        sd = {"a.weight": torch.randn(301, 77, generator=g).to(dtype), "a.bias": torch.randn(77, generator=g).to(dtype),
              "b.weight": torch.randn(1000, 33, generator=g).to(dtype), "steps": torch.tensor(5 + i),
              "empty": torch.empty(0, dtype=dtype)}
        path = tmp_path / (f"m{i}" if shards else f"m{i}.safetensors")
        fastsoup.save(sd, str(path), shard_size=60_000 if shards else None)
        paths.append(str(path))
        sds.append(sd)
    return paths, sds


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("ring", ["default", "tiny"])
def test_average_on_cuda_equals_cpu(tmp_path, dtype, ring, monkeypatch):
    if ring == "tiny":  # many steps through a ring of 2 small slots
        monkeypatch.setattr(engine_mod.plan, "SLOT_BYTES", 8192)
        monkeypatch.setattr(engine_mod.plan, "NSLOTS", 2)
    paths, _ = _zoo(tmp_path, 5, dtype, shards=True)
    cpu = fastsoup.average(paths)
    gpu = fastsoup.average(paths, device="cuda")
    for name, t in cpu.items():
        assert gpu[name].device.type == "cuda"
        assert bits_equal(gpu[name].cpu(), t), name
    out_cpu = fastsoup.average(paths, out=str(tmp_path / "cpu"))
    out_gpu = fastsoup.average(paths, out=str(tmp_path / "gpu"), device="cuda")
    for f in sorted(os.listdir(out_cpu)):
        assert (tmp_path / "cpu" / f).read_bytes() == (tmp_path / "gpu" / f).read_bytes(), f


@needs_gpu
def test_inputs_already_on_the_gpu_are_read_in_place(tmp_path):
    paths, sds = _zoo(tmp_path, 3, torch.float16)
    mixed = [paths[0], {k: v.cuda() for k, v in sds[1].items()}, sds[2]]
    got = fastsoup.average(mixed, device="cuda")
    want = fastsoup.average(paths)
    for name, t in want.items():
        assert bits_equal(got[name].cpu(), t), name


@needs_gpu
def test_soup_on_cuda_matches_cpu_soup(tmp_path):
    paths, _ = _zoo(tmp_path, 4, torch.bfloat16)
    first = fastsoup.open_checkpoint(paths[0])
    model_sd = {}
    for name in first:
        t = first.tensor(name)
        model_sd[name] = (t.float() if t.is_floating_point() else t).cuda()
    holder = _Holder(model_sd)
    gpu = fastsoup.Soup.like(paths[0], device="cuda").add(paths[0]).add(paths[1])
    cpu = fastsoup.Soup.like(paths[0]).add(paths[0]).add(paths[1])
    gpu.candidate(paths[2], holder)
    cpu_holder = _Holder({k: v.cpu().clone() for k, v in model_sd.items()})
    cpu.candidate(paths[2], cpu_holder)
    for name in model_sd:
        assert bits_equal(holder.sd[name].cpu(), cpu_holder.sd[name]), name
    gpu.accept()
    cpu.accept()
    for name, t in cpu.value().items():
        assert bits_equal(gpu.value()[name].cpu(), t), name


class _Holder:
    """A stand-in module: a state dict of tensors written in place."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self, keep_vars=False):
        return self.sd

    def parameters(self):
        return iter(self.sd.values())


@needs_gpu
def test_greedy_soup_on_gpu_equals_cpu(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    init = nn.Linear(10, 3).state_dict()
    x = torch.randn(400, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    paths = []
    for i, lr in enumerate([0.05, 0.1, 0.2, 3.0]):
        m = nn.Linear(10, 3)
        m.load_state_dict(init)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        p = str(tmp_path / f"ft{i}.safetensors")
        fastsoup.save({k: v.detach().contiguous() for k, v in m.state_dict().items()}, p)
        paths.append(p)
    held = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 400, 64)]
    cpu = fastsoup.greedy_soup(paths, nn.Linear(10, 3), held)
    gpu = fastsoup.greedy_soup(paths, nn.Linear(10, 3).cuda(), held)
    assert gpu.indices == cpu.indices
    assert gpu.score == cpu.score


@needs_gpu
@pytest.mark.parametrize("out_name", ["soup.safetensors", None])
def test_an_input_truncated_under_the_cuda_pipeline_is_an_error(tmp_path, out_name):
    # The fill threads copy the mapped inputs into the pinned slots: a truncated input reads zeros
    # there (the SIGBUS guard), which the executor refuses at the step, naming the file.
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import save_file

    paths = []
    for i in range(3):
        p = str(tmp_path / f"m{i}.safetensors")
        save_file({"w": torch.randn(1 << 22, generator=torch.Generator().manual_seed(i))}, p)
        paths.append(p)
    out = str(tmp_path / out_name) if out_name else None
    code = textwrap.dedent(f"""
        import os, sys, fastsoup, fastsoup.engine as engine
        real = engine.Segments.run
        def run(self, *a, **k):
            os.truncate({paths[1]!r}, 4096)
            return real(self, *a, **k)
        engine.Segments.run = run
        try:
            fastsoup.average({paths!r}, out={out!r}, device="cuda")
        except fastsoup.InputChangedError as e:
            print("refused:", e)
            sys.exit(0)
        sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and paths[1] in r.stdout, (r.returncode, r.stderr[-2000:])
    if out is not None:
        assert not os.path.exists(out)


# --- merge methods on the GPU ----------------------------------------------------------------------

SPARSE_METHODS = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties"]


def _sparse_kw(method, density, gamma=0.05, rescale="default"):
    kw = {}
    if method != "task_arithmetic":
        kw["density"] = density
    if method.startswith("breadcrumbs"):
        kw["gamma"] = gamma
    if method.startswith("dare"):
        kw.update(seed=11, name="model.layers.2.mlp.down_proj.weight")
    if rescale != "default":
        kw["rescale"] = rescale
    return kw


def _sparse_data(n, k, dtype, seed, ties):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    models = []
    for j in range(k):
        d = (torch.randint(-2, 3, (n,), generator=g).float() * 0.25 if ties
             else torch.randn(n, generator=g) * (0.01 * (j + 1)))
        models.append((base.float() + d).to(dtype))
    return base, models


@pytest.mark.skipif(not _core.cuda_compiled, reason="this build has no CUDA")
def test_sparse_merge_cuda_entry_point_exists():
    assert callable(_core.sparse_merge_cuda)


@pytest.mark.skipif(HAS_GPU, reason="checks the errors of a machine without a GPU")
def test_merge_methods_on_cuda_without_gpu_are_a_clear_error():
    sd = {"w": torch.ones(4)}
    with pytest.raises(ValueError, match="cuda"):
        fastsoup.merge([sd, sd], "ties", base=sd, density=0.5, device="cuda")


@needs_gpu
@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("n,k,ties", [(1, 2, False), (4097, 3, True), (100_003, 5, False), (70_001, 17, True)])
@pytest.mark.parametrize("rescale", ["default", "l1", None])
def test_sparse_merge_cuda_is_the_cpu_kernel(method, dtype, n, k, ties, rescale):
    """Host tensors and device tensors, every method, ties at the threshold: the CPU kernel's bits."""
    from fastsoup.methods.native import sparse_merge

    if method == "task_arithmetic" and rescale is not None and rescale != "default":
        pytest.skip("task_arithmetic takes no rescale")
    base, models = _sparse_data(n, k, dtype, seed=n + k, ties=ties)
    weights = [(-1.0) ** j * (0.5 + j / 8) for j in range(k)]
    kw = _sparse_kw(method, [j / (k - 1) for j in range(k)] if k > 2 else 0.4, rescale=rescale)
    want = torch.empty(n, dtype=dtype)
    sparse_merge(method, base, models, want, weights=weights, **kw)
    got = torch.empty(n, dtype=dtype)
    sparse_merge(method, base, models, got, weights=weights, device=0, **kw)  # host memory, copied in
    assert bits_equal(got, want)
    dev = torch.empty(n, dtype=dtype, device="cuda")
    sparse_merge(method, base.cuda(), [m.cuda() for m in models], dev, weights=weights, device=0,
                 stream=_torch.cuda_stream(0), **kw)
    torch.cuda.synchronize()
    assert bits_equal(dev.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "slerp", "model_stock",
                                    "linear"])
def test_merge_methods_on_cuda_equal_cpu(tmp_path, method):
    paths, _ = _zoo(tmp_path, 4, torch.float16, shards=True)
    base, models = paths[0], paths[1:]
    kw = {"slerp": {"t": 0.3}, "ties": {"density": 0.4}, "dare_ties": {"density": 0.4, "seed": 3},
          "breadcrumbs": {"density": 0.5, "gamma": 0.05}}.get(method, {})
    if method == "slerp":
        args = (models[:2], method)
    elif method == "linear":
        args = (models, method)
    else:
        args = (models, method)
        kw["base"] = base
    cpu = fastsoup.merge(*args, **kw)
    gpu = fastsoup.merge(*args, device="cuda", **kw)
    for name, t in cpu.items():
        assert gpu[name].device.type == "cuda", name
        assert bits_equal(gpu[name].cpu(), t), name
    out_cpu = fastsoup.merge(*args, out=str(tmp_path / "cpu"), **kw)
    fastsoup.merge(*args, out=str(tmp_path / "gpu"), device="cuda", **kw)
    for f in sorted(os.listdir(out_cpu)):
        assert (tmp_path / "cpu" / f).read_bytes() == (tmp_path / "gpu" / f).read_bytes(), f
