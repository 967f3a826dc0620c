"""``_core.sparse_merge`` (through ``fastsoup.methods.native``) against ``fastsoup._reference``, bit for bit:
every method, dtypes in and out, odd sizes, K = 2..17, ties at the threshold, zero deltas, negative
weights, density and gamma edge cases, the L1 rescale, and any thread count or task size."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastsoup._reference as R
from fastsoup import _core
from fastsoup.methods import rng
from fastsoup.methods.native import sparse_merge

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
RUNS = [(1, 0), (2, 0), (7, 0), (2, 100), (7, 33), (3, 257)]  # (threads, chunk): chunk 0 = automatic
NAME = "model.layers.3.mlp.up_proj.weight"


def _kwargs(method: str, density, gamma, rescale, seed: int = 7) -> dict:
    kw: dict = {}
    if method != "task_arithmetic":
        kw["density"] = density
    if method.startswith("breadcrumbs"):
        kw["gamma"] = gamma
    if method.startswith("dare"):
        kw.update(seed=seed, name=NAME)
    if rescale != "default":
        kw["rescale"] = rescale
    return kw


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    return a.dtype == b.dtype and torch.equal(ia, ib)


def _check(method, base, models, weights, out_dtype, runs=RUNS, **kw):
    ref = getattr(R, method)(base, models, weights, dtype=out_dtype, **kw)
    for threads, chunk in runs:
        out = torch.empty(base.shape, dtype=out_dtype)
        sparse_merge(method, base, models, out, weights=weights, threads=threads, chunk=chunk, **kw)
        if not _same(out, ref):
            bad = (out.float() != ref.float()).nonzero()[:5].flatten().tolist()
            pytest.fail(f"{method} threads={threads} chunk={chunk}: differs at {bad}: "
                        f"{out.flatten()[bad].tolist()} vs {ref.flatten()[bad].tolist()}")


def _data(n: int, k: int, dtype, seed: int, *, ties: bool = False, in_dtypes=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    models = []
    for j in range(k):
        if ties:  # few distinct magnitudes: many entries equal at the threshold
            d = torch.randint(-2, 3, (n,), generator=g).float() * 0.25
        else:
            d = torch.randn(n, generator=g) * (0.01 * (j + 1))
        models.append((base.float() + d).to(in_dtypes[j] if in_dtypes else dtype))
    return base, models


METHODS = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("din,dout", list(itertools.product(DTYPES, DTYPES)), ids=lambda x: x)
def test_dtypes_and_sizes(method, din, dout):
    for n, k in [(0, 2), (1, 3), (7, 2), (1023, 5), (4097, 3)]:
        base, models = _data(n, k, DTYPES[din], seed=n + k)
        weights = [1.0, -0.5, 2.0, 0.25, 1.5][:k]
        _check(method, base, models, weights, DTYPES[dout], runs=RUNS[:3] + RUNS[4:5],
               **_kwargs(method, 0.3, 0.05, "default"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [2, 9, 17])
def test_many_models_mixed_dtypes_ties_at_threshold(method, k):
    dts = [list(DTYPES.values())[j % 3] for j in range(k)]
    base, models = _data(1031, k, torch.float32, seed=k, ties=True, in_dtypes=dts)
    weights = [(-1.0) ** j * (0.5 + j / 8) for j in range(k)]
    dens = [j / (k - 1) for j in range(k)]  # 0 .. 1
    gams = [(k - 1 - j) / (2 * (k - 1)) for j in range(k)]
    _check(method, base, models, weights, torch.bfloat16, **_kwargs(method, dens, gams, "default"))


EDGES = [(m, d, g) for m in METHODS[1:] for d in (0.0, 1.0, 0.5, 1e-3)
         for g in ((0.0, 1e-4, 0.6, 1.0) if m.startswith("breadcrumbs") else (0.0,))]


@pytest.mark.parametrize("method,density,gamma", EDGES, ids=lambda x: str(x))
def test_density_gamma_edges(method, density, gamma):
    base, models = _data(777, 3, torch.float16, seed=3, ties=True)
    _check(method, base, models, [1.0, 1.0, -1.0], torch.float16, **_kwargs(method, density, gamma, "default"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("normalize", [False, True])
def test_zero_deltas_and_lambda(method, normalize):
    base = torch.randn(513).half()
    models = [base.clone(), base.clone(), (base.float() + 0.1).half()]
    models[2][:300] = base[:300]  # partly zero too
    kw = _kwargs(method, 0.4, 0.1, "default")
    _check(method, base, models, [0.5, 0.5, -1.0], torch.float32, lam=0.7, normalize=normalize, **kw)
    # weights summing to ~0: the normalization's 1e-8 guard
    _check(method, base, models, [1.0, -1.0, 1e-9], torch.float32, normalize=normalize, **kw)


@pytest.fixture(params=_core.supported_isas())
def each_isa(request):
    """Runs the test under each instruction set the CPU has (the L1 sums have AVX-512 code of their own)."""
    before = _core.isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(before)


@pytest.mark.parametrize("method", METHODS[1:])
def test_l1_rescale_exact(method, each_isa):
    # magnitudes over 2^-100 .. 2^100 (float32): a plain float64 sum of |delta| is not exact
    g = torch.Generator().manual_seed(11)
    n = 2049
    base = torch.zeros(n)
    models = []
    for _ in range(3):
        e = torch.randint(-100, 100, (n,), generator=g).float()
        models.append((torch.randn(n, generator=g) * torch.exp2(e)).float())
    models[1][::3] = 1.0 + torch.arange(0, n, 3).float() * 2.0 ** -23
    for dout in (torch.float32, torch.float16):
        _check(method, base, models, [1.0, 0.5, -2.0], dout, **_kwargs(method, 0.37, 0.01, "l1"))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_l1_rescale_blocks_of_few_bits_and_mixed(method, dtype, each_isa):
    # The L1 sums add a block of 256 values at once when they are integers in one unit (float16 and
    # bfloat16 deltas), value by value otherwise: blocks of each kind in one tensor, blocks whose sum
    # carries (the same large value 256 times), a block with values far below its largest (the
    # value-by-value path), and the largest float16 deltas.
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(5)
    n = 256 * 12 + 77
    base = (torch.randn(n, generator=g) * 0.02).to(dt)
    models = []
    for j in range(3):
        m = (base.float() + torch.randn(n, generator=g) * (0.01 * (j + 1))).to(dt)
        m[256:512] = 1000.0  # one large value, 256 times
        m[1024:1280] = (torch.randn(256, generator=g) * torch.exp2(torch.randint(-60, 10, (256,), generator=g)
                                                                 .float())).to(dt)
        models.append(m)
    if dtype == "f16":
        base[2048:2100] = -65504.0
        models[0][2048:2100] = 65504.0
    _check(method, base, models, [1.0, -0.5, 2.0], dt, **_kwargs(method, 0.3, 0.02, "l1"))


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_l1_sum_keeps_the_bits_below_a_blocks_largest_value(method, each_isa):
    # One block: 1.0 and 255 values of 2^-60. The exact sum, 1 + 255 * 2^-60, rounds to 1 + 2^-52, and
    # the factor |delta|_1 / |kept|_1 shows it in a float64 output; a block sum that dropped the
    # values below its unit would give 1.0.
    base = torch.zeros(256, dtype=torch.float64)
    m0 = torch.full((256,), 2.0 ** -60, dtype=torch.float64)
    m0[0] = 1.0
    m1 = torch.linspace(-1, 1, 256, dtype=torch.float64)
    _check(method, base, [m0, m1], [1.0, 1.0], torch.float64, **_kwargs(method, 0.5, 0.0, "l1"))


def test_l1_small_norms_unscaled():
    base = torch.zeros(100)
    models = [torch.full((100,), 1e-10), torch.randn(100)]
    _check("ties", base, models, [1.0, 1.0], torch.float32, density=0.5, rescale="l1")
    _check("dare_linear", base, models, [1.0, 1.0], torch.float32, density=0.5, rescale="l1", seed=1, name="x")


@pytest.mark.parametrize("rescale", [None, "density", "l1"])
def test_dare_rescale_options_and_seeds(rescale):
    base, models = _data(3001, 4, torch.bfloat16, seed=5)
    for seed in (0, 1, 2 ** 64 - 1):
        _check("dare_ties", base, models, [1.0, 2.0, -1.0, 0.5], torch.bfloat16, density=[0.1, 0.5, 0.9, 1.0],
               seed=seed, name=NAME, rescale=rescale)


def test_dare_mask_matches_rng_spec():
    # density 0.5, one model, base 0, deltas 1, no rescale: out is exactly rng.keep_mask
    n = 5000
    base = torch.zeros(n)
    ones = torch.ones(n)
    out = torch.empty(n)
    for threads, chunk in RUNS:
        sparse_merge("dare_linear", base, [ones, ones], out, density=0.5, seed=42, name=NAME, rescale=None,
                     weights=[1.0, 0.0], threads=threads, chunk=chunk)
        mask = rng.keep_mask(42, 0, NAME, 0.5, 0, n)
        assert out.numpy().astype(bool).tolist() == mask.tolist()


def test_fnv1a64_agrees():
    for name in ["", "a", NAME, "блок.0.вес", "x" * 1000]:
        assert _core.fnv1a64(name.encode()) == rng.fnv1a64(name)


def test_torch_free_addresses():
    base, models = _data(100, 2, torch.float32, seed=1)
    out = torch.empty(100, dtype=torch.float16)
    sparse_merge("ties", (base.data_ptr(), "float32"), [(m.data_ptr(), "float32") for m in models],
                 (out.data_ptr(), "float16"), n=100, density=0.5)
    assert _same(out, R.ties(base, models, density=0.5, dtype=torch.float16))


def test_errors():
    base, models = _data(10, 2, torch.float32, seed=1)
    out = torch.empty(10)
    a = [(m.data_ptr(), 2) for m in models]
    b, o = (base.data_ptr(), 2), (out.data_ptr(), 2)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        _core.sparse_merge("nope", 10, a, b, o, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"inputs\[1\] has dtype code 9"):
        _core.sparse_merge("ties", 10, [a[0], (a[1][0], 9)], b, o, [1.0, 1.0], density=[1.0, 1.0])
    with pytest.raises(ValueError, match="2 inputs and 1 weights"):
        _core.sparse_merge("ties", 10, a, b, o, [1.0], density=[1.0, 1.0])
    with pytest.raises(ValueError, match="needs a density"):
        _core.sparse_merge("ties", 10, a, b, o, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"density\[1\] = 1.5"):
        _core.sparse_merge("ties", 10, a, b, o, [1.0, 1.0], density=[1.0, 1.5])
    with pytest.raises(ValueError, match="needs a gamma"):
        _core.sparse_merge("breadcrumbs", 10, a, b, o, [1.0, 1.0], density=[1.0, 1.0])
    with pytest.raises(ValueError, match="takes no gamma"):
        _core.sparse_merge("ties", 10, a, b, o, [1.0, 1.0], density=[1.0, 1.0], gamma=[0.1, 0.1])
    with pytest.raises(ValueError, match="rescale='density' is DARE's"):
        _core.sparse_merge("ties", 10, a, b, o, [1.0, 1.0], density=[1.0, 1.0], rescale="density")
    with pytest.raises(ValueError, match="rescale must be"):
        _core.sparse_merge("dare_ties", 10, a, b, o, [1.0, 1.0], density=[1.0, 1.0], rescale="l2")
    with pytest.raises(ValueError, match="out overlaps inputs"):
        _core.sparse_merge("ties", 10, a, b, a[0], [1.0, 1.0], density=[1.0, 1.0])
    with pytest.raises(ValueError, match="base is a null address"):
        _core.sparse_merge("ties", 10, a, (0, 2), o, [1.0, 1.0], density=[1.0, 1.0])
    with pytest.raises(ValueError, match="at least one model"):
        _core.sparse_merge("task_arithmetic", 10, [], b, o, [])
    with pytest.raises(ValueError, match="different sizes"):
        sparse_merge("ties", base, [models[0], torch.zeros(11)], out, density=0.5)
    with pytest.raises(ValueError, match="needs the tensor's name"):
        sparse_merge("dare_ties", base, models, out, density=0.5)
    with pytest.raises(ValueError, match="dtype int32"):
        sparse_merge("ties", base, [models[0], torch.zeros(10, dtype=torch.int32)], out, density=0.5)


@pytest.mark.parametrize("isa", _core.supported_isas())
def test_isas_agree(isa):
    base, models = _data(3003, 4, torch.float16, seed=9, ties=True)
    before = _core.isa()
    try:
        _core.set_isa(isa)
        for method in METHODS:
            _check(method, base, models, [1.0, -1.0, 0.5, 2.0], torch.float16, runs=[(2, 0), (7, 100)],
                   **_kwargs(method, 0.3, 0.1, "default"))
    finally:
        _core.set_isa(before)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "scaled_rows"])
def test_large_tensors_one_pass_selection(kind):
    # n >= 2^18: the kernel's sampled one-pass selection (sparse.cpp select_window), its count-only
    # windows (one key at the threshold) and its fallback to the exact two passes must all give the
    # reference's bits, for any cut into tasks
    n = (1 << 18) + 1237
    dts = [torch.float16, torch.bfloat16, torch.float32]
    base, models = _data(n, 3, torch.float32, seed=4, ties=kind == "ties", in_dtypes=dts)
    if kind == "zeros":  # most deltas exactly zero: the threshold falls among them
        for j, m in enumerate(models):
            m[: n * 3 // 4] = base[: n * 3 // 4].to(m.dtype)
        base = base.half().float()
        models = [m.float().half() if m.dtype == torch.float32 else m for m in models]
    if kind == "scaled_rows":  # the magnitudes change along the tensor: a poor sample
        scale = torch.exp2(torch.arange(n) // 4096 % 17 - 8.0)
        models = [(base + (m.float() - base) * scale).to(m.dtype) for m in models]
    runs = [(2, 0), (3, 50001), (1, 0)]
    before = _core.sparse_counters()
    for method, dens, gam in [("ties", [0.5, 0.1, 0.9], None), ("breadcrumbs", [0.3, 0.6, 0.05], [0.01, 0.2, 0.0]),
                              ("breadcrumbs_ties", 0.4, 0.1)]:
        kw = _kwargs(method, dens, gam, "default")
        _check(method, base, models, [1.0, -0.5, 2.0], torch.float16, runs=runs, **kw)
    _check("ties", base, models, [1.0, 1.0, 1.0], torch.float32, runs=runs[:1], density=0.25, rescale="l1")
    after = _core.sparse_counters()
    window, exact = (after[c] - before[c] for c in ("window_cuts", "exact_cuts"))
    print(kind, "window cuts", window, "exact cuts", exact)
    assert window > 0  # the one-pass selection ran (and, where its window missed, the exact one)


@pytest.mark.parametrize("isa", _core.supported_isas())
def test_large_tensors_isas_agree(isa):
    # the one-pass selection and the fused combines of each ISA (AVX-512 has its own), n >= 2^18
    n = (1 << 18) + 77
    base, models = _data(n, 3, torch.float16, seed=8, in_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    models[0][: n // 2] = base[: n // 2]  # zeros at the threshold of the first model
    before = _core.isa()
    try:
        _core.set_isa(isa)
        for method in METHODS:
            _check(method, base, models, [1.0, -1.0, 0.5], torch.bfloat16, runs=[(2, 0), (3, 40000)],
                   **_kwargs(method, [0.3, 0.5, 0.25], [0.01, 0.1, 0.0], "default"))
    finally:
        _core.set_isa(before)
