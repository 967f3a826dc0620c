"""The plain-torch references of the merge methods (fastsoup._reference): worked examples by hand,
independent step-by-step re-implementations, the rounding rule, and the edge cases each docstring
states (ties at the trim threshold, zero task vectors, negative weights, breadcrumbs with
gamma * numel < 1, Model Stock's clamp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastsoup import _reference as R
from fastsoup.methods import rng
from fastsoup.methods import select as S

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
IDS = ["fp16", "bf16", "fp32", "fp64"]


def _t(*rows, dtype=torch.float64):
    return [torch.tensor(r, dtype=dtype) for r in rows]


def _zoo(k, shape=(7, 13), dtype=torch.float32, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return base, [(base.double() + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
                  for _ in range(k)]


# --- task arithmetic ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_task_arithmetic_is_one_rounding_of_the_float64_sum(dtype):
    base, models = _zoo(5, dtype=dtype)
    w, lam = [0.5, -0.25, 1.0, 0.3, 2.0], 0.7
    b = base.double()
    s = torch.zeros_like(b)
    for wk, m in zip(w, models):
        s = s + (m.double() - b) * wk
    want = b + lam * s
    assert torch.equal(R.task_arithmetic_deltas(base, models, w, lam=lam, dtype=torch.float64), want)
    assert torch.equal(R.task_arithmetic_deltas(base, models, w, lam=lam), R._round_to(want, dtype))
    total = 0.0
    for wk in w:
        total += wk
    norm = R.task_arithmetic_deltas(base, models, w, lam=lam, normalize=True, dtype=torch.float64)
    assert torch.equal(norm, b + lam * (s / total))
    assert torch.equal(R.task_arithmetic_deltas(base, models, [1.0, -1.0, 0, 0, 0], normalize=True,
                                                dtype=torch.float64),
                       b + ((models[0].double() - b) + (models[1].double() - b) * -1.0))  # weights sum to 0: not divided


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_task_arithmetic_is_one_weighted_sum_within_one_ulp_of_the_delta_form(dtype):
    """The engine's definition: c_base * base + sum_k (lam w_k) theta_k, c_base = 1 - fsum(lam w_k)."""
    base, models = _zoo(5, dtype=dtype)
    w, lam = [0.5, -0.25, 1.0, 0.3, 2.0], 0.7
    cs = [lam * wk for wk in w]
    want = R.weighted_sum([base, *models], [1.0 - math.fsum(cs), *cs], dtype)
    out = R.task_arithmetic(base, models, w, lam=lam)
    assert torch.equal(out, want)
    bound = 16 if dtype == torch.float64 else 1  # float64 output: no coarser rounding absorbs the float64 error
    assert int(R.ulp_distance(out, R.task_arithmetic_deltas(base, models, w, lam=lam)).max()) <= bound
    normed = R.task_arithmetic(base, models, w, lam=lam, normalize=True)
    assert int(R.ulp_distance(normed, R.task_arithmetic_deltas(base, models, w, lam=lam, normalize=True)).max()) <= bound


def test_task_arithmetic_defaults_and_mixed_dtypes():
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    a = torch.tensor([1.5, 2.25], dtype=torch.float32)
    b = torch.tensor([0.5, 2.0], dtype=torch.float16)
    out = R.task_arithmetic(base, [a, b])  # weights 1, lambda 1, the base's dtype
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0, 2.25]


# --- TIES ----------------------------------------------------------------------------------------------

D1, D2, D3 = [1.0, -2.0, 0.5, 3.0], [-1.0, -1.0, 2.0, 0.1], [0.5, 2.0, -3.0, -0.2]


def test_ties_worked_example():
    # trim (k = floor(0.5 * 4) = 2): [0,-2,0,3], [-1,0,2,0] (|-1| twice: the lower index kept), [0,2,-3,0]
    # elect: sums [-1, 0, -1, 3] -> signs -, + (0 counts as +), -, +; disjoint mean: [-1, 2, -3, 3]
    base = torch.zeros(4, dtype=torch.float64)
    assert R.ties(base, _t(D1, D2, D3), density=0.5).tolist() == [-1.0, 2.0, -3.0, 3.0]
    # weights [1, 2, 1]: terms [0,-2,0,3], [-2,0,4,0], [0,2,-3,0]; sums [-2,0,1,3] -> -, +, +, +
    # means: -2/2, 2/1, 4/2, 3/1
    assert R.ties(base, _t(D1, D2, D3), [1, 2, 1], density=0.5).tolist() == [-1.0, 2.0, 2.0, 3.0]
    # without normalize: the agreeing terms' sum; lambda scales it
    out = R.ties(base, _t(D1, D2, D3), [1, 2, 1], density=0.5, normalize=False, lam=0.5)
    assert out.tolist() == [-1.0, 1.0, 2.0, 1.5]
    # base added back, in the output dtype
    out = R.ties(torch.ones(4, dtype=torch.float16), [torch.ones(4, dtype=torch.float16) + torch.tensor(d).half()
                                                        for d in (D1, D2, D3)], density=0.5)
    assert out.dtype == torch.float16 and out.tolist() == [0.0, 3.0, -2.0, 4.0]


def test_ties_negative_weight_follows_mergekit():
    # weights [1, -1, 1]: terms [0,-2,0,3], [1,0,-2,0], [0,2,-3,0]; sums [1, 0, -5, 3] -> +, +, -, +
    # idx 0: model 2 agrees (its term 1 > 0): 1 / -1 = -1; idx 2: models 2 and 3 agree, weights sum to 0:
    # divided by 1, as mergekit: -5
    base = torch.zeros(4, dtype=torch.float64)
    assert R.ties(base, _t(D1, D2, D3), [1, -1, 1], density=0.5).tolist() == [-1.0, 2.0, -5.0, 3.0]


def _ties_by_steps(base, models, w, density, lam=1.0):
    """TIES written out independently: numpy, lexsort trim, per-element loops."""
    b = base.double().numpy().ravel()
    out = np.empty_like(b)
    deltas = []
    for m in models:
        d = m.double().numpy().ravel() - b
        k = math.floor(density * d.size)
        key = np.abs(d).astype(np.float32).view(np.uint32).astype(np.int64)
        order = np.lexsort((np.arange(d.size), -key))  # key descending, then index ascending
        t = np.zeros_like(d)
        t[order[:k]] = d[order[:k]]
        deltas.append(t)
    for i in range(b.size):
        terms = [wk * d[i] for wk, d in zip(w, deltas)]
        s = 0.0
        for x in terms:
            s += x
        num = den = 0.0
        for wk, x in zip(w, terms):
            if (x > 0 and s >= 0) or (x < 0 and s < 0):
                num += x
                den += wk
        out[i] = b[i] + lam * (num / (den if den != 0 else 1.0))
    return torch.from_numpy(out).reshape(base.shape)


@pytest.mark.parametrize("k", [2, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_ties_matches_a_step_by_step_implementation(k, dtype):
    base, models = _zoo(k, shape=(5, 11), dtype=dtype, seed=k)
    w = [(-1) ** j * (0.5 + j / 10) if j % 4 == 3 else 0.5 + j / 10 for j in range(k)]
    want = _ties_by_steps(base, models, w, 0.3, lam=0.9)
    assert torch.equal(R.ties(base, models, w, density=0.3, lam=0.9, dtype=torch.float64), want)
    assert torch.equal(R.ties(base, models, w, density=0.3, lam=0.9), R._round_to(want, dtype))


def test_ties_ties_at_threshold_and_zero_deltas():
    base = torch.zeros(6, dtype=torch.float32)
    equal = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    out = R.ties(base, [equal], density=0.5)  # k = 3 of six equal magnitudes: indices 0, 1, 2
    assert out.tolist() == [1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    assert torch.equal(R.ties(base, [base.clone(), base.clone()], density=0.5), base)  # all-zero task vectors
    assert torch.equal(R.ties(base, [equal], density=0.0), base)  # k = 0: nothing kept
    assert torch.equal(R.ties(base, [equal], density=1.0), equal)
    one = R.ties(torch.zeros(1), [torch.tensor([2.0])], density=0.5)  # floor(0.5) = 0
    assert one.tolist() == [0.0]


def test_ties_trim_is_the_radix_selection():
    base, models = _zoo(3, shape=(64, 33), dtype=torch.bfloat16, seed=3)
    for m in models:
        d = m.double() - base.double()
        keys = S.magnitude_keys(d.numpy())
        k = S.trim_count(d.numel(), 0.37)
        assert np.array_equal(R.ties_trim_mask(d, 0.37).numpy(), S.top_k_mask(keys, k, chunk=100))


def test_ties_l1_rescale():
    base = torch.zeros(4, dtype=torch.float64)
    d = torch.tensor([4.0, -1.0, 2.0, 1.0], dtype=torch.float64)
    # trimmed to [4, 0, 2, 0]: L1 8 -> 6, rescaled by 8/6
    want = torch.tensor([4.0, 0, 2.0, 0], dtype=torch.float64) * (8.0 / 6.0)
    assert torch.equal(R.ties(base, [d], density=0.5, rescale="l1"), want)
    assert torch.equal(R.ties(base, [torch.full((4,), 1e-9, dtype=torch.float64)], density=0.5, rescale="l1"),
                       torch.tensor([1e-9, 1e-9, 0, 0], dtype=torch.float64))  # norms below 1e-7: not rescaled


# --- DARE ------------------------------------------------------------------------------------------------

def test_dare_linear_drops_by_the_counter_rng_and_rescales_by_density():
    base, models = _zoo(3, shape=(40, 50), dtype=torch.float32, seed=5)
    name, density = "model.layers.0.mlp.up_proj.weight", [0.3, 0.5, 0.9]
    out = R.dare_linear(base, models, [1.0, 1.0, 1.0], density=density, seed=7, name=name, dtype=torch.float64)
    b = base.double().reshape(-1)
    want = torch.zeros_like(b)
    for k, m in enumerate(models):
        keep = torch.from_numpy(rng.keep_mask(7, k, name, density[k], 0, b.numel()))
        want = want + torch.where(keep, (m.double().reshape(-1) - b) / density[k], torch.zeros_like(b))
    assert torch.equal(out.reshape(-1), b + want)
    # the seed and the name change the masks
    assert not torch.equal(out, R.dare_linear(base, models, density=density, seed=8, name=name, dtype=torch.float64))
    assert not torch.equal(out, R.dare_linear(base, models, density=density, seed=7, name=name + "x",
                                              dtype=torch.float64))


def test_dare_rescale_options():
    base = torch.zeros(20_000, dtype=torch.float64)
    d = torch.linspace(-1, 1, 20_000, dtype=torch.float64) + 0.01
    plain = R.dare_linear(base, [d], density=0.4, name="t", rescale=None)
    keep = torch.from_numpy(rng.keep_mask(0, 0, "t", 0.4, 0, d.numel()))
    assert torch.equal(plain, torch.where(keep, d, torch.zeros_like(d)))
    assert abs(keep.double().mean().item() - 0.4) < 0.02
    l1 = R.dare_linear(base, [d], density=0.4, name="t", rescale="l1")
    assert math.isclose(math.fsum(l1.abs().tolist()), math.fsum(d.abs().tolist()), rel_tol=1e-12)
    assert torch.equal(R.dare_linear(base, [d], density=1.0, name="t"), d)
    assert torch.equal(R.dare_linear(base, [d], density=0.0, name="t"), base)


def test_dare_ties_elects_over_the_dropped_deltas():
    base, models = _zoo(4, shape=(9, 9), dtype=torch.float16, seed=9)
    name, dens = "blocks.3.attn.qkv.weight", 0.6
    b = base.double().reshape(-1)
    sparse = []
    for k, m in enumerate(models):
        keep = torch.from_numpy(rng.keep_mask(0, k, name, dens, 0, b.numel()))
        sparse.append(torch.where(keep, (m.double().reshape(-1) - b) / dens, torch.zeros_like(b)))
    w = [0.4, 0.3, 0.2, 0.1]
    s = sum(x * wk for x, wk in zip(sparse, w))
    plus = s >= 0
    num = sum(torch.where(torch.where(plus, x > 0, x < 0), x * wk, torch.zeros_like(x)) for x, wk in zip(sparse, w))
    want = b + num  # mergekit's dare_ties default: no normalization
    out = R.dare_ties(base, models, w, density=dens, name=name, dtype=torch.float64)
    assert torch.equal(out.reshape(-1), want)


# --- breadcrumbs ---------------------------------------------------------------------------------------

def test_breadcrumbs_worked_example():
    base = torch.zeros(10, dtype=torch.float64)
    d = torch.tensor([0.5, 5.0, 0.0, 3.0, 0.25, 4.0, 0.1, 2.0, 1.0, 0.0], dtype=torch.float64)
    # n_keep = 5, n_top = 1: drop 5, keep 4, 3, 2, 1, 0.5
    want = torch.tensor([0.5, 0, 0, 3.0, 0, 4.0, 0, 2.0, 1.0, 0], dtype=torch.float64)
    assert torch.equal(R.breadcrumbs(base, [d], density=0.5, gamma=0.1), want)
    # gamma * numel = 0.5 < 1: nothing dropped from the top, the top 5 kept (mergekit keeps none here)
    want = torch.tensor([0, 5.0, 0, 3.0, 0, 4.0, 0, 2.0, 1.0, 0], dtype=torch.float64)
    assert torch.equal(R.breadcrumbs(base, [d], density=0.5, gamma=0.05), want)
    # overlap: density 0.95 -> n_keep 9, gamma 0.2 -> n_top 2, shrunk to 1
    assert R.breadcrumbs(base, [d], density=0.95, gamma=0.2).tolist() == [0.5, 0, 0, 3.0, 0.25, 4.0, 0.1, 2.0, 1.0, 0]


def test_breadcrumbs_ties_uses_the_band_then_elects():
    base = torch.zeros(4, dtype=torch.float64)
    a, b = torch.tensor([9.0, 2.0, -1.0, 0.5]), torch.tensor([-3.0, -2.5, 1.5, 8.0])
    # n_top = floor(0.25 * 4) = 1, n_keep = 2: a -> [0, 2, -1, 0], b -> [-3, -2.5, 0, 0]
    # sums [-3, -0.5, -1, 0] -> -, -, -, +; agreeing: [-3], [-2.5], [-1], none
    out = R.breadcrumbs_ties(base, [a, b], density=0.5, gamma=0.25)
    assert out.tolist() == [-3.0, -2.5, -1.0, 0.0]
    assert R.breadcrumbs_ties(base, [a, b], density=0.5, gamma=0.25, normalize=True).tolist() == [-3.0, -2.5, -1.0, 0.0]
    assert R.breadcrumbs(base, [a, b], density=0.5, gamma=0.25).tolist() == [-3.0, -0.5, -1.0, 0.0]


# --- SLERP ---------------------------------------------------------------------------------------------

def _mergekit_slerp(t, v0, v1):
    """mergekit/merge_methods/slerp.py's formula, in float64 numpy."""
    a, b = v0.ravel(), v1.ravel()
    n0, n1 = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.sum((a / n0) * (b / n1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin(th - th * t) / np.sin(th) * v0 + np.sin(th * t) / np.sin(th) * v1


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_slerp_matches_mergekits_formula(dtype):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(33, 7, generator=g).to(dtype), torch.randn(33, 7, generator=g).to(dtype)
    for t in (0.0, 0.3, 0.5, 1.0):
        out = R.slerp(a, b, t, dtype=torch.float64)
        want = _mergekit_slerp(t, a.double().numpy(), b.double().numpy())
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-13)
        assert R.slerp(a, b, t).dtype == dtype
    assert torch.equal(R.slerp(a, b, 0.0), a) and torch.equal(R.slerp(a, b, 1.0), b)  # the endpoints exactly


def test_slerp_coefficients():
    assert R.slerp_coefficients(1.0, 0.0, 1.0, 0.5) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)), abs=1e-15)
    assert R.slerp_coefficients(1.0, 0.9999, 1.0, 0.25) == (0.75, 0.25)  # |cos| > 0.9995: lerp
    assert R.slerp_coefficients(1.0, -1.0, 1.0, 0.25) == (0.75, 0.25)
    assert R.slerp_coefficients(0.0, 0.0, 1.0, 0.25) == (0.75, 0.25)  # a zero vector: lerp
    unit = R.slerp(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), 0.3)
    assert math.isclose(unit.norm().item(), 1.0, rel_tol=1e-15)  # stays on the sphere
    assert math.isclose(math.atan2(unit[1].item(), unit[0].item()), 0.3 * math.pi / 2, rel_tol=1e-14)


def test_slerp_with_a_base_interpolates_task_vectors():
    base, (a, b) = _zoo(2, dtype=torch.float32, seed=2)
    out = R.slerp(a, b, 0.4, base=base, dtype=torch.float64)
    da, db = a.double() - base.double(), b.double() - base.double()
    s0, s1 = R.slerp_coefficients(R.exact_dot(da, da), R.exact_dot(da, db), R.exact_dot(db, db), 0.4)
    want = R.weighted_sum([base, a, b], [1.0 - math.fsum([s0, s1]), s0, s1], torch.float64)  # the engine's form
    assert torch.equal(out, want)
    torch.testing.assert_close(out, base.double() + (da * s0 + db * s1), rtol=1e-15, atol=1e-15)  # the delta form


# --- Model Stock ---------------------------------------------------------------------------------------

def test_model_stock_worked_example():
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    d1, d2 = _t([1.0, 0.0], [0.5, math.sqrt(3) / 2])  # cos = 0.5 (to rounding)
    t = 2 * 0.5 / (1 + 0.5)
    out = R.model_stock(base, [base + d1, base + d2])
    mean = ((base + d1) + (base + d2)) / 2
    torch.testing.assert_close(out, t * mean + (1 - t) * base, rtol=1e-15, atol=0)
    assert R.model_stock_t(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)) == 2 * 0.5 / (1 + 0.5)


def test_model_stock_t_clamps():
    # two opposite task vectors: c = -1, mergekit divides by zero; here t = 0 and the result is the base
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)
    d = torch.tensor([0.5, -0.25, 1.0])
    assert torch.equal(R.model_stock(base, [base + d, base - d]), base)
    assert R.model_stock_t(torch.tensor([[1.0, -0.2, 0.0], [-0.2, 1.0, 0.0], [0.0, 0.0, 1.0]])) == 0.0  # c < 0
    assert R.model_stock_t(torch.tensor([[4.0, 4.0], [4.0, 4.0]])) == 1.0  # identical directions: t = 1
    assert R.model_stock_t(torch.tensor([[0.0, 0.0], [0.0, 1.0]])) == 0.0  # a zero task vector: cos 0
    c = (0.3 + 0.6 + 0.9) / 3
    g = torch.tensor([[1.0, 0.3, 0.6], [0.3, 1.0, 0.9], [0.6, 0.9, 1.0]], dtype=torch.float64)
    assert R.model_stock_t(g) == 3 * c / (1 + 2 * c)  # the same float64 operations


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_model_stock_rounds_once(dtype):
    base, models = _zoo(4, dtype=dtype, seed=4)
    shared = _zoo(1, dtype=torch.float64, seed=40)[1][0] - _zoo(1, dtype=torch.float64, seed=40)[0]
    models = [(m.double() + 2 * shared).to(dtype) for m in models]  # task vectors that agree: 0 < t < 1
    t = R.model_stock_t(torch.tensor([[R.exact_dot(a.double() - base.double(), b.double() - base.double())
                                       for b in models] for a in models], dtype=torch.float64))
    assert 0.0 < t < 1.0
    total = torch.zeros(base.shape, dtype=torch.float64)
    for m in models:
        total = total + m.double()
    want = R.weighted_sum([base, *models], [1 - t] + [t / 4] * 4, dtype)  # the engine's form: one weighted sum
    assert torch.equal(R.model_stock(base, models), want)
    mean_form = R._round_to(((total / 4) * t + base.double() * (1 - t)).reshape(-1), dtype).reshape(base.shape)
    assert int(R.ulp_distance(R.model_stock(base, models), mean_form).max()) <= (16 if dtype == torch.float64 else 1)


# --- state dicts, errors -------------------------------------------------------------------------------

def test_merge_state_dicts_every_method():
    base, models = _zoo(3, dtype=torch.float32, seed=6)
    sd_base = {"a.weight": base, "step": torch.tensor(5)}
    sds = [{"a.weight": m, "step": torch.tensor(9)} for m in models]
    w = [0.5, 0.3, 0.2]
    cases = {
        "task_arithmetic": dict(weights=w), "ties": dict(weights=w, density=0.5),
        "dare_linear": dict(weights=w, density=0.5, seed=3), "dare_ties": dict(weights=w, density=0.5, seed=3),
        "breadcrumbs": dict(weights=w, density=0.5, gamma=0.1), "breadcrumbs_ties": dict(weights=w, density=0.5),
        "model_stock": {},
    }
    for method, kw in cases.items():
        out = R.merge_state_dicts(method, sds, sd_base, **kw)
        extra = {"name": "a.weight"} if method.startswith("dare") else {}
        fn = getattr(R, method)
        want = fn(base, models, **kw, **extra) if method != "model_stock" else fn(base, models)
        assert torch.equal(out["a.weight"], want), method
        assert torch.equal(out["step"], torch.tensor(5))
    out = R.merge_state_dicts("slerp", sds[:2], t=0.3)
    assert torch.equal(out["a.weight"], R.slerp(models[0], models[1], 0.3)) and out["step"].item() == 9


@pytest.mark.parametrize("call,match", [
    (lambda b, m: R.ties(b, [m[0], m[1][:3]]), "shape"),
    (lambda b, m: R.ties(b, [m[0].long()]), "dtype"),
    (lambda b, m: R.ties(b, m, density=1.5), "density"),
    (lambda b, m: R.ties(b, m, density=[0.5]), "2 models"),
    (lambda b, m: R.ties(b, m, rescale="density"), "rescale"),
    (lambda b, m: R.dare_linear(b, m, density=-0.1, name="x"), "density"),
    (lambda b, m: R.dare_linear(b, m, rescale="l2", name="x"), "rescale"),
    (lambda b, m: R.dare_linear(b, m, seed=-1, name="x"), "seed"),
    (lambda b, m: R.breadcrumbs(b, m, gamma=2.0), "gamma"),
    (lambda b, m: R.model_stock(b, m[:1]), "at least 2"),
    (lambda b, m: R.task_arithmetic(b, []), "no models"),
    (lambda b, m: R.slerp(m[0], m[1], float("nan")), "finite"),
    (lambda b, m: R.task_arithmetic(b, m, dtype=torch.int32), "floating"),
])
def test_bad_arguments_are_value_errors(call, match):
    base, models = _zoo(2, shape=(4, 4))
    with pytest.raises(ValueError, match=match):
        call(base, models)
