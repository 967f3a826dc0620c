"""The native kernels against the plain-torch reference (the binary64 order of kernels.h, bit for
bit), on every instruction set of this CPU. tests/test_precision.py checks the results against the
exact mean."""

import math

import pytest
import torch

import fastsoup
from fastsoup import _core, _reference, _torch
from conftest import bits_equal

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [0, 1, 7, 15, 16, 17, 31, 33, 1000, 2047, 2048, 2049, 65537]


def test_native_extension_is_loaded():
    assert _core.__file__.endswith(".so")
    info = fastsoup.native_info()
    assert info["isa"] in ("scalar", "avx2", "avx512")
    assert info["threads"] >= 1
    assert "scalar" in info["supported_isas"]


def _inputs(k, n, dtypes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)]) for i in range(k)]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("in_dtype", DTYPES, ids=lambda d: "in_" + str(d)[6:])
@pytest.mark.parametrize("n", SIZES)
def test_weighted_sum_matches_reference_bitwise(isa, in_dtype, out_dtype, n):
    ts = _inputs(5, n, [in_dtype], seed=n)
    ws = [0.2, -0.7, 1.3, 0.25, 1 / 3]
    got = _torch.weighted_sum(ts, ws, dtype=out_dtype)
    assert bits_equal(got, _reference.weighted_sum(ts, ws, out_dtype))


def _fine_tunes(k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    return [(base + 0.002 * torch.randn(n, generator=g)).to(dtype) for _ in range(k)]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16], ids=lambda d: "in_" + str(d)[6:])
@pytest.mark.parametrize("divisor", [4.0, 5.0, -3.0], ids=lambda d: f"div{d:g}")
@pytest.mark.parametrize("data", ["fine_tunes", "independent"])
def test_weighted_sum_with_a_divisor_matches_reference_bitwise(isa, in_dtype, out_dtype, divisor, data):
    # weights 1 or short, and a divisor: the CPU's binary32 fast path where it is exact
    # (fine-tune-like data), the binary64 order where it is not (independent data); the same bits
    n = 3 * 2048 + 77
    ts = _fine_tunes(5, n, in_dtype, seed=1) if data == "fine_tunes" else _inputs(5, n, [in_dtype], seed=2)
    for ws in ([1.0] * 5, [0.5, 1.0, 1.5, 0.25, 2.0]):
        _core.reset_counters()
        got = _torch.weighted_sum(ts, ws, dtype=out_dtype, divisor=divisor)
        c = _core.counters()
        assert bits_equal(got, _reference.weighted_sum(ts, ws, out_dtype, divisor=divisor)), ws
        if isa != "scalar" and out_dtype != torch.float64 and data == "fine_tunes":
            assert c["fast_blocks"] > 0 and c["fallback_blocks"] == 0, c
        if isa == "scalar" or out_dtype == torch.float64:
            assert c["fast_blocks"] == 0 and c["fallback_blocks"] == 0, c


def test_float64_operands_use_the_compensated_sum(isa):
    # K identical float64 inputs with weights 1 and divisor K: the input itself (a plain float64
    # sum rounds K * x); mixed with float16 inputs the float64 result is the exact sum rounded once
    x = torch.randn(10007, dtype=torch.float64) * 1e3
    for k in (3, 7, 10, 17):
        assert bits_equal(_torch.weighted_sum([x] * k, [1.0] * k, divisor=float(k)), x)
    h = torch.randn(10007).half()
    got = _torch.weighted_sum([x, h, h], [1.0, 1.0, -1.0], dtype=torch.float64)
    assert bits_equal(got, x)
    assert bits_equal(got, _reference.weighted_sum([x, h, h], [1.0, 1.0, -1.0], torch.float64))
    # random weights, divided by their total given as a float64 pair (math.fsum and the rest)
    ts = _inputs(6, 10007, [torch.float64, torch.float32, torch.float16], seed=4)
    ws = [0.1 + 0.9 * float(u) for u in torch.rand(6, dtype=torch.float64)]
    hi = math.fsum(ws)
    lo = math.fsum([*ws, -hi])
    assert lo != 0.0
    for out_dtype in DTYPES:
        got = _torch.weighted_sum(ts, ws, dtype=out_dtype, divisor=hi, divisor_lo=lo)
        assert bits_equal(got, _reference.weighted_sum(ts, ws, out_dtype, divisor=hi, divisor_lo=lo)), out_dtype


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 9, 16, 17, 33])
def test_weighted_sum_any_k_mixed_dtypes(isa, k):
    ts = _inputs(k, 4099, DTYPES, seed=k)
    ws = [(-1) ** i * (i + 1) / k for i in range(k)]
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = _torch.weighted_sum(ts, ws, dtype=out_dtype)
        assert bits_equal(got, _reference.weighted_sum(ts, ws, out_dtype)), out_dtype


def test_single_input_weight_one_is_an_exact_copy(isa):
    x = torch.randn(1001).half()
    x[::7] = -0.0
    assert bits_equal(_torch.weighted_sum([x], [1.0]), x)


def test_zero_inputs_gives_positive_zero(isa):
    out = torch.full((37,), 5.0)
    _torch.weighted_sum([], [], out=out)
    assert bits_equal(out, torch.zeros(37))


def test_accumulate_adds_into_float32(isa):
    ts = _inputs(3, 5000, [torch.float16, torch.bfloat16], seed=3)
    acc = torch.randn(5000)
    expected = _reference.weighted_sum(ts, [1.0, 0.5, -2.0], torch.float32, accumulate_into=acc)
    _torch.weighted_sum(ts, [1.0, 0.5, -2.0], out=acc, accumulate=True)
    assert bits_equal(acc, expected)


def test_rounding_edge_values(isa):
    # ties, overflow to inf, subnormals of the output, inf and nan inputs
    f32 = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 1e-7, 2**-25, -(2**-25), 3e38,
                        float("inf"), -float("inf"), 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-40], dtype=torch.float32)
    for out_dtype in (torch.float16, torch.bfloat16):
        got = _torch.weighted_sum([f32], [1.0], dtype=out_dtype)
        assert bits_equal(got, f32.to(out_dtype)), out_dtype
    nan = torch.tensor([float("nan"), 1.0])
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = _torch.weighted_sum([nan], [1.0], dtype=out_dtype)
        assert math.isnan(got[0].item()) and got[1].item() == 1.0


def test_results_do_not_depend_on_thread_count():
    ts = _inputs(6, 300_001, DTYPES, seed=9)
    ws = [0.1 * (i + 1) for i in range(6)]
    one = _torch.weighted_sum(ts, ws, dtype=torch.float16, threads=1)
    two = _torch.weighted_sum(ts, ws, dtype=torch.float16, threads=2)
    many = _torch.weighted_sum(ts, ws, dtype=torch.float16, threads=7)
    assert bits_equal(one, two) and bits_equal(one, many)
    g = torch.randn(300_001)
    d1 = _torch.multi_dot(ts, g, threads=1)
    d2 = _torch.multi_dot(ts, g, threads=3)
    assert torch.equal(d1, d2)
    assert torch.equal(_torch.gram(ts, threads=1), _torch.gram(ts, threads=2))


@pytest.mark.parametrize("n", [0, 1, 17, 2049, 100_003])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_multi_dot_and_gram_match_float64(isa, n, k):
    ts = _inputs(k, n, DTYPES, seed=n + k)
    g = torch.randn(n, dtype=torch.float32)
    got = _torch.multi_dot(ts, g)
    ref = _reference.multi_dot(ts, g)
    scale = torch.stack([(t.double().abs() * g.double().abs()).sum() for t in ts]) + 1e-30
    assert torch.all((got - ref).abs() <= 1e-6 * scale), (got, ref)
    gm = _torch.gram(ts)
    gr = _reference.gram(ts)
    norms = torch.stack([t.double().norm() for t in ts])
    assert torch.equal(gm, gm.T)
    assert torch.all((gm - gr).abs() <= 1e-6 * (norms[:, None] * norms[None, :] + 1e-30))


def test_multi_dot_identical_across_isas():
    ts = _inputs(4, 70_001, DTYPES, seed=1)
    g = torch.randn(70_001).bfloat16()
    results = []
    previous = _core.isa()
    for isa in _core.supported_isas():
        _core.set_isa(isa)
        results.append((_torch.multi_dot(ts, g), _torch.gram(ts)))
    _core.set_isa(previous)
    for d, gm in results[1:]:
        assert torch.equal(d, results[0][0]) and torch.equal(gm, results[0][1])


# --- the boundary: wrong sizes, dtypes, devices and addresses are refused with clear errors ----------


def test_boundary_errors_name_the_op_and_argument():
    a, b = torch.randn(10), torch.randn(11)
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[1\] has 11 elements, expected 10"):
        _torch.weighted_sum([a, b], [1, 1])
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[0\] has dtype int64"):
        _torch.weighted_sum([torch.arange(10)], [1.0], out=torch.empty(10))
    with pytest.raises(ValueError, match=r"weighted_sum: got 2 tensors and 1 weights"):
        _torch.weighted_sum([a, a], [1.0])
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[0\] is not contiguous"):
        _torch.weighted_sum([torch.randn(4, 4).T], [1.0])
    with pytest.raises(ValueError, match="accumulate=True needs a float32 out"):
        _torch.weighted_sum([a], [1.0], out=torch.empty(10, dtype=torch.float16), accumulate=True)
    with pytest.raises(ValueError, match="accumulate=True needs divisor 1"):
        _torch.weighted_sum([a], [1.0], out=torch.empty(10), accumulate=True, divisor=2.0)
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="divisor must be finite and nonzero"):
            _torch.weighted_sum([a], [1.0], divisor=bad)
    with pytest.raises(TypeError, match=r"inputs\[0\] is a list"):
        _torch.weighted_sum([[1.0]], [1.0], out=torch.empty(1))
    with pytest.raises(ValueError, match=r"multi_dot: inputs\[0\] has 11 elements, expected 10"):
        _torch.multi_dot([b], a)
    with pytest.raises(ValueError, match=r"gram: inputs\[1\] has 11 elements, expected 10"):
        _torch.gram([a, b])


def test_native_entry_points_check_codes_and_addresses():
    x = torch.randn(8)
    with pytest.raises(ValueError, match=r"weighted_sum: inputs\[0\] has dtype code 9"):
        _core.weighted_sum([x.data_ptr()], [9], [1.0], 8, x.data_ptr(), 2)
    with pytest.raises(ValueError, match="out has dtype code -1"):
        _core.weighted_sum([x.data_ptr()], [2], [1.0], 8, x.data_ptr(), -1)
    with pytest.raises(ValueError, match=r"inputs\[0\] is a null address"):
        _core.weighted_sum([0], [2], [1.0], 8, x.data_ptr(), 2)
    with pytest.raises(ValueError, match="out is a null address"):
        _core.weighted_sum([x.data_ptr()], [2], [1.0], 8, 0, 2)
    with pytest.raises(ValueError, match="got 1 input addresses and 2 dtypes"):
        _core.weighted_sum([x.data_ptr()], [2, 2], [1.0], 8, x.data_ptr(), 2)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _core.weighted_sum([x.data_ptr()], [2], [1.0], 8, x.data_ptr(), 2, False, -1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        _core.weighted_sum([x.data_ptr()], [2], [1.0], -1, x.data_ptr(), 2)
    with pytest.raises(ValueError, match="g is a null address"):
        _core.multi_dot([x.data_ptr()], [2], 0, 2, 8)
    with pytest.raises(ValueError, match="unknown ISA"):
        _core.set_isa("sse9")


def test_counters_count_bytes():
    _core.reset_counters()
    ts = [torch.randn(1000).half() for _ in range(3)]
    _torch.weighted_sum(ts, [1, 1, 1], dtype=torch.float32)
    c = _core.counters()
    assert c["bytes_read"] == 3 * 1000 * 2 and c["bytes_written"] == 1000 * 4 and c["calls"] == 1


def test_merge_plan_is_checked_once_and_runs_again_with_new_weights():
    # One _core.MergePlan (what engine._Segments builds), run twice with other weights and divisor:
    # each run gives the plain-torch reference's bits. Small windows: several steps per segment.
    a, b = _inputs(2, 20_000, [torch.float16], seed=11)
    c, d = _inputs(2, 5_000, [torch.bfloat16, torch.float32], seed=12)
    out16 = torch.empty(20_000, dtype=torch.float16)
    out32 = torch.empty(5_000, dtype=torch.float32)
    F16, BF16, F32 = 0, 1, 2
    plan = _core.MergePlan(2, [20_000, 5_000], [0, 0], [-1, -1], [out16.data_ptr(), out32.data_ptr()], [F16, F32],
                           [a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr()], [F16, F16, BF16, F32], [0, 0, 0, 0])
    assert plan.num_inputs == 2 and plan.num_segments == 2
    for ws, divisor in (([0.5, 0.5], 1.0), ([2.0, -1.25], 3.0)):
        plan.run(ws, window_bytes=1 << 14, divisor=divisor)
        assert bits_equal(out16, _reference.weighted_sum([a, b], ws, torch.float16, divisor=divisor))
        assert bits_equal(out32, _reference.weighted_sum([c, d], ws, torch.float32, divisor=divisor))
    # A bad plan is refused when it is built, naming the segment and the input; a bad run when it runs.
    with pytest.raises(ValueError, match=r"MergePlan: segment 1: input 1 has dtype code 9"):
        _core.MergePlan(2, [4, 4], [0, 0], [-1, -1], [out16.data_ptr()] * 2, [F16, F16], [a.data_ptr()] * 4,
                        [F16, F16, F16, 9], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="MergePlan: segment 0: null output address"):
        _core.MergePlan(1, [4], [0], [-1], [0], [F16], [a.data_ptr()], [F16], [0])
    with pytest.raises(ValueError, match=r"MergePlan.run: got 3 weights, expected 2"):
        plan.run([1.0, 1.0, 1.0])
