"""torch.ops.fastsoup.weighted_sum and torch.ops.fastsoup.multi_dot (registered by fastsoup._torch)
against the plain-torch reference (fastsoup/_reference.py), through torch.library.opcheck, under
torch.compile and on meta tensors. CUDA tests skip without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from fastsoup import _core, _reference, _torch  # noqa: E402  (importing _torch registers the ops)

from conftest import bits_equal  # noqa: E402

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of hanging CI
HAS_GPU = bool(_core.cuda_compiled) and _core.cuda_device_count() > 0 and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible (the CUDA kernels are compile-checked only)")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
SIZES = [0, 1, 7, 1023, 4097]
weighted_sum = torch.ops.fastsoup.weighted_sum
multi_dot = torch.ops.fastsoup.multi_dot


def _rand(n, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)


def _weights(k, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return [float(w) for w in torch.rand(k, generator=g, dtype=torch.float64) * 4 - 2]  # negative ones too


# --- against the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", range(1, 10))
def test_weighted_sum_matches_reference_bitwise(dtype, n, k):
    xs = [_rand(n, dtype, seed=n + 10 * i) for i in range(k)]
    ws = _weights(k, n + k)
    got = weighted_sum(xs, ws, None)
    assert bits_equal(got, _reference.weighted_sum(xs, ws, dtype))
    assert bits_equal(got, _torch.weighted_sum(xs, ws))  # the same kernel as the tensor-level entry point


@pytest.mark.parametrize("out_dtype", DTYPES + [torch.float64], ids=lambda d: "out-" + DT_IDS[d])
def test_weighted_sum_of_mixed_dtypes_and_shapes(out_dtype):
    xs = [_rand(35, d, seed=i).reshape(shape) for i, (d, shape) in
          enumerate([(torch.float16, (5, 7)), (torch.bfloat16, (35,)), (torch.float32, (7, 5)), (torch.float64, (35, 1))])]
    ws = [0.5, -1.25, 2.0, 1 / 3]
    got = weighted_sum(xs, ws, out_dtype)
    assert got.shape == (5, 7) and got.dtype == out_dtype and got.device.type == "cpu"  # shaped like inputs[0]
    assert bits_equal(got, _reference.weighted_sum([x.reshape(5, 7) for x in xs], ws, out_dtype))


def test_weighted_sum_of_empty_tensors():
    xs = [torch.empty(0, 5, dtype=torch.float16), torch.empty(0, dtype=torch.float32)]
    got = weighted_sum(xs, [1.0, -2.0], torch.bfloat16)
    assert got.shape == (0, 5) and got.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_multi_dot_matches_reference(dtype, n, k):
    xs = [_rand(n, dtype, seed=n + 10 * i) for i in range(k)]
    g = _rand(n, dtype, seed=99)
    got = multi_dot(xs, g)
    assert got.shape == (k,) and got.dtype == torch.float64
    assert torch.equal(got, _torch.multi_dot(xs, g))  # the native result, as the entry point returns it
    ref = _reference.multi_dot(xs, g)
    scale = torch.stack([(x.double().abs() * g.double().abs()).sum() for x in xs]) + 1e-30
    assert torch.all((got - ref).abs() <= 1e-6 * scale), (got, ref)


def test_multi_dot_of_no_inputs_and_empty_tensors():
    assert multi_dot([], torch.randn(4)).shape == (0,)
    got = multi_dot([torch.empty(0, 3), torch.empty(0, dtype=torch.float16)], torch.empty(0))
    assert torch.equal(got, torch.zeros(2, dtype=torch.float64))


# --- the boundary ---------------------------------------------------------------------------------


def test_bad_operands_are_clear_errors():
    a, b = torch.randn(10), torch.randn(11)
    with pytest.raises(ValueError, match=r"fastsoup::weighted_sum: no inputs: pass at least one tensor"):
        weighted_sum([], [], None)
    with pytest.raises(ValueError, match=r"weighted_sum: got 2 inputs and 1 weights: pass one weight per input"):
        weighted_sum([a, a], [1.0], None)
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[1\] has 11 elements, inputs\[0\] 10: pass tensors"):
        weighted_sum([a, b], [1.0, 1.0], None)
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[0\] is not contiguous; pass t.contiguous\(\)"):
        weighted_sum([torch.randn(4, 4).T], [1.0], None)
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[0\] has dtype int64, expected float16, bfloat16"):
        weighted_sum([torch.arange(10)], [1.0], None)
    with pytest.raises(ValueError, match=r"weighted_sum: out_dtype is int32, expected float16"):
        weighted_sum([a], [1.0], torch.int32)
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[1\] is on meta, the other operands on cpu: put them"):
        weighted_sum([a, torch.empty(10, device="meta")], [1.0, 1.0], None)
    with pytest.raises(ValueError, match=r"multi_dot: inputs\[0\] has 11 elements, g 10: pass tensors of one size"):
        multi_dot([b], a)
    with pytest.raises(ValueError, match=r"multi_dot: g has dtype int64"):
        multi_dot([a], torch.arange(10))
    with pytest.raises(ValueError, match=r"multi_dot: g is not contiguous"):
        multi_dot([torch.randn(16)], torch.randn(4, 4).T)
    with pytest.raises(ValueError, match=r"multi_dot: inputs\[0\] is on cpu, the other operands on meta"):
        multi_dot([a], torch.empty(10, device="meta"))


def test_ops_are_registered_only_by_the_torch_module():
    code = ("import sys, torch, fastsoup\n"
            "before = hasattr(torch.ops.fastsoup, 'weighted_sum') or hasattr(torch.ops.fastsoup, 'multi_dot')\n"
            "import fastsoup._torch\n"
            "print(before, hasattr(torch.ops.fastsoup, 'weighted_sum'), hasattr(torch.ops.fastsoup, 'multi_dot'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True"]


# --- torch.library, torch.compile, meta tensors, autograd -------------------------------------------


def _operands(requires_grad=False):
    xs = [_rand(33, d, seed=i).reshape(shape) for i, (d, shape) in
          enumerate([(torch.float32, (3, 11)), (torch.float16, (33,)), (torch.bfloat16, (11, 3))])]
    g = _rand(33, torch.float32, seed=7)
    if requires_grad:
        xs = [x.requires_grad_() for x in xs]
        g.requires_grad_()
    return xs, g


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "grad"])
def test_opcheck(requires_grad):
    xs, g = _operands(requires_grad)
    torch.library.opcheck(weighted_sum, (xs, [0.5, -2.0, 1.5], None))
    torch.library.opcheck(weighted_sum, (xs, [0.5, -2.0, 1.5], torch.float32))
    torch.library.opcheck(multi_dot, (xs, g))


def test_torch_compile_traces_through_the_ops():
    def f(a, b, g):
        s = weighted_sum([a, b], [0.25, -0.75], torch.float32)
        return s * 2, multi_dot([a, b, s], g)

    a, b, g = _rand(77, torch.bfloat16, 1).reshape(7, 11), _rand(77, torch.float16, 2), _rand(77, torch.float32, 3)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(a, b, g), f(a, b, g)):
        assert bits_equal(got, want)


def test_meta_tensors_give_shape_dtype_and_device():
    xs = [torch.empty(4, 6, device="meta", dtype=torch.float16), torch.empty(24, device="meta", dtype=torch.bfloat16)]
    s = weighted_sum(xs, [1.0, 2.0], None)
    assert (s.shape, s.dtype, s.device.type) == ((4, 6), torch.float16, "meta")
    s = weighted_sum(xs, [1.0, 2.0], torch.float32)
    assert (s.shape, s.dtype, s.device.type) == ((4, 6), torch.float32, "meta")
    d = multi_dot(xs, torch.empty(2, 12, device="meta"))
    assert (d.shape, d.dtype, d.device.type) == ((2,), torch.float64, "meta")


def test_weighted_sum_gradients():
    xs = [_rand(12, torch.float64, seed=i).requires_grad_() for i in range(3)]
    assert torch.autograd.gradcheck(lambda *t: weighted_sum(list(t), [0.5, -2.0, 3.0], None), xs)
    hs = [x.detach().half().requires_grad_() for x in xs]
    weighted_sum(hs, [0.5, -2.0, 3.0], torch.float32).sum().backward()
    for h, w in zip(hs, [0.5, -2.0, 3.0]):
        assert h.grad.dtype == torch.float16 and torch.equal(h.grad, torch.full((12,), w, dtype=torch.float16))


def test_multi_dot_gradients():
    xs, g = _operands(requires_grad=True)
    grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    multi_dot(xs, g).backward(grad)
    rx = [x.detach().double().reshape(-1).requires_grad_() for x in xs]
    rg = g.detach().double().requires_grad_()
    torch.stack([(x * rg).sum() for x in rx]).backward(grad)
    for x, r in zip(xs, rx):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert torch.equal(x.grad, r.grad.to(x.dtype).reshape(x.shape))
    torch.testing.assert_close(g.grad, rg.grad.float(), rtol=1e-6, atol=1e-6)


# --- CUDA ------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 3, 9])
def test_cuda_ops_match_the_cpu_ops(dtype, n, k):
    xs = [_rand(n, dtype, seed=n + 10 * i) for i in range(k)]
    ws = _weights(k, n + k)
    g = _rand(n, torch.float32, seed=99)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the kernels run on the current stream, not the default one
        dx, dg = [x.cuda() for x in xs], g.cuda()
        got = weighted_sum(dx, ws, None)
        dots = multi_dot(dx, dg)
    stream.synchronize()
    assert got.device == dx[0].device and dots.device == dg.device
    assert bits_equal(got.cpu(), weighted_sum(xs, ws, None))
    torch.testing.assert_close(dots.cpu(), multi_dot(xs, g), rtol=1e-5, atol=1e-6 * max(n, 1))


@needs_gpu
def test_cuda_opcheck_and_compile():
    xs, g = _operands()
    xs, g = [x.cuda() for x in xs], g.cuda()
    torch.library.opcheck(weighted_sum, (xs, [0.5, -2.0, 1.5], None))
    torch.library.opcheck(multi_dot, (xs, g))
    f = torch.compile(lambda a, b: weighted_sum([a, b], [0.5, 0.5], None), backend="aot_eager", fullgraph=True)
    assert bits_equal(f(xs[0], xs[2].reshape(3, 11)).cpu(), weighted_sum([xs[0].cpu(), xs[2].cpu()], [0.5, 0.5], None))
