"""The counter-based random numbers of DARE's drop masks: a pure function of (seed, model index,
tensor name, element index), vectorized in numpy. The native CPU and CUDA code must produce the same
bits; ``fastsoup._reference.dare_keep_mask`` is an independent torch implementation of the same spec.

Spec (all arithmetic on unsigned 64-bit integers, modulo 2^64; ``^`` is XOR, ``>>`` a logical shift)::

    GAMMA = 0x9E3779B97F4A7C15                      # SplitMix64's increment (Steele, Lea, Flood 2014)
    mix64(z):                                       # SplitMix64's output function (Stafford's "Mix13")
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)
    splitmix64(x) = mix64(x + GAMMA)                # the first output of SplitMix64 seeded with x
    fnv1a64(name):                                  # FNV-1a, 64 bits, over the UTF-8 bytes of the name
        h = 0xCBF29CE484222325
        for each byte b: h = (h ^ b) * 0x100000001B3
        return h
    key(seed, model, name) = splitmix64(splitmix64(splitmix64(seed) ^ model) ^ fnv1a64(name))
    bits(key, i)  = mix64(key + (i + 1) * GAMMA)    # output i (0-based) of SplitMix64 seeded with key
    u53(i)        = bits(key, i) >> 11              # a 53-bit integer, uniform on [0, 2^53)
    uniform(i)    = u53(i) * 2^-53                  # exactly representable: a float64 in [0, 1)
    keep(i)       = u53(i) < T,  T = ceil(density * 2^53)   # i.e. uniform(i) < density, exactly

* ``seed``: an integer in [0, 2^64). ``model``: the model's position among the merged models other
  than the base (0-based). ``name``: the tensor's name as stored in the checkpoint. ``i``: the element's
  flat (row-major) index in the tensor.
* Element i's bits depend on i alone, not on how the tensor is cut into chunks, threads, devices or
  shards: a kernel processing elements [start, start + n) computes ``bits(key, start + j)`` directly
  (SplitMix64 is a counter: its state after i steps is ``key + i * GAMMA``).
* The keep decision compares integers: ``T`` is exact (``density * 2^53`` is a power-of-two scaling of a
  float64, so ``ceil`` of it is the exact integer), and every platform gets the same decision; the keep
  probability is T / 2^53, within 2^-53 of ``density``. density 0 keeps nothing, density 1 keeps all.
* Why these pieces: SplitMix64 passes BigCrush, needs only 64-bit multiplies, shifts and XOR (plain C++,
  and CUDA's native 64-bit integer ops), and jumps to any counter for free; FNV-1a 64 is a few lines in
  any language and byte-order free. Streams of two keys overlap only when the keys differ by a multiple
  of GAMMA smaller than the tensors' sizes times GAMMA: for 64-bit keys from the mix, a chance of about
  numel / 2^64 per pair of tensors.
"""

from __future__ import annotations

import math

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

__all__ = ["GAMMA", "bits", "fnv1a64", "keep_mask", "keep_threshold", "mix64", "splitmix64",
           "stream_key", "u53", "uniform"]


def mix64(z: int) -> int:
    """SplitMix64's output function of a 64-bit integer (a bijection; ``mix64(0) == 0``)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK64
    return z ^ (z >> 31)


def splitmix64(x: int) -> int:
    """The first output of SplitMix64 seeded with ``x``: ``mix64(x + GAMMA)``."""
    return mix64((x + GAMMA) & MASK64)


def fnv1a64(name: str) -> int:
    """FNV-1a 64-bit hash of the UTF-8 bytes of ``name``."""
    h = FNV_OFFSET
    for b in name.encode("utf-8"):
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def _check_u64(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"dare rng: {what} must be an integer, got {value!r}")
    value = int(value)
    if not 0 <= value <= MASK64:
        raise ValueError(f"dare rng: {what} must be in [0, 2^64), got {value}")
    return value


def stream_key(seed: int, model_index: int, name: str) -> int:
    """The 64-bit key of one model's tensor: ``splitmix64(splitmix64(splitmix64(seed) ^ model) ^ fnv1a64(name))``.

    Raises:
        ValueError: ``seed`` or ``model_index`` is not an integer in [0, 2^64).
    """
    seed = _check_u64(seed, "seed")
    model_index = _check_u64(model_index, "model index")
    return splitmix64(splitmix64(splitmix64(seed) ^ model_index) ^ fnv1a64(name))


def _range(start: int, count: int) -> np.ndarray:
    start = _check_u64(start, "start")
    if count < 0:
        raise ValueError(f"dare rng: count must be >= 0, got {count}")
    return np.arange(count, dtype=np.uint64) + np.uint64(start)


def bits(key: int, start: int, count: int) -> np.ndarray:
    """``bits(key, i)`` for i in [start, start + count): uint64, ``mix64(key + (i + 1) * GAMMA)``."""
    i = _range(start, count)
    with np.errstate(over="ignore"):
        z = (i + np.uint64(1)) * np.uint64(GAMMA) + np.uint64(_check_u64(key, "key"))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX_1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX_2)
        return z ^ (z >> np.uint64(31))


def u53(seed: int, model_index: int, name: str, start: int, count: int) -> np.ndarray:
    """The 53-bit integers ``bits >> 11`` of elements [start, start + count) (uint64)."""
    return bits(stream_key(seed, model_index, name), start, count) >> np.uint64(11)


def uniform(seed: int, model_index: int, name: str, start: int, count: int) -> np.ndarray:
    """The uniforms ``u53 * 2^-53`` in [0, 1) of elements [start, start + count) (float64, exact)."""
    return np.ldexp(u53(seed, model_index, name, start, count).astype(np.float64), -53)


def keep_threshold(density: float) -> int:
    """``T = ceil(density * 2^53)``: element i is kept when ``u53(i) < T``.

    Raises:
        ValueError: ``density`` is not a number in [0, 1].
    """
    d = float(density)
    if not 0.0 <= d <= 1.0:  # NaN fails too
        raise ValueError(f"dare: density must be in [0, 1], got {density!r}")
    return math.ceil(math.ldexp(d, 53))


def keep_mask(seed: int, model_index: int, name: str, density: float, start: int, count: int) -> np.ndarray:
    """DARE's keep mask of elements [start, start + count) of one model's tensor (bool): each kept
    with probability ``density`` (exactly ``ceil(density * 2^53) / 2^53``).

    Example:
        >>> keep_mask(0, 0, "model.layers.0.mlp.up_proj.weight", 0.5, 0, 8).tolist()  # doctest: +SKIP
    """
    return u53(seed, model_index, name, start, count) < np.uint64(keep_threshold(density))
