"""fastsoup.average / weighted_sum against the plain-torch reference, over dtypes, K, weights,
file layouts and sources; the CLI; and the torch-free merge path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsoup
from fastsoup import _reference, engine
from conftest import bits_equal

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI


def make_state_dicts(k, dtypes=(torch.float16,), seed=0, int_buffer=True):
    g = torch.Generator().manual_seed(seed)
    sds = []
    for i in range(k):
        dt = dtypes[i % len(dtypes)]
        sd = {
            "embed.weight": torch.randn(97, 33, generator=g).to(dt),
            "blocks.0.attn.qkv.weight": torch.randn(99, 33, generator=g).to(dt),
            "blocks.0.attn.qkv.bias": torch.randn(99, generator=g).to(dt),
            "blocks.0.norm.weight": (1 + 0.1 * torch.randn(33, generator=g)).to(dt),
            "scalar": torch.randn((), generator=g).to(dt),
            "empty": torch.zeros(0, 5, dtype=dt),
            "head.weight": torch.randn(10, 33, generator=g).float(),
        }
        if int_buffer:
            sd["bn.num_batches_tracked"] = torch.tensor(100 + i)
            sd["mask"] = torch.rand(7, generator=g) > 0.5
        sds.append(sd)
    return sds


def assert_state_dicts_equal(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert bits_equal(got[name], expected[name]), name


@pytest.fixture
def files(tmp_path):
    def write(sds, fmt="safetensors"):
        paths = []
        for i, sd in enumerate(sds):
            if fmt == "safetensors":
                p = tmp_path / f"m{i}.safetensors"
                save_file(sd, str(p), metadata={"format": "pt"})
            elif fmt == "bin":
                p = tmp_path / f"m{i}.bin"
                torch.save(sd, str(p))
            elif fmt == "sharded":
                p = tmp_path / f"m{i}"
                fastsoup.save(sd, p, shard_size=2000)
            paths.append(str(p))
        return paths

    return write


def file_order(path, sd):
    return {name: sd[name] for name in fastsoup.open_checkpoint(path)}


@pytest.mark.parametrize("dtypes", [(torch.float16,), (torch.bfloat16,), (torch.float32,),
                                    (torch.float16, torch.bfloat16, torch.float32)], ids=["f16", "bf16", "f32", "mixed"])
def test_average_in_memory_matches_reference(dtypes):
    sds = make_state_dicts(5, dtypes)
    got = fastsoup.average(sds)
    assert_state_dicts_equal(got, _reference.average_state_dicts(sds))


@pytest.mark.parametrize("k", [1, 2, 3, 8, 9, 17, 33])
def test_average_any_k_from_files(files, k):
    sds = make_state_dicts(k, (torch.float16, torch.bfloat16), seed=k)
    paths = files(sds)
    got = fastsoup.average(paths)
    expected = _reference.average_state_dicts([file_order(paths[0], sd) for sd in sds])
    assert_state_dicts_equal(got, expected)


@pytest.mark.parametrize("weights", [[1, 2, 3], [0.5, -0.25, 1.0], [-1, -2, -3.5]])
def test_weighted_average(files, weights):
    sds = make_state_dicts(3)
    got = fastsoup.average(files(sds), weights)
    expected = _reference.average_state_dicts(sds, weights)
    for name in got:
        assert bits_equal(got[name], expected[name]), name


def test_weighted_sum_is_not_normalized():
    sds = make_state_dicts(2, (torch.float32,))
    got = fastsoup.weighted_sum(sds, [1.0, -1.0])
    for name, t in sds[0].items():
        if t.is_floating_point():
            assert bits_equal(got[name], _reference.weighted_sum([sds[0][name], sds[1][name]], [1.0, -1.0], t.dtype))
    task_arith = fastsoup.weighted_sum(sds, [0.3, 0.7])
    assert bits_equal(task_arith["embed.weight"],
                      _reference.weighted_sum([sds[0]["embed.weight"], sds[1]["embed.weight"]], [0.3, 0.7], torch.float32))


def test_weights_errors():
    sds = make_state_dicts(2)
    with pytest.raises(ValueError, match="sum to zero"):
        fastsoup.average(sds, [1, -1])
    with pytest.raises(ValueError, match="got 3 weights for 2 ingredients"):
        fastsoup.average(sds, [1, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        fastsoup.average(sds, [1, float("nan")])
    with pytest.raises(fastsoup.CheckpointError, match="no ingredients"):
        fastsoup.average([])


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32", torch.float64])
def test_output_dtype(dtype):
    sds = make_state_dicts(3, (torch.float16, torch.bfloat16))
    got = fastsoup.average(sds, dtype=dtype)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype, dtype)
    expected = _reference.average_state_dicts(sds, dtype=torch_dtype)
    assert_state_dicts_equal(got, expected)
    assert got["bn.num_batches_tracked"].dtype == torch.int64  # not averaged, not cast


def test_non_float_tensors_come_from_the_first_ingredient():
    sds = make_state_dicts(3)
    got = fastsoup.average(sds)
    assert got["bn.num_batches_tracked"].item() == 100
    assert torch.equal(got["mask"], sds[0]["mask"])


def test_mixed_sources(files, tmp_path):
    sds = make_state_dicts(4, (torch.float16, torch.float32))
    st = files(sds[:1])[0]
    binf = str(tmp_path / "b.bin")
    torch.save({"state_dict": sds[1]}, binf)
    sharded = str(tmp_path / "sharded")
    fastsoup.save(sds[2], sharded, shard_size=1500)
    module = torch.nn.Module()
    for name, t in sds[3].items():
        module.register_buffer(name.replace(".", "_"), t)
    ingredients = [st, binf, sharded, {name: t for name, t in sds[3].items()}]
    got = fastsoup.average(ingredients)
    expected = _reference.average_state_dicts([file_order(st, sd) for sd in sds])
    assert_state_dicts_equal(got, expected)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_average_to_file_equals_in_memory(files, tmp_path, fmt):
    sds = make_state_dicts(4, (torch.bfloat16,))
    paths = files(sds, fmt)
    mem = fastsoup.average(paths)
    out = tmp_path / "soup.safetensors"
    assert fastsoup.average(paths, out=out) == os.fspath(out)
    on_disk = load_file(str(out))
    for name in mem:
        assert bits_equal(on_disk[name], mem[name]), name
    assert list(fastsoup.open_checkpoint(out)) == list(mem)


def test_sharded_output_follows_first_ingredient(files, tmp_path):
    sds = make_state_dicts(3)
    paths = files(sds, "sharded")
    first_index = json.load(open(os.path.join(paths[0], "model.safetensors.index.json")))
    out = tmp_path / "soup"
    fastsoup.average(paths, out=out)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert index["weight_map"] == first_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sds[0].values())
    got = fastsoup.open_checkpoint(out)
    expected = _reference.average_state_dicts([file_order(paths[0], sd) for sd in sds])
    for name in expected:
        assert bits_equal(got.tensor(name), expected[name]), name


def test_shard_size_and_dtype_on_output(files, tmp_path):
    sds = make_state_dicts(2)
    out = tmp_path / "soup"
    fastsoup.average(files(sds), out=out, shard_size="3KB", dtype="fp32")
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got = fastsoup.open_checkpoint(out)
    assert got["embed.weight"].dtype == "float32"
    for shard in shards:
        assert os.path.getsize(out / shard) > 0


def test_many_small_steps_and_staging_buffers(files, monkeypatch):
    # Force tiny windows and buffers: tensors split into many steps, buffers flushed often.
    monkeypatch.setattr(engine.plan, "WINDOW_BYTES", 4096)
    monkeypatch.setattr(engine.plan, "BUFFER_BYTES", 8192)
    monkeypatch.setattr(engine.plan, "NBUFFERS", 2)
    sds = make_state_dicts(3, (torch.float16, torch.float32))
    paths = files(sds)
    expected = _reference.average_state_dicts([file_order(paths[0], sd) for sd in sds])
    assert_state_dicts_equal(fastsoup.average(paths), expected)
    out = os.path.join(os.path.dirname(paths[0]), "soup.safetensors")
    fastsoup.average(paths, out=out)
    got = load_file(out)
    for name in expected:
        assert bits_equal(got[name], expected[name]), name


def test_output_may_be_an_input(files):
    sds = make_state_dicts(2)
    paths = files(sds)
    expected = _reference.average_state_dicts([file_order(paths[0], sd) for sd in sds])
    fastsoup.average(paths, out=paths[0], overwrite=True)
    got = load_file(paths[0])
    for name in expected:
        assert bits_equal(got[name], expected[name]), name


def test_existing_output_is_refused_and_untouched(files):
    sds = make_state_dicts(2)
    paths = files(sds)
    before = open(paths[1], "rb").read()
    with pytest.raises(fastsoup.OutputExistsError, match="overwrite"):
        fastsoup.average(paths, out=paths[1])
    assert open(paths[1], "rb").read() == before


def test_failure_mid_merge_leaves_nothing(files, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.plan, "WINDOW_BYTES", 4096)
    paths = files(make_state_dicts(3))
    out = tmp_path / "out" / "soup"
    calls = []

    class Boom(RuntimeError):
        pass

    def bar(progress, total, desc):
        class Bar:
            n = 0

            def update(self, k):
                calls.append(k)
                if len(calls) == 3:
                    raise Boom("injected")

            def close(self):
                pass

        return Bar()

    monkeypatch.setattr(engine.driver, "_progress_bar", bar)
    with pytest.raises(Boom):
        fastsoup.average(paths, out=out, progress=True)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p] == []


def test_incompatible_ingredients_are_refused_before_any_work(files, tmp_path):
    sds = make_state_dicts(2)
    bad = dict(sds[1])
    bad["embed.weight"] = torch.randn(3, 3).half()
    del bad["head.weight"]
    bad["extra"] = torch.zeros(2)
    paths = files([sds[0], bad])
    out = tmp_path / "soup.safetensors"
    with pytest.raises(fastsoup.CheckpointError) as e:
        fastsoup.average(paths, out=out)
    msg = str(e.value)
    assert paths[1] in msg and "'head.weight'" in msg and "'extra'" in msg and "'embed.weight'" in msg
    assert not out.exists()


def test_device_cuda_works_on_a_gpu_and_is_a_clear_error_elsewhere():
    sds = make_state_dicts(2)
    if bool(fastsoup._core.cuda_compiled) and fastsoup._core.cuda_device_count() > 0:
        got = fastsoup.average(sds, device="cuda")
        want = fastsoup.average(sds)
        assert list(got) == list(want)
        for name, t in want.items():
            assert bits_equal(got[name].cpu(), t), name
    else:
        with pytest.raises(ValueError, match="device='cuda'"):
            fastsoup.average(sds, device="cuda")


def test_non_contiguous_and_parameter_tensors():
    lin = [torch.nn.Linear(8, 6) for _ in range(3)]
    sds = [{"w": m.weight.T, "b": m.bias} for m in lin]  # transposed views, parameters
    got = fastsoup.average(sds)
    expected = _reference.average_state_dicts([{k: v.detach().contiguous() for k, v in sd.items()} for sd in sds])
    assert_state_dicts_equal(got, expected)
    got = fastsoup.average(lin)  # modules
    assert torch.allclose(got["weight"], sum(m.weight.detach() for m in lin) / 3, atol=1e-6)


# --- torch-free merge path, CLI ------------------------------------------------------------------------

RUN = [sys.executable, "-m", "fastsoup"]


def run_cli(*args, cwd=None):
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT)


def test_merge_of_safetensors_never_imports_torch(files, tmp_path):
    paths = files(make_state_dicts(3))
    code = (
        "import sys, fastsoup\n"
        f"fastsoup.average({paths!r}, out={str(tmp_path / 'soup')!r})\n"
        "from fastsoup import cli\n"
        f"assert cli.main(['average', *{paths!r}, '-o', {str(tmp_path / 'soup2.safetensors')!r}, '--no-progress']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_cli_average(files, tmp_path):
    sds = make_state_dicts(3)
    paths = files(sds)
    out = tmp_path / "cli_soup"
    r = run_cli("average", *paths, "-o", out, "--weights", 1, 2, 3, "--dtype", "fp32", "--shard-size", "4KB",
                "--threads", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    got = fastsoup.open_checkpoint(out)
    expected = _reference.average_state_dicts([file_order(paths[0], sd) for sd in sds], [1, 2, 3], torch.float32)
    for name in expected:
        assert bits_equal(got.tensor(name), expected[name]), name
    r = run_cli("average", *paths, "-o", out)
    assert r.returncode != 0 and "exists" in r.stderr and "--overwrite" in r.stderr
    r = run_cli("average", *paths, "-o", out, "--overwrite", "--no-progress")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("problem", ["missing", "truncated", "mismatch", "weights"])
def test_cli_errors_are_one_line_and_leave_no_output(files, tmp_path, problem):
    sds = make_state_dicts(2)
    paths = files(sds)
    args = []
    if problem == "missing":
        paths[1] = str(tmp_path / "nope.safetensors")
    elif problem == "truncated":
        data = open(paths[1], "rb").read()
        open(paths[1], "wb").write(data[: len(data) - 100])
    elif problem == "mismatch":
        bad = dict(sds[1])
        bad["embed.weight"] = torch.zeros(2, 2).half()
        save_file(bad, paths[1])
    elif problem == "weights":
        args = ["--weights", "1"]
    out = tmp_path / "soup.safetensors"
    r = run_cli("average", *paths, "-o", out, *args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsoup: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    if problem in ("missing", "truncated", "mismatch"):
        assert paths[1] in lines[0]


def test_cli_info():
    r = run_cli("info")
    assert r.returncode == 0
    assert json.loads(r.stdout)["isa"] in ("scalar", "avx2", "avx512")


def test_import_fails_loudly_without_the_native_core():
    code = (
        "import sys\n"
        "sys.modules['fastsoup._core'] = None  # as if the extension were not built\n"
        "try:\n"
        "    import fastsoup\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert "not built" in r.stdout and "pip install -e" in r.stdout, r.stdout + r.stderr


def test_progress_bar_reports_bytes(files, capsys, monkeypatch):
    monkeypatch.setattr(engine.plan, "WINDOW_BYTES", 4096)
    paths = files(make_state_dicts(3))
    fastsoup.average(paths, progress=True)
    err = capsys.readouterr().err
    assert "average" in err and "B/s" in err
