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
from collections.abc import Mapping, Sequence
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
