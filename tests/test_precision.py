"""fastsoup.average against the exact weighted mean, rounded once (issue 19, item 8).

The oracle is ``_reference.exact_weighted_mean``: ``sum_k w_k x_k / sum_k w_k`` in integer and
rational arithmetic, rounded once to the output dtype (nearest, ties to even). Distances are counted
in units in the last place of the output dtype (``_reference.ulp_distance``: 0 = the correctly
rounded mean, 1 = a neighbour of it). Tolerances, as the README states them:

- uniform weights, float16/bfloat16/float32: 0 ulp (the float64 sum of the inputs is exact here,
  then divided once);
- everything else (float64, random weights), K = 2..17: at most 1 ulp, with cancellation up to
  about 2^22 (sum |w x| / |sum w x|) in the data; the README gives the bound beyond that.

Each test also ran against the base commit's build (39604c2) and fails there (benchmarks/RESULTS.md,
"Precision"). No test here skips: without the native extension ``import fastsoup`` fails.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import fastsoup
from fastsoup import _core, _reference

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
SIZES = [0, 1, 7, 33, 2049, 4099]  # empty, one element, odd sizes, across a 2048-element block
KS = range(2, 18)


def _weights(kind: str, k: int, seed: int):
    if kind == "uniform":
        return None
    g = torch.Generator().manual_seed(seed)
    return [0.2 + 0.8 * float(u) for u in torch.rand(k, generator=g, dtype=torch.float64)]


def _inputs(k: int, n: int, dtype: torch.dtype, weights, seed: int) -> list[torch.Tensor]:
    """K tensors of n elements, four kinds of element in turn: independent normal values;
    fine-tune-like values (a shared base plus small noise); magnitudes spread over 16 binades; and
    a cancelling element, whose last input undoes the others' weighted sum up to about 2^-6, so the
    mean is small against sum |w x| (cancellation up to about 2^22)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(weights if weights is not None else [1.0] * k, dtype=torch.float64)
    x = torch.randn(k, n, generator=g, dtype=torch.float64)
    kind = torch.arange(n) % 4
    base = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    x = torch.where(kind == 1, base + 0.002 * x, x)
    spread = torch.exp2(-16 * torch.rand(k, n, generator=g, dtype=torch.float64)) * (1 + torch.rand(k, n, generator=g))
    x = torch.where(kind == 2, torch.sign(x) * spread, x)
    x = torch.where(kind == 3, 8 * x, x)
    x = x.to(dtype).double()
    nudge = (1 + torch.rand(n, generator=g, dtype=torch.float64)) * 2.0**-6
    last = -(w[:-1, None] * x[:-1]).sum(0) / w[-1] + nudge
    x[-1] = torch.where(kind == 3, last, x[-1])
    return [row.to(dtype) for row in x]


def _state_dicts(k: int, dtype, weights, seed: int):
    """K state dicts with one tensor per size in SIZES."""
    per_size = [_inputs(k, n, dtype, weights, seed + n) for n in SIZES]
    return [{f"t{n}": per_size[i][j] for i, n in enumerate(SIZES)} for j in range(k)]


def _ulps(got: dict, sds, weights, dtype) -> dict:
    out = {}
    for name, t in got.items():
        exact = _reference.exact_weighted_mean([sd[name] for sd in sds], weights, dtype)
        out[name] = _reference.ulp_distance(t, exact)
    return out


def _every_isa():
    previous = _core.isa()
    try:
        for isa in _core.supported_isas():
            _core.set_isa(isa)
            yield isa
    finally:
        _core.set_isa(previous)


@pytest.mark.parametrize("weights", ["uniform", "random"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_average_is_within_one_ulp_of_the_exact_mean(dtype, weights):
    dt = DTYPES[dtype]
    # correctly rounded where the float64 sum is exact (uniform, not float64); else <= 1 ulp
    tolerance = 0 if weights == "uniform" and dtype != "fp64" else 1
    for k in KS:
        ws = _weights(weights, k, seed=k)
        sds = _state_dicts(k, dt, ws, seed=100 * k)
        exact = {name: _reference.exact_weighted_mean([sd[name] for sd in sds], ws, dt) for name in sds[0]}
        for isa in _every_isa():
            got = fastsoup.average(sds, ws)
            for name, t in got.items():
                assert t.dtype == dt and t.shape == exact[name].shape
                d = _reference.ulp_distance(t, exact[name])
                worst = int(d.max()) if d.numel() else 0
                assert worst <= tolerance, (
                    f"K={k} {dtype} {weights} {isa} {name}: {worst} ulp from the exact mean, "
                    f"{int((d > tolerance).sum())} of {d.numel()} elements above {tolerance}")


def test_float64_average_is_computed_in_float64():
    # the cases of the issue: float32 arithmetic gave 0.3333333432674408 and 123456792
    for value in (1 / 3, 123456789.12):
        x = torch.full((5,), value, dtype=torch.float64)
        got = fastsoup.average([{"w": x}, {"w": x.clone()}])["w"]
        assert got.tolist() == [value] * 5


def test_identical_inputs_average_to_themselves():
    g = torch.Generator().manual_seed(7)
    for dt in DTYPES.values():
        x = (torch.randn(3001, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 20, (3001,), generator=g))).to(dt)
        x[:2] = torch.tensor([1 / 3, 123456789.12], dtype=torch.float64).to(dt)
        for k in KS:
            for isa in _every_isa():
                got = fastsoup.average([{"w": x.clone()} for _ in range(k)])["w"]
                assert torch.equal(got, x), f"{dt} K={k} {isa}: {int((got != x).sum())} elements changed"


def _zero_sum_inputs(k: int, n: int, seed: int) -> list[torch.Tensor]:
    """K inputs whose sum is exactly 0 in every element: small integers times a power of two
    (exact in every dtype, and so is the last input, minus the sum of the others)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-8, 9, (n,), generator=g).double())
    x = torch.randint(-7, 8, (k - 1, n), generator=g).double() * scale
    return [*x, -x.sum(0)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_an_exact_zero_mean_is_zero(dtype):
    dt = DTYPES[dtype]
    for k in KS:
        xs = [t.to(dt) for t in _zero_sum_inputs(k, 999, seed=k)]
        assert all(torch.equal(t.double(), x) for t, x in zip(xs, _zero_sum_inputs(k, 999, seed=k)))  # exact
        for isa in _every_isa():
            got = fastsoup.average([{"w": t} for t in xs])["w"]
            nonzero = got != 0
            assert not nonzero.any(), f"K={k} {isa}: {int(nonzero.sum())} nonzero, e.g. {got[nonzero][:3].tolist()}"
            assert not torch.signbit(got).any()  # +0, as the exact mean rounded


def _k3_ties(xs, dt) -> torch.Tensor:
    """Where the mean of three inputs is exactly a midpoint between two values of dt."""
    s = (xs[0].double() + xs[1].double() + xs[2].double()).numpy()  # exact
    m = s / 3
    exact = torch.tensor([Fraction(float(a)) == 3 * Fraction(float(b)) for a, b in zip(s, m)])
    _, midpoint, _ = _reference._round_double(m, dt)
    return exact & torch.from_numpy(midpoint)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_exact_ties_round_to_even(dtype):
    # K = 3: the mean of three random values is an exact midpoint of the output dtype in about
    # 0.6 % (bfloat16) of elements; fp32(1/3) > 1/3 used to round all of them away from zero
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(40000, generator=g).to(dt) for _ in range(3)]
    ties = _k3_ties(xs, dt)
    assert int(ties.sum()) > 20, "the data must hold ties"
    want = _reference.exact_weighted_mean(xs, None, dt)
    for isa in _every_isa():
        got = fastsoup.average([{"w": t} for t in xs])["w"]
        d = _reference.ulp_distance(got, want)
        assert int(d[ties].max()) == 0, f"{isa}: {int((d[ties] > 0).sum())} of {int(ties.sum())} ties rounded wrong"
        assert int(d.max()) == 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_soup_value_is_the_correctly_rounded_mean(tmp_path, dtype):
    # fine-tune-like ingredients: the Soup's float32 running sum is exact, so round(S / n) is the
    # mean rounded once, the same bits as average() (the greedy soup saved is the average of the
    # kept ingredients)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 1001, generator=g) * 0.02
    sds = [{"w": (base + 0.002 * torch.randn(3, 1001, generator=g)).to(dt)} for _ in range(5)]
    for k in range(2, 6):
        soup = fastsoup.Soup.like(sds[0])
        for sd in sds[:k]:
            soup.add(sd)
        want = _reference.exact_weighted_mean([sd["w"] for sd in sds[:k]], None, dt)
        got = soup.value()["w"]
        assert int(_reference.ulp_distance(got, want).max()) == 0, f"K={k}"
        assert torch.equal(got, fastsoup.average(sds[:k])["w"])
        path = soup.save(tmp_path / f"soup{k}.safetensors")
        assert torch.equal(fastsoup.open_checkpoint(path).tensor("w"), got)


def test_edge_cases_against_the_exact_oracle():
    # ties to even (float16, float64), overflow at the tie to infinity, a tie below the smallest
    # subnormal, weights; the oracle and fastsoup must both give the expected value
    one = torch.tensor
    f64 = torch.float64
    cases = [
        ([one([1.0]), one([1.0 + 2**-10])], None, torch.float16, 1.0),  # midpoint of 1 and 1 + 2^-10: even
        ([one([1.0]), one([1.0 + 3 * 2**-10])], None, torch.float16, 1.0 + 2 * 2**-10),  # to even, upwards
        ([one([65504.0]), one([65536.0 + 2**12])], None, torch.float32, 67568.0),
        ([one([2.0**-25]), one([2.0**-25])], None, torch.float16, 0.0),  # a tie between 0 and 2^-24
        ([one([65504.0]), one([65536.0])], None, torch.float16, math.inf),  # 65520: the tie to infinity
        ([one([1.0], dtype=f64), one([1.0 + 2.0**-52], dtype=f64)], None, f64, 1.0),  # a float64 tie
        ([one([1.0 + 2.0**-52], dtype=f64), one([1.0 + 2.0**-51], dtype=f64)], None, f64, 1.0 + 2.0**-51),
        ([one([1.0], dtype=f64), one([2.0], dtype=f64)], [1.0, 2.0], f64, 5 / 3),
        ([one([0.1], dtype=f64)] * 3, [0.3, 0.3, 0.4], f64, 0.1),
    ]
    for xs, ws, dt, want in cases:
        assert _reference.exact_weighted_mean(xs, ws, dt).item() == want, (xs, ws, dt)
        got = fastsoup.average([{"w": x.to(dt) if x.dtype != f64 else x} for x in xs], ws, dtype=dt)["w"]
        assert got.dtype == dt and got.item() == want, (xs, ws, dt, got.item())
    a, b = torch.tensor([1.0, -0.0, 3.0]), torch.tensor([1.0, 0.0, -3.0])
    assert _reference.ulp_distance(a, b).tolist() == [0, 0, 2 * 0x40400000]
