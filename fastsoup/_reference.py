"""Plain-torch references of every native primitive: the oracles the tests compare against.

Never used as a fallback for a missing or broken native build.

``weighted_sum`` follows the order documented in csrc/include/fastsoup/kernels.h operation by
operation (so the tests can ask for the same bits): the sum in float64 (compensated when an
operand is float64), divided once by ``divisor``, rounded once to the output dtype.
``exact_weighted_mean`` is the other kind of oracle: the exact value, in rational arithmetic,
rounded once, to measure how far any implementation is from it (``ulp_distance``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

import numpy as np
import torch

_SPLIT = 134217729.0  # 2^27 + 1: Dekker's splitting constant for binary64


def _two_product_error(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """a * b - p exactly, for p = a * b rounded (Dekker; what the kernels' fma(a, b, -p) gives, for
    products far from float64's overflow and underflow thresholds)."""
    t = a * _SPLIT
    ah = t - (t - a)
    al = a - ah
    t = b * _SPLIT
    bh = t - (t - b)
    bl = b - bh
    return (((ah * bh - p) + ah * bl) + al * bh) + al * bl


def _two_sum(a: torch.Tensor, b: torch.Tensor):
    t = a + b
    z = t - a
    return t, (a - (t - z)) + (b - z)


def _fma_sum(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fma(a, b, y) = round(a * b + y), one rounding: the product as two doubles (Dekker), y plus
    its high part (TwoSum), and the low parts added rounded to odd, which makes the last addition
    the single rounding of the exact sum (Boldo and Melquiond's emulation)."""
    ph = a * b
    pl = _two_product_error(a, b, ph)
    t, err = _two_sum(y, ph)
    u, e2 = _two_sum(err, pl)
    even = (u.view(torch.int64) & 1) == 0
    u = torch.where((e2 != 0) & even, torch.nextafter(u, torch.where(e2 > 0, math.inf, -math.inf)), u)
    return t + u


def _round_to(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' one rounding of a float64 result: direct to float32/float64; to float16 and
    bfloat16 through float32 rounded to odd (the same as rounding the float64 value directly)."""
    if dtype == torch.float64:
        return acc.clone()
    f = acc.float()
    if dtype == torch.float32:
        return f
    back = f.double()
    bits = f.view(torch.int32)
    bits = (bits - (back.abs() > acc.abs()).int()) | (back != acc).int()
    return bits.view(torch.float32).to(dtype)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype,
                 accumulate_into: torch.Tensor | None = None, divisor: float = 1.0,
                 divisor_lo: float = 0.0) -> torch.Tensor:
    """``round(sum_k w_k * x_k / divisor)`` in the kernels' order (kernels.h): plain mode
    ``acc = acc + w_k * float64(x_k)`` from -0.0 (or ``accumulate_into``), or the compensated mode
    when an input or ``dtype`` is float64; then one division and one rounding. With
    ``accumulate_into`` (float32) the result stays float32, like the kernels' accumulate mode."""
    if accumulate_into is not None:
        shape = accumulate_into.shape
        start = accumulate_into.detach().double()
        dtype = torch.float32
    elif tensors:
        shape = tensors[0].shape
        start = torch.full(shape, -0.0, dtype=torch.float64)
    else:
        raise ValueError("weighted_sum reference: no tensors")
    xs = [t.detach().reshape(shape).double() for t in tensors]
    d = torch.full(shape, float(divisor), dtype=torch.float64)
    if dtype == torch.float64 or any(t.dtype == torch.float64 for t in tensors):
        s, c = start, torch.zeros(shape, dtype=torch.float64)
        for x, w in zip(xs, weights):
            wt = torch.full(shape, float(w), dtype=torch.float64)
            p = x * wt
            e = _two_product_error(x, wt, p)
            t = s + p
            z = t - s
            err = (s - (t - z)) + (p - z)
            s, c = t, c + (err + e)
        q = s / d
        r = (s - q * d) - _two_product_error(q, d, q * d)  # fma(-q, d, s): exact remainder
        lo = torch.full(shape, float(divisor_lo), dtype=torch.float64)
        corr = _fma_sum(y=r + c, a=-q, b=lo) / d
        exact_div = (c == 0) & (lo == 0)
        acc = torch.where(exact_div | ~torch.isfinite(q) | (corr == 0), q, q + corr)
    else:
        acc = start
        for x, w in zip(xs, weights):
            acc = acc + (x if float(w) == 1.0 else x * float(w))
        if float(divisor) != 1.0:
            acc = acc / d  # a tensor divisor: true division, never a product by a reciprocal
    return _round_to(acc, dtype)


def normalization(weights: Sequence[float] | None, k: int) -> tuple[list[float], float, float]:
    """What fastsoup.average passes the kernels: uniform -> weights 1 and divisor K; else the
    weights and their total as math.fsum plus the rest, scaled by one power of two (the largest
    weight in [1, 2)). Returns (weights, divisor, divisor_lo)."""
    if weights is None:
        return [1.0] * k, float(max(k, 1)), 0.0
    ws = [float(w) for w in weights]
    total = math.fsum(ws)
    rest = math.fsum([*ws, -total])
    shift = math.frexp(max(abs(w) for w in ws))[1] - 1
    return [math.ldexp(w, -shift) for w in ws], math.ldexp(total, -shift), math.ldexp(rest, -shift)


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What fastsoup.average computes: the weighted sum divided once by the weight total,
    integer/bool tensors copied from the first state dict."""
    ws, divisor, divisor_lo = normalization(weights, len(state_dicts))
    return combine_state_dicts(state_dicts, ws, dtype, divisor, divisor_lo)


def combine_state_dicts(state_dicts, ws, dtype=None, divisor=1.0, divisor_lo=0.0):
    out = {}
    for name, t0 in state_dicts[0].items():
        if t0.is_floating_point():
            out[name] = weighted_sum([sd[name] for sd in state_dicts], ws, dtype or t0.dtype, divisor=divisor,
                                     divisor_lo=divisor_lo)
        else:
            out[name] = t0.clone()
    return out


# ---------------------------------------------------------------------------------------------------
# The exact oracle

# significand bits (with the implicit one), smallest normal exponent, largest exponent
_FORMATS = {
    torch.float16: (11, -14, 15),
    torch.bfloat16: (8, -126, 127),
    torch.float32: (24, -126, 127),
    torch.float64: (53, -1022, 1023),
}


def _round_double(q: np.ndarray, dtype: torch.dtype):
    """q (float64) rounded to nearest even in dtype, as float64; and whether q is a midpoint of dtype."""
    p, emin, emax = _FORMATS[dtype]
    _, e = np.frexp(q)
    quantum = np.ldexp(1.0, np.maximum(e.astype(np.int64) - 1, emin) - (p - 1))  # the spacing at q
    scaled = q / quantum  # exact: a power of two
    r = np.rint(scaled) * quantum  # rint: ties to even
    tie = (scaled - np.floor(scaled)) == 0.5
    big = math.ldexp(2.0 - math.ldexp(1.0, 1 - p), emax)
    r = np.where(np.abs(r) > big, np.copysign(np.inf, q), r)
    return r, tie, quantum


def exact_weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None, dtype: torch.dtype,
                        divisor: float | None = None) -> torch.Tensor:
    """``sum_k w_k x_k / sum_k w_k`` computed exactly (integers and fractions), rounded once to
    ``dtype`` (nearest, ties to even). ``weights`` None: uniform; ``divisor``: divide by it instead
    of the weight total. Finite inputs only.
    """
    k = len(tensors)
    ws = [1.0] * k if weights is None else [float(w) for w in weights]
    shape = tensors[0].shape
    x = np.stack([t.detach().reshape(-1).double().numpy() for t in tensors])  # exact for every dtype
    if not np.all(np.isfinite(x)):
        raise ValueError("exact_weighted_mean: finite inputs only")
    m, e = np.frexp(x)
    mant = (m * 2.0**53).astype(np.int64)  # x = mant * 2^(e - 53), exactly
    expo = e.astype(np.int64) - 53
    wfrac = [Fraction(w) for w in ws]
    wexp = [-(f.denominator.bit_length() - 1) for f in wfrac]  # denominators are powers of two
    terms_exp = expo + np.array(wexp, dtype=np.int64)[:, None]
    low = int(terms_exp[mant != 0].min()) if np.any(mant != 0) else 0
    num = np.zeros(x.shape[1], dtype=object)
    for i in range(k):
        num = num + ((mant[i].astype(object) * wfrac[i].numerator) << (terms_exp[i] - low).astype(object))
    den = Fraction(divisor) if divisor is not None else sum(wfrac, Fraction(0))
    # value = num * 2^low / den = P / Q
    P = num * (den.denominator << max(low, 0))
    Q = den.numerator << max(-low, 0)
    if Q < 0:
        P, Q = -P, -Q
    q = np.array([int(a) / Q for a in P], dtype=np.float64)  # int / int: correctly rounded to float64
    if dtype == torch.float64:
        r = q
    else:
        # Rounding q again is the rounding of P/Q, except where q is a midpoint of dtype: there P/Q
        # is the midpoint itself (ties to even, as rint did) or beside it (compare exactly).
        r, tie, quantum = _round_double(q, dtype)
        for i in np.nonzero(tie)[0]:
            tn, td = float(q[i]).as_integer_ratio()
            cmp = int(P[i]) * td - tn * Q
            if cmp != 0:
                r[i] = q[i] + (quantum[i] / 2 if cmp > 0 else -quantum[i] / 2)
        r = np.where(np.abs(r) > math.ldexp(2.0 - math.ldexp(1.0, 1 - _FORMATS[dtype][0]), _FORMATS[dtype][2]),
                     np.copysign(np.inf, r), r)
    return torch.from_numpy(r).reshape(shape).to(dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (common) dtype lie between a and b: 0 for equal
    values (+0 and -0 included), 1 for neighbours. int64, elementwise."""
    if a.dtype != b.dtype:
        raise ValueError(f"ulp_distance: dtypes {a.dtype} and {b.dtype}")
    view, sign = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF), 8: (torch.int64, 0x7FFFFFFFFFFFFFFF)}[
        a.element_size()]

    def ordinal(t):
        bits = t.contiguous().view(view).long()
        mag = bits & sign
        return torch.where(bits < 0, -mag, mag)

    return (ordinal(a) - ordinal(b)).abs()


def multi_dot(tensors: Sequence[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """float64 reference of sum_i g[i] * x_k[i] (the native one sums float32 products in blocks)."""
    gd = g.detach().reshape(-1).double()
    return torch.stack([(t.detach().reshape(-1).double() * gd).sum() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def gram(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, 0, dtype=torch.float64)
    x = torch.stack([t.detach().reshape(-1).double() for t in tensors])
    return x @ x.T


def soup_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor]) -> dict:
    """The uniform soup as fastsoup.Soup computes it, re-summed from scratch: a float32 running sum
    ``S = round32(S + x_k)`` from +0 (the kernels' accumulate mode), then ``round(S / n)`` in
    ``like``'s dtypes; other tensors from the first state dict."""
    n = len(state_dicts)
    out = {}
    for name, ref in like.items():
        if not ref.is_floating_point():
            out[name] = state_dicts[0][name].clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for sd in state_dicts:
            acc = weighted_sum([sd[name]], [1.0], torch.float32, accumulate_into=acc)
        out[name] = weighted_sum([acc], [1.0], ref.dtype, divisor=float(n))
    return out


def greedy_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]], model: torch.nn.Module, batches, *,
                strict: bool = False) -> tuple[list[int], float, list[float]]:
    """The paper's Recipe 1, plainly: score every ingredient on every batch, stable sort descending,
    and for each next ingredient re-average the kept ones plus it from scratch (float32), evaluate on
    all the held-out data, keep it if accuracy >= the best (``>`` when strict).

    Returns:
        (kept indices in order, greedy soup accuracy, individual accuracies).
    """
    like = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def accuracy(sd) -> float:
        model.load_state_dict(sd)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in batches:
                correct += int((model(x).argmax(dim=-1) == y).sum())
                total += int(y.shape[0])
        return correct / total

    scores = [accuracy(sd) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        acc = accuracy(soup_state_dict([state_dicts[i] for i in kept + [j]], like))
        if acc > best or (not strict and acc == best):
            kept.append(j)
            best = acc
    return kept, best, scores


# ---------------------------------------------------------------------------------------------------
# Merge methods beyond the soup (issue 22): the oracles of task arithmetic, TIES, DARE, breadcrumbs,
# SLERP and Model Stock.
#
# Common rules, for every method:
# * Inputs are read at their stored precision and converted to float64 exactly; a task vector is
#   delta_k = float64(theta_k) - float64(theta_base) (one float64 rounding). Every later step is float64,
#   with no fused multiply-add, in the order written below; the result is rounded once to the output
#   dtype (``dtype``, default the base's; round to nearest even, as ``_round_to``).
# * Sums over the models run k = 0, 1, ..., K-1 from +0.0. Per-model values (weights, densities,
#   gammas) are a scalar for every model or one per model.
# * Defaults are mergekit's (HEAD a6e4028, mergekit/merge_methods/registry.py): normalize is on for
#   ties only, rescale on for the DARE methods only, lambda 1.
# * Deliberate differences from mergekit, all stated where they apply: the exact top-k with a
#   deterministic tie-break (mergekit: argsort, ties unspecified); DARE's counter-based RNG (mergekit:
#   torch.bernoulli of the global generator) and the paper's 1/density rescale as the default; the
#   breadcrumbs count when gamma * numel < 1; SLERP and Model Stock of zero vectors; Model Stock's t
#   clamped to [0, 1].

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either norm is below it
_LERP_DOT = 0.9995  # mergekit's slerp DOT_THRESHOLD


def _as_i64(x: int) -> int:
    """A 64-bit unsigned integer as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors read as unsigned."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64_py(z: int) -> int:
    """SplitMix64's output function on a Python integer in [0, 2^64)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def dare_stream_key(seed: int, model_index: int, name: str) -> int:
    """The spec of ``fastsoup.methods.rng.stream_key``, written again on Python integers:
    ``splitmix64(splitmix64(splitmix64(seed) ^ model) ^ fnv1a64(utf8(name)))`` with
    ``splitmix64(x) = mix64(x + GOLDEN)``."""
    if not (0 <= seed <= _M64 and 0 <= model_index <= _M64):
        raise ValueError(f"dare: seed and model index must be integers in [0, 2^64), got {seed}, {model_index}")
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _M64
    k = _mix64_py((seed + _GOLDEN) & _M64)
    k = _mix64_py(((k ^ model_index) + _GOLDEN) & _M64)
    return _mix64_py(((k ^ h) + _GOLDEN) & _M64)


def dare_u53(seed: int, model_index: int, name: str, numel: int, start: int = 0) -> torch.Tensor:
    """The 53-bit integers of elements [start, start + numel) (int64): ``mix64(key + (i + 1) * GOLDEN) >> 11``,
    computed on int64 tensors (wrapping arithmetic, logical shifts)."""
    key = _as_i64(dare_stream_key(seed, model_index, name))
    i = torch.arange(start + 1, start + numel + 1, dtype=torch.int64)
    z = i * _as_i64(_GOLDEN) + key
    z = (z ^ _srl(z, 30)) * _as_i64(_MIX1)
    z = (z ^ _srl(z, 27)) * _as_i64(_MIX2)
    z = z ^ _srl(z, 31)
    return _srl(z, 11)


def dare_keep_mask(seed: int, model_index: int, name: str, shape: Sequence[int] | torch.Size, density: float) -> torch.Tensor:
    """DARE's keep mask of one model's tensor: element i (flat, row-major) kept iff
    ``u53(i) < ceil(density * 2^53)`` (an exact integer comparison)."""
    d = _fraction(density, "density")
    numel = math.prod(shape)
    return (dare_u53(seed, model_index, name, numel) < math.ceil(math.ldexp(d, 53))).reshape(tuple(shape))


def _fraction(value: float, what: str) -> float:
    """``value`` as a float in [0, 1] (NaN refused), else ValueError naming ``what``."""
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return v


def _per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    """A scalar for every model, or one value per model: a list of k floats."""
    if isinstance(value, (int, float)):
        return [float(value)] * k
    vals = [float(v) for v in value]
    if len(vals) != k:
        raise ValueError(f"{what}: {len(vals)} values for {k} models")
    return vals


def _inputs(op: str, base: torch.Tensor, models: Sequence[torch.Tensor],
            dtype: torch.dtype | None) -> tuple[torch.Tensor, list, torch.dtype]:
    """Checks a method's inputs (floating, one shape) and returns the flat float64 base, the flat
    float64 task vectors ``float64(m) - float64(base)`` and the output dtype (default the base's)."""
    if not models:
        raise ValueError(f"{op}: no models")
    for j, t in enumerate([base, *models]):
        what = "base" if j == 0 else f"models[{j - 1}]"
        if not t.is_floating_point():
            raise ValueError(f"{op}: {what} has dtype {t.dtype}, expected a floating dtype")
        if t.shape != base.shape:
            raise ValueError(f"{op}: {what} has shape {list(t.shape)}, the base {list(base.shape)}")
    out = dtype or base.dtype
    if not out.is_floating_point:
        raise ValueError(f"{op}: output dtype {out} is not a floating dtype")
    b = base.detach().reshape(-1).double()
    return b, [m.detach().reshape(-1).double() - b for m in models], out


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """The trim's order keys (int64): the bits of float32(|delta|) read as an unsigned integer, every
    NaN 0x7FC00000 (``fastsoup.methods.select``'s spec)."""
    mag = delta.detach().reshape(-1).double().abs().float()
    keys = mag.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(torch.isnan(mag), torch.full_like(keys, 0x7FC00000), keys)


def top_k_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries of largest magnitude, exactly k, by a full stable sort: key descending, lower
    flat index first among equal keys (flat bool mask)."""
    keys = magnitude_keys(delta)
    if not 0 <= k <= keys.numel():
        raise ValueError(f"top_k_mask: k = {k} is outside [0, {keys.numel()}]")
    order = torch.argsort(-keys, stable=True)
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def ties_trim_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim (Yadav et al. 2023, step 1): the top ``floor(density * numel)`` entries by |delta|
    (the float64 product rounded, then floor: mergekit's ``int(density * numel)``); density 1 keeps
    every entry, density 0 none (mergekit 0.1.5 keeps ``max(1, int(density * numel))``: one entry where
    density * numel < 1, e.g. a 1-element tensor at density 0.5; kept as floor here)."""
    n = delta.numel()
    return top_k_mask(delta, min(n, math.floor(_fraction(density, "density") * n)))


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model breadcrumbs' mask (Davari and Belilovsky 2024): drop the ``n_top = floor(gamma * numel)``
    largest entries and keep the next ``n_keep = floor(density * numel)``; n_top shrinks to
    ``numel - n_keep`` when the two overlap the end (mergekit's rule). When n_top = 0 (gamma * numel < 1)
    the top n_keep are kept (issue 22's rule, which reports mergekit's slice as empty there; 0.1.5's
    source, read by benchmarks/bench_mergekit.py's author, is not)."""
    n = delta.numel()
    n_keep = min(n, math.floor(_fraction(density, "density") * n))
    n_top = min(n - n_keep, math.floor(_fraction(gamma, "gamma") * n))
    return top_k_mask(delta, n_top + n_keep) & ~top_k_mask(delta, n_top)


def _l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """mergekit's ``rescale_norm="l1"``: ``kept * (|delta|_1 / |kept|_1)``, the norms correctly rounded
    float64 sums (math.fsum); unchanged when either norm is below 1e-7, as in mergekit."""
    before = math.fsum(delta.abs().tolist())
    after = math.fsum(kept.abs().tolist())
    if before < _L1_EPS or after < _L1_EPS:
        return kept
    return kept * (before / after)


def _combine(op: str, base: torch.Tensor, deltas: list, weights: Sequence[float] | None, *, consensus: bool,
             normalize: bool, lam: float, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """The merge of (sparsified) task vectors, float64, then one rounding.

    Without consensus: ``S = sum_k w_k * delta_k``; with normalize, ``S / sum_k w_k`` (the weight sum
    replaced by 1 when |sum| < 1e-8, as mergekit).
    With consensus (TIES's elect and disjoint mean): ``term_k = w_k * delta_k``; elected sign + where
    ``sum_k term_k >= 0`` (an exact 0 counts as +), else -; model k agrees where its term is nonzero with
    the elected sign (sign of w_k * delta_k: with a negative weight the term's sign, as mergekit);
    ``num = sum of the agreeing terms``, ``den = sum of the agreeing weights``; with normalize
    ``num / den`` (den 0 -> 1, as mergekit), else ``num``.
    Result: ``base + lam * that``.
    """
    ws = _per_model(1.0 if weights is None else weights, len(deltas), f"{op}: weights")
    terms = [d * w for d, w in zip(deltas, ws)]
    zero = torch.zeros_like(base)
    if consensus:
        s = zero
        for t in terms:
            s = s + t
        plus = s >= 0
        num, den = zero, zero
        for t, w in zip(terms, ws):
            agree = torch.where(plus, t > 0, t < 0)
            num = torch.where(agree, num + t, num)
            den = torch.where(agree, den + w, den)
        mixed = num / torch.where(den == 0, torch.ones_like(den), den) if normalize else num
    else:
        mixed = zero
        for t in terms:
            mixed = mixed + t
        if normalize:
            total = 0.0
            for w in ws:
                total += w
            mixed = mixed / (1.0 if abs(total) < 1e-8 else total)
    return _round_to(base + float(lam) * mixed, dtype).reshape(shape)


def task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                    lam: float = 1.0, normalize: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): ``base + lam * sum_k w_k delta_k``
    (weights default 1; ``normalize`` divides by the weight sum, mergekit's option, off by default),
    computed as fastsoup's engine defines it: one weighted sum ``c_base * base + sum_k c_k * theta_k``
    in the kernels' order (``weighted_sum``), ``c_k = lam * w_k`` (``w_k / sum w`` with normalize, the
    sum replaced by 1 when |sum| < 1e-8) and ``c_base = 1 - fsum(c_k)``; one rounding.

    Mathematically the same as the delta form ``base + lam * sum_k w_k (theta_k - base)``
    (``task_arithmetic_deltas``); the two float64 computations round differently, so their results
    differ by at most one rounding of float64 error: 0 or 1 ulp of the output dtype in practice."""
    _inputs("task_arithmetic", base, models, dtype)
    ws = _per_model(1.0 if weights is None else weights, len(models), "task_arithmetic: weights")
    if normalize:
        total = 0.0
        for w in ws:
            total += w
        total = 1.0 if abs(total) < 1e-8 else total
        ws = [w / total for w in ws]
    cs = [float(lam) * w for w in ws]
    return weighted_sum([base, *models], [1.0 - math.fsum(cs), *cs], dtype or base.dtype).reshape(base.shape)


def task_arithmetic_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                           *, lam: float = 1.0, normalize: bool = False,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Task arithmetic in the delta form (mergekit's order): float64 task vectors, ``base + lam * sum_k
    w_k delta_k`` (``_combine``), one rounding. Within one rounding of ``task_arithmetic``."""
    b, deltas, out = _inputs("task_arithmetic", base, models, dtype)
    return _combine("task_arithmetic", b, deltas, weights, consensus=False, normalize=normalize, lam=lam,
                    dtype=out, shape=base.shape)


def _magnitude_method(op: str, base: torch.Tensor, models: Sequence[torch.Tensor], weights, density, gamma,
                      lam: float, normalize: bool, rescale: str | None, dtype: torch.dtype | None,
                      consensus: bool) -> torch.Tensor:
    """TIES (``gamma`` None: the top-k trim) and breadcrumbs (the band): mask each task vector, keep the
    masked entries (the rest +0.0), optionally L1-rescale, then ``_combine``."""
    if rescale not in (None, "l1"):
        raise ValueError(f"{op}: rescale must be None or 'l1', got {rescale!r}")
    b, deltas, out = _inputs(op, base, models, dtype)
    dens = _per_model(density, len(deltas), f"{op}: density")
    gams = None if gamma is None else _per_model(gamma, len(deltas), f"{op}: gamma")
    sparse = []
    for k, d in enumerate(deltas):
        mask = ties_trim_mask(d, dens[k]) if gams is None else breadcrumbs_mask(d, dens[k], gams[k])
        kept = torch.where(mask, d, torch.zeros_like(d))
        sparse.append(_l1_rescaled(d, kept) if rescale == "l1" else kept)
    return _combine(op, b, sparse, weights, consensus=consensus, normalize=normalize, lam=lam, dtype=out,
                    shape=base.shape)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
         density: float | Sequence[float] = 1.0, lam: float = 1.0, normalize: bool = True,
         rescale: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708): trim each task vector to its top
    ``floor(density * numel)`` entries by magnitude (exact; ties at the threshold: lower flat index
    first; ``ties_trim_mask``), then elect the sign and take the disjoint mean (``_combine`` with
    consensus), ``base + lam * mean``. ``rescale="l1"``: mergekit's L1-norm rescale of each trimmed
    task vector (off by default, as mergekit's ties)."""
    return _magnitude_method("ties", base, models, weights, density, None, lam, normalize, rescale, dtype, True)


def breadcrumbs(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                density: float | Sequence[float] = 1.0, gamma: float | Sequence[float] = 0.01, lam: float = 1.0,
                normalize: bool = False, rescale: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Model breadcrumbs (Davari and Belilovsky 2024, arXiv:2312.06795): each task vector keeps the
    entries ranked [n_top, n_top + n_keep) by magnitude (``breadcrumbs_mask``), then
    ``base + lam * sum_k w_k delta'_k`` (mergekit's defaults: gamma 0.01, no normalization)."""
    return _magnitude_method("breadcrumbs", base, models, weights, density, gamma, lam, normalize, rescale, dtype,
                             False)


def breadcrumbs_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                     density: float | Sequence[float] = 1.0, gamma: float | Sequence[float] = 0.01, lam: float = 1.0,
                     normalize: bool = False, rescale: str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Breadcrumbs' masks, then TIES's sign election and (with ``normalize``) disjoint mean."""
    return _magnitude_method("breadcrumbs_ties", base, models, weights, density, gamma, lam, normalize, rescale,
                             dtype, True)


def _dare(op: str, base: torch.Tensor, models: Sequence[torch.Tensor], weights, density, seed: int, name: str,
          lam: float, normalize: bool, rescale: str | None, dtype: torch.dtype | None, consensus: bool) -> torch.Tensor:
    """DARE: the counter-RNG keep mask of model k (its position in ``models``), the kept entries
    divided by the density ("density"; not at density 0 or 1), L1-rescaled ("l1") or left (None), then
    ``_combine``."""
    if rescale not in (None, "density", "l1"):
        raise ValueError(f"{op}: rescale must be 'density', 'l1' or None, got {rescale!r}")
    b, deltas, out = _inputs(op, base, models, dtype)
    dens = _per_model(density, len(deltas), f"{op}: density")
    sparse = []
    for k, d in enumerate(deltas):
        keep = dare_keep_mask(seed, k, name, d.shape, dens[k])
        kept = torch.where(keep, d, torch.zeros_like(d))
        if rescale == "density" and 0.0 < dens[k] < 1.0:
            kept = kept / dens[k]
        elif rescale == "l1":
            kept = _l1_rescaled(d, kept)
        sparse.append(kept)
    return _combine(op, b, sparse, weights, consensus=consensus, normalize=normalize, lam=lam, dtype=out,
                    shape=base.shape)


def dare_linear(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                density: float | Sequence[float] = 1.0, seed: int = 0, name: str, lam: float = 1.0,
                normalize: bool = False, rescale: str | None = "density",
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099), linear: each entry of task vector k dropped with
    probability 1 - density_k by the counter-based RNG of (seed, k, name, element index)
    (``dare_keep_mask``), the kept ones divided by density_k (``rescale="density"``, the paper's; "l1":
    mergekit's L1-norm rescale; None: none), then ``base + lam * sum_k w_k delta'_k``. ``name``: the
    tensor's name (it keys the RNG); k: the model's position in ``models``."""
    return _dare("dare_linear", base, models, weights, density, seed, name, lam, normalize, rescale, dtype, False)


def dare_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
              density: float | Sequence[float] = 1.0, seed: int = 0, name: str, lam: float = 1.0,
              normalize: bool = False, rescale: str | None = "density", dtype: torch.dtype | None = None) -> torch.Tensor:
    """DARE's drop and rescale, then TIES's sign election and (with ``normalize``, off by default as
    in mergekit) disjoint mean."""
    return _dare("dare_ties", base, models, weights, density, seed, name, lam, normalize, rescale, dtype, True)


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum_i a_i * b_i over the flattened tensors: float64 products, summed exactly and rounded once
    (math.fsum). For float16/bfloat16/float32 inputs the products are exact, so this is the dot
    product correctly rounded."""
    return math.fsum((a.detach().reshape(-1).double() * b.detach().reshape(-1).double()).tolist())


def slerp_coefficients(g_aa: float, g_ab: float, g_bb: float, t: float) -> tuple[float, float]:
    """SLERP's two coefficients from the Gram entries of a and b: ``cos = g_ab / (sqrt(g_aa) *
    sqrt(g_bb))``; lerp ``(1 - t, t)`` when |cos| > 0.9995 (mergekit's threshold) or when a or b is
    zero (mergekit would slerp a zero vector at a right angle); else ``theta = acos(cos)``,
    ``(sin(theta - theta * t) / sin(theta), sin(theta * t) / sin(theta))`` (Python's libm)."""
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t must be finite, got {t}")
    if g_aa == 0.0 or g_bb == 0.0:
        return 1.0 - t, t
    cos = g_ab / (math.sqrt(g_aa) * math.sqrt(g_bb))
    if abs(cos) > _LERP_DOT:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin(theta - theta * t) / s, math.sin(theta * t) / s


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, base: torch.Tensor | None = None,
          dtype: torch.dtype | None = None, gram: Sequence[float] | None = None) -> torch.Tensor:
    """Spherical linear interpolation of two tensors, flattened (Shoemake 1985; mergekit's slerp):
    ``s0 * a + s1 * b`` with ``slerp_coefficients`` of their exact Gram entries (``exact_dot``), one
    weighted sum in the kernels' order (``weighted_sum``), rounded once to ``dtype`` (default a's).
    t = 0 gives a, t = 1 gives b.

    With ``base``: the interpolation of the task vectors, ``base + s0 * (a - base) + s1 * (b - base)``
    with coefficients from the task vectors' Gram entries, computed as the engine does:
    ``c_base * base + s0 * a + s1 * b``, ``c_base = 1 - fsum(s0, s1)`` (dtype default the base's).
    mergekit's slerp is the form without ``base``, its base_model as ``a``.

    ``gram``: ``(g_aa, g_ab, g_bb)`` to use instead of the exact ones (e.g. the native gram pass's).
    """
    if base is None:
        _, _, out = _inputs("slerp", a, [b], dtype)
        da, db = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    else:
        _, (da, db), out = _inputs("slerp", base, [a, b], dtype)
    g = gram if gram is not None else (exact_dot(da, da), exact_dot(da, db), exact_dot(db, db))
    s0, s1 = slerp_coefficients(*g, t)
    if base is None:
        return weighted_sum([a, b], [s0, s1], out).reshape(a.shape)
    return weighted_sum([base, a, b], [1.0 - math.fsum([s0, s1]), s0, s1], out).reshape(a.shape)


def model_stock_t(gram: torch.Tensor) -> float:
    """Model Stock's interpolation ratio from the Gram matrix of the N task vectors (float64):
    ``cos_ij = G_ij / (sqrt(G_ii) * sqrt(G_jj))`` clamped to [-1, 1] (0 where a task vector is zero:
    mergekit's clamped norm product gives 0 there too); c = their mean over the pairs i < j (summed in
    row order), clamped to [-1, 1]; ``t = N c / (1 + (N - 1) c)`` for c > 0, 0 for c <= 0, clamped to
    [0, 1].

    mergekit leaves t unclamped: for c in (-1/(N-1), 0) t is negative (the merge moves away from the
    fine-tunes' mean), and at c = -1/(N-1) (the least a mean pairwise cosine can be, e.g. two opposite
    task vectors) it divides by zero; below that, reachable only through rounding, the pole flips t
    above 1. Every c <= 0 means no agreement: t = 0, the base.
    """
    g = gram.double()
    n = g.shape[0]
    if n < 2:
        raise ValueError(f"model_stock: needs at least 2 models besides the base, got {n}")
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            gi, gj = float(g[i, i]), float(g[j, j])
            c = 0.0 if gi == 0.0 or gj == 0.0 else float(g[i, j]) / (math.sqrt(gi) * math.sqrt(gj))
            total += min(1.0, max(-1.0, c))
            pairs += 1
    c = min(1.0, max(-1.0, total / pairs))
    if not c > 0.0:
        return 0.0
    return min(1.0, max(0.0, n * c / (1.0 + (n - 1) * c)))


def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor], *,
                dtype: torch.dtype | None = None, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, ECCV, arXiv:2403.19522), per tensor: t from the mean pairwise
    cosine of the task vectors (``model_stock_t`` of their exact Gram matrix, ``exact_dot``; or of
    ``gram`` when given), then ``t * mean_k theta_k + (1 - t) * base`` as the engine computes it: one
    weighted sum ``(1 - t) * base + sum_k (t / N) * theta_k`` in the kernels' order (``weighted_sum``),
    rounded once."""
    b, deltas, out = _inputs("model_stock", base, models, dtype)
    n = len(deltas)
    if gram is None:
        gram = torch.tensor([[exact_dot(deltas[i], deltas[j]) for j in range(n)] for i in range(n)],
                            dtype=torch.float64)
    t = model_stock_t(gram)
    return weighted_sum([base, *models], [1.0 - t] + [t / n] * n, out).reshape(base.shape)


_METHOD_FUNCTIONS = {
    "task_arithmetic": task_arithmetic, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs, "breadcrumbs_ties": breadcrumbs_ties, "model_stock": model_stock,
}


def merge_state_dicts(method: str, models: Sequence[Mapping[str, torch.Tensor]],
                      base: Mapping[str, torch.Tensor] | None = None, *,
                      arguments: Callable[[str], Mapping] | None = None, dtype: torch.dtype | None = None,
                      **params) -> dict[str, torch.Tensor]:
    """One method over whole state dicts, tensor by tensor; non-floating tensors are copied from the
    base (slerp: from ``models[0]``).

    Args:
        method: a method of this module (``"ties"``, ``"slerp"``...).
        models: the inputs besides the base (slerp: its two models, ``a`` then ``b``).
        base: the base state dict (slerp: optional, the task-vector form).
        arguments: ``name -> dict`` of per-tensor keyword arguments (e.g. a bound
            ``MergeConfig.arguments``), merged over ``params``.
        params: keyword arguments for every tensor (``weights``, ``density``, ``seed``...).
    """
    if method != "slerp" and method not in _METHOD_FUNCTIONS:
        raise ValueError(f"merge_state_dicts: unknown method {method!r}")
    first = models[0] if method == "slerp" and base is None else base
    if first is None:
        raise ValueError(f"merge_state_dicts: {method} needs a base")
    out = {}
    for name, ref in first.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        kw = dict(params)
        if arguments is not None:
            kw.update(arguments(name))
        if method == "slerp":
            out[name] = slerp(models[0][name], models[1][name], kw.pop("t"),
                              base=None if base is None else base[name], dtype=dtype, **kw)
            continue
        if method.startswith("dare"):
            kw["name"] = name
        if method == "model_stock":
            out[name] = model_stock(base[name], [m[name] for m in models], dtype=dtype)
        else:
            out[name] = _METHOD_FUNCTIONS[method](base[name], [m[name] for m in models], dtype=dtype, **kw)
    return out
