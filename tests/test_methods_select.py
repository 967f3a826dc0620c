"""The exact bounded-memory top-k of TIES and breadcrumbs (fastsoup.methods.select, two-pass radix
select on float32 bit patterns) against the sort-based exact top-k of fastsoup._reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsoup import _reference as R
from fastsoup.methods import select as S


def _sorted_top_k(delta: np.ndarray, k: int) -> np.ndarray:
    return R.top_k_mask(torch.from_numpy(delta), k).numpy()


def _check(delta: np.ndarray, k: int, chunk: int = 1 << 20):
    keys = S.magnitude_keys(delta)
    assert np.array_equal(keys.astype(np.int64), R.magnitude_keys(torch.from_numpy(delta)).numpy())
    mask = S.top_k_mask(keys, k, chunk=chunk)
    assert mask.sum() == k
    assert np.array_equal(mask, _sorted_top_k(delta, k))
    t, m = S.radix_select(keys, k, chunk=chunk)
    if k:
        assert (keys > t).sum() + m == k and 1 <= m <= (keys == t).sum()
        at = np.nonzero(keys == t)[0]
        assert mask[at[:m]].all() and not mask[at[m:]].any()  # lower index first at the threshold
    else:
        assert (t, m) == (S.NOTHING, 0)


CASES = {
    "normal-odd": lambda r: r.standard_normal(10_007),
    "many-equal": lambda r: r.integers(-3, 4, 5_001).astype(np.float64),
    "all-zero": lambda r: np.zeros(1_000),
    "one": lambda r: np.array([-2.5]),
    "signed-zeros": lambda r: np.array([0.0, -0.0, 0.0, -0.0, 1.0, -1.0]),
    "same-high-bits": lambda r: (1.0 + r.integers(0, 300, 4_099) * 2.0**-23),  # one high bin, ties in the low
    "tiny-and-huge": lambda r: np.concatenate([r.standard_normal(500) * 1e-42, r.standard_normal(500) * 1e38,
                                               [np.inf, -np.inf, 1e300, -1e300]]),  # subnormal, overflow
    "float16-like": lambda r: torch.randn(3_001).half().double().numpy() - torch.randn(3_001).half().double().numpy(),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_radix_select_equals_sorted_top_k(case):
    delta = CASES[case](np.random.default_rng(len(case)))
    n = delta.size
    for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}):
        if 0 <= k <= n:
            _check(delta, k)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_passes_give_the_same_selection(chunk):
    delta = np.random.default_rng(1).integers(-5, 6, 3_333).astype(np.float64)
    for k in (0, 1, 1000, 3_333):
        _check(delta, k, chunk=chunk)


def test_ties_at_threshold_keep_lower_indices():
    delta = np.array([1.0, 3.0, 2.0, 2.0, -2.0, 2.0, 0.5])
    keys = S.magnitude_keys(delta)
    assert S.top_k_mask(keys, 3).tolist() == [False, True, True, True, False, False, False]
    assert S.radix_select(keys, 3) == (int(np.float32(2.0).view(np.uint32)), 2)


def test_nan_ranks_above_infinity():
    delta = np.array([np.inf, np.nan, 1.0, -np.nan])
    keys = S.magnitude_keys(delta)
    assert keys[1] == keys[3] == S.NAN_KEY
    assert S.top_k_mask(keys, 2).tolist() == [False, True, False, True]
    assert np.array_equal(S.top_k_mask(keys, 2), _sorted_top_k(delta, 2))


def test_trim_and_breadcrumbs_counts():
    assert S.trim_count(10, 0.3) == 3
    assert S.trim_count(100, 0.29) == 28  # 0.29 * 100 = 28.999999999999996 in float64: floor, as mergekit's int()
    assert S.trim_count(7, 1.0) == 7 and S.trim_count(7, 0.0) == 0
    assert S.breadcrumbs_counts(1000, 0.9, 0.01) == (10, 900)
    assert S.breadcrumbs_counts(50, 0.9, 0.01) == (0, 45)  # gamma * numel < 1: nothing dropped from the top
    assert S.breadcrumbs_counts(100, 0.95, 0.1) == (5, 95)  # overlap: n_top shrinks to numel - n_keep


@pytest.mark.parametrize("n,density,gamma", [(1000, 0.5, 0.05), (50, 0.9, 0.01), (100, 0.95, 0.1), (1, 1.0, 0.5),
                                             (333, 0.0, 0.2)])
def test_band_mask_matches_reference_breadcrumbs(n, density, gamma):
    delta = np.random.default_rng(n).integers(-20, 21, n).astype(np.float64)
    n_top, n_keep = S.breadcrumbs_counts(n, density, gamma)
    mask = S.band_mask(S.magnitude_keys(delta), n_top, n_keep, chunk=64)
    assert mask.sum() == n_keep
    assert np.array_equal(mask, R.breadcrumbs_mask(torch.from_numpy(delta), density, gamma).numpy())


def test_reference_ties_trim_uses_floor():
    d = torch.arange(100, dtype=torch.float64)
    assert int(R.ties_trim_mask(d, 0.29).sum()) == 28


@pytest.mark.parametrize("k", [-1, 11])
def test_k_out_of_range_is_a_value_error(k):
    with pytest.raises(ValueError, match="outside"):
        S.radix_select(np.zeros(10, dtype=np.uint32), k)


def test_keys_must_be_uint32():
    with pytest.raises(ValueError, match="uint32"):
        S.radix_select(np.zeros(10, dtype=np.float32), 1)
