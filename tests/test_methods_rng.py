"""DARE's counter-based RNG (fastsoup.methods.rng, and the torch re-implementation in
fastsoup._reference): published test vectors of its pieces, golden values of the whole written down
once, independence from chunking, and the kept fraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastsoup import _reference as R
from fastsoup.methods import rng

M64 = (1 << 64) - 1


def _spec_bits(seed: int, model: int, name: str, i: int) -> int:
    """The spec, one element at a time on Python integers (the formula of fastsoup/methods/rng.py):
    key = sm(sm(sm(seed) ^ model) ^ fnv1a64(utf8(name))), sm(x) = mix(x + G);
    bits(i) = mix(key + (i + 1) * G); mix = SplitMix64's output function."""
    g = 0x9E3779B97F4A7C15

    def mix(z):
        z &= M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    h = 0xCBF29CE484222325
    for b in name.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & M64
    key = mix((mix(seed + g) ^ model) + g)
    key = mix((key ^ h) + g)
    return mix(key + (i + 1) * g)


def test_splitmix64_published_vectors():
    # SplitMix64 seeded with 0 (Vigna's splitmix64.c): its first three outputs.
    assert [int(x) for x in rng.bits(0, 0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert rng.splitmix64(0) == 0xE220A8397B1DCDAF
    assert rng.mix64(0) == 0


def test_fnv1a64_published_vectors():
    # The FNV reference test vectors (Fowler/Noll/Vo): "", "a", "foobar".
    assert rng.fnv1a64("") == 0xCBF29CE484222325
    assert rng.fnv1a64("a") == 0xAF63DC4C8601EC8C
    assert rng.fnv1a64("foobar") == 0x85944171F73967E8


GOLDEN = [  # (seed, model index, tensor name) -> fnv1a64(name), key, bits of elements 0, 1, 2 and 10^9
    ((0, 0, "model.layers.0.mlp.up_proj.weight"), 0xBB99F1CAD1E26788, 0xE8D092F7F4F4413B,
     [0xA7034EC6B0EE28E8, 0x6E606DFB48912B03, 0x0C7D078CE62C4C19], 0xA9AC2F6A736A9252),
    ((42, 3, "h.1.attn.c_attn.weight"), 0x8FA98121EC38C920, 0xDC3ED8FC3167B7C3,
     [0x2F41B4F994F8158C, 0x6ADAB9457FF8709D, 0x4D4CA640F35CE27E], 0x249120C74E9060F4),
    ((2**64 - 1, 1, "blocks.0.é"), 0xBBD076A9B8D7D4CD, 0x3B3149B5BD3ADA44,
     [0x7A7B3D9687AE2F6F, 0x11C4EB7CEF72D1E9, 0x4E40012D238D36ED], 0x1E42EA4364A24B48),
]


@pytest.mark.parametrize("case", GOLDEN, ids=["seed0", "seed42-model3", "seedmax-utf8"])
def test_golden_values(case):
    (seed, model, name), h, key, first, billionth = case
    assert rng.fnv1a64(name) == h
    assert rng.stream_key(seed, model, name) == key == R.dare_stream_key(seed, model, name)
    assert [int(x) for x in rng.bits(key, 0, 3)] == first == [_spec_bits(seed, model, name, i) for i in range(3)]
    assert int(rng.bits(key, 10**9, 1)[0]) == billionth == _spec_bits(seed, model, name, 10**9)
    assert [int(x) for x in rng.u53(seed, model, name, 0, 3)] == [b >> 11 for b in first]
    assert R.dare_u53(seed, model, name, 3).tolist() == [b >> 11 for b in first]
    assert R.dare_u53(seed, model, name, 1, start=10**9).tolist() == [billionth >> 11]
    assert rng.uniform(seed, model, name, 0, 3).tolist() == [math.ldexp(b >> 11, -53) for b in first]


def test_numpy_and_torch_implementations_agree():
    for seed, model, name in [(0, 0, "a"), (7, 2, "model.embed_tokens.weight"), (2**63 + 5, 2**40, "x" * 300)]:
        a = rng.u53(seed, model, name, 123, 5000)
        b = R.dare_u53(seed, model, name, 5000, start=123).numpy().astype(np.uint64)
        assert np.array_equal(a, b)


def test_independent_of_chunking():
    seed, model, name, n = 11, 4, "model.layers.7.self_attn.q_proj.weight", 10007
    whole = rng.u53(seed, model, name, 0, n)
    for cut in [1, 2, 64, 1000, 4099]:
        parts = [rng.u53(seed, model, name, s, min(cut, n - s)) for s in range(0, n, cut)]
        assert np.array_equal(np.concatenate(parts), whole)
    # out-of-order and overlapping ranges give the same bits at the same indices
    assert np.array_equal(rng.u53(seed, model, name, 5000, 10), whole[5000:5010])
    mask = rng.keep_mask(seed, model, name, 0.3, 0, n)
    assert np.array_equal(np.concatenate([rng.keep_mask(seed, model, name, 0.3, s, 333) for s in range(0, n, 333)])[:n],
                          mask)


def test_keys_differ_by_seed_model_and_name():
    keys = {rng.stream_key(s, m, n) for s in (0, 1) for m in (0, 1) for n in ("a", "b", "a.weight")}
    assert len(keys) == 12


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_density(density):
    n = 200_000
    kept = rng.keep_mask(3, 1, "t", density, 0, n).mean()
    assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / n)  # 5 sigma
    tmask = R.dare_keep_mask(3, 1, "t", (400, 500), density)
    assert np.array_equal(tmask.reshape(-1).numpy(), rng.keep_mask(3, 1, "t", density, 0, n))


def test_threshold_is_exact():
    assert rng.keep_threshold(0.0) == 0
    assert rng.keep_threshold(1.0) == 2**53
    assert rng.keep_threshold(0.5) == 2**52
    assert rng.keep_threshold(0.1) == math.ceil(0.1 * 2**53)  # 0.1 * 2^53 is not an integer
    assert rng.keep_mask(0, 0, "t", 1.0, 0, 1000).all() and not rng.keep_mask(0, 0, "t", 0.0, 0, 1000).any()
    # keep iff uniform < density, exactly: the two formulations agree on every element
    u = rng.uniform(5, 0, "t", 0, 10000)
    for d in (0.25, 0.3, 1 / 3):
        assert np.array_equal(u < d, rng.keep_mask(5, 0, "t", d, 0, 10000))


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True])
def test_bad_seed_is_a_value_error(bad):
    with pytest.raises(ValueError, match="seed"):
        rng.stream_key(bad, 0, "t")


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan")])
def test_bad_density_is_a_value_error(bad):
    with pytest.raises(ValueError, match="density"):
        rng.keep_threshold(bad)
