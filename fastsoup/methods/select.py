"""Exact, bounded-memory top-k selection by magnitude: what the native TIES and breadcrumbs trims do,
written in numpy (the spec the native code matches bit for bit; ``fastsoup._reference`` has the
sort-based oracle).

The order. Entry i of a task vector δ (float64, ``θ_k - θ_base``) has the key::

    key_i = the IEEE-754 bits, as an unsigned 32-bit integer, of float32(|δ_i|)
            (float64 -> float32 rounds to nearest even, overflows to +inf; every NaN gets 0x7FC00000)

For non-negative floats the bit patterns order like the values, so the keys order the entries by
magnitude (+inf above every finite value, NaN above +inf). Entries are ranked by key descending, then
by flat index ascending: **at the threshold, the lower index is kept first**. The top k are the first k
of that total order, so the sets are nested: top(k) is a subset of top(k + 1).

The selection (two passes over the keys, memory 2^16 counters whatever the tensor's size)::

    pass 1: hist[key >> 16] += 1                        (65 536 bins of the high 16 bits)
            walk the bins from 0xFFFF down: the bin b where the running count first reaches k;
            r = k - (entries in bins above b)           (1 <= r <= hist[b])
    pass 2: hist[key & 0xFFFF] += 1 for keys with key >> 16 == b
            walk down again: the low half l where the running count first reaches r;
            m = r - (entries of bin b with a low half above l)
    result: T = (b << 16) | l, and m: keep every key > T and the first m entries (lowest indices)
            with key == T; exactly k are kept. k = 0 gives (T, m) = (0xFFFFFFFF, 0): nothing kept.

Applying it is a third pass in index order with one counter (the entries equal to T seen so far); a
parallel implementation counts the entries equal to T per chunk and prefix-sums those counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

BINS = 1 << 16
NAN_KEY = 0x7FC00000
NOTHING = 0xFFFFFFFF  # the threshold of k = 0: above every key
DEFAULT_CHUNK = 1 << 20

__all__ = ["band_mask", "breadcrumbs_counts", "magnitude_keys", "radix_select", "top_k_mask",
           "trim_count"]


def magnitude_keys(delta: np.ndarray) -> np.ndarray:
    """The selection keys of a task vector: uint32 bits of float32(|δ|), NaN -> 0x7FC00000 (flat)."""
    d = np.asarray(delta).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        mag = np.abs(d).astype(np.float32)
    keys = mag.view(np.uint32).copy()
    keys[np.isnan(mag)] = NAN_KEY
    return keys


def _chunks(keys: np.ndarray, chunk: int) -> Iterable[np.ndarray]:
    """The keys in consecutive chunks of ``chunk`` (the last may be shorter)."""
    for start in range(0, keys.size, chunk):
        yield keys[start:start + chunk]


def _walk_down(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """Walking the bins from the top: the bin b where the running count first reaches ``rank``
    (``above[b] < rank <= above[b] + hist[b]``), and ``above[b]``, the count of the bins above it."""
    above = np.cumsum(hist[::-1])[::-1] - hist  # entries in the bins strictly above each bin
    b = int(np.nonzero((above < rank) & (above + hist >= rank))[0][-1])
    return b, int(above[b])


def radix_select(keys: np.ndarray, k: int, *, chunk: int = DEFAULT_CHUNK) -> tuple[int, int]:
    """The threshold of the top ``k`` keys and how many entries at it to keep (lowest indices first).

    Args:
        keys: uint32 keys (``magnitude_keys``), any length.
        k: how many to keep, 0 <= k <= keys.size.
        chunk: the pass reads the keys in chunks of this many (the memory bound: two 2^16 histograms).

    Returns:
        ``(T, m)``: the kept entries are those with key > T and the first m with key == T.

    Raises:
        ValueError: k outside [0, keys.size], or keys not uint32.
    """
    keys = np.asarray(keys).reshape(-1)
    if keys.dtype != np.uint32:
        raise ValueError(f"radix_select: keys have dtype {keys.dtype}, expected uint32")
    n = keys.size
    if isinstance(k, bool) or not 0 <= int(k) <= n:
        raise ValueError(f"radix_select: k = {k} is outside [0, {n}]")
    k = int(k)
    if k == 0:
        return NOTHING, 0
    hist = np.zeros(BINS, dtype=np.int64)
    for c in _chunks(keys, chunk):
        hist += np.bincount(c >> np.uint32(16), minlength=BINS)
    hi, above_hi = _walk_down(hist, k)
    r = k - above_hi
    hist[:] = 0
    for c in _chunks(keys, chunk):
        hist += np.bincount(c[(c >> np.uint32(16)) == hi] & np.uint32(0xFFFF), minlength=BINS)
    lo, above_lo = _walk_down(hist, r)
    return (hi << 16) | lo, r - above_lo


def top_k_mask(keys: np.ndarray, k: int, *, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """The bool mask of the top ``k`` keys (key descending, lower index first at ties), applied chunk
    by chunk with one running count of the entries at the threshold."""
    keys = np.asarray(keys).reshape(-1)
    t, m = radix_select(keys, k, chunk=chunk)
    out = np.empty(keys.size, dtype=bool)
    seen = 0  # entries equal to T before this chunk
    for start in range(0, keys.size, chunk):
        c = keys[start:start + chunk]
        eq = c == np.uint32(t)
        rank = seen + np.cumsum(eq)  # 1-based rank among the entries equal to T
        out[start:start + c.size] = (c > np.uint32(t)) | (eq & (rank <= m))
        seen += int(eq.sum())
    return out


def _check_fraction(value: float, what: str) -> float:
    """``value`` as a float in [0, 1] (NaN refused), else ValueError naming ``what``."""
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return v


def trim_count(numel: int, density: float) -> int:
    """How many entries TIES keeps: ``floor(density * numel)`` (the float64 product, as mergekit's
    ``int(density * numel)``); density 1 keeps all."""
    return min(numel, math.floor(_check_fraction(density, "density") * numel))


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top, n_keep)`` of breadcrumbs: drop the ``n_top = floor(gamma * numel)`` largest, keep the
    next ``n_keep = floor(density * numel)``; when they overlap the end (n_top + n_keep > numel),
    n_top shrinks to numel - n_keep (mergekit's rule). n_top = 0 keeps the top n_keep (mergekit's empty
    slice, which keeps nothing, is not copied)."""
    n_keep = trim_count(numel, density)
    n_top = min(numel, math.floor(_check_fraction(gamma, "gamma") * numel))
    return min(n_top, numel - n_keep), n_keep


def band_mask(keys: np.ndarray, n_top: int, n_keep: int, *, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Ranks [n_top, n_top + n_keep) of the order: ``top(n_top + n_keep)`` minus ``top(n_top)``."""
    return top_k_mask(keys, n_top + n_keep, chunk=chunk) & ~top_k_mask(keys, n_top, chunk=chunk)
