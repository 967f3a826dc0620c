"""The per-tensor coefficients of the merge methods the engine runs as one weighted sum per tensor:
plain Python floats, torch-free, the same float64 operations in the same order as the references in
``fastsoup._reference`` (``slerp_coefficients``, ``model_stock_t``, ``task_arithmetic``), so that the
same Gram entries give the same bits.

Every method here is ``round(sum_k c_k * theta_k)`` over its inputs, in the kernels' order
(kernels.h: float64 products summed from -0.0 in input order, one rounding to the output dtype):

* task arithmetic over ``[base, theta_1..theta_K]``: ``c_k = lam * s_k`` with ``s_k = w_k`` (or
  ``w_k / sum w`` with ``normalize``; the sum replaced by 1 when |sum| < 1e-8, as mergekit), and
  ``c_base = 1 - fsum(c_1..c_K)``;
* Model Stock over ``[base, theta_1..theta_N]``: ``c_base = 1 - t``, ``c_k = t / N``;
* SLERP over ``[a, b]``: ``(s0, s1)``; with a base, over ``[base, a, b]``: ``(1 - fsum(s0, s1), s0, s1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LERP_DOT", "base_coefficient", "model_stock_t", "slerp_coefficients", "task_arithmetic_coefficients"]

LERP_DOT = 0.9995  # mergekit's slerp DOT_THRESHOLD: lerp above it


def base_coefficient(coefficients: Sequence[float]) -> float:
    """The base's coefficient when the others are those of task vectors: ``1 - fsum(coefficients)``
    (the correctly rounded sum, then one subtraction)."""
    return 1.0 - math.fsum(coefficients)


def task_arithmetic_coefficients(weights: Sequence[float], lam: float, normalize: bool = False) -> list[float]:
    """``[c_base, c_1, ..., c_K]`` of ``base + lam * sum_k w_k (theta_k - base)`` as one weighted sum."""
    ws = [float(w) for w in weights]
    if normalize:
        total = 0.0
        for w in ws:
            total += w
        total = 1.0 if abs(total) < 1e-8 else total
        ws = [w / total for w in ws]
    cs = [float(lam) * w for w in ws]
    return [base_coefficient(cs), *cs]


def slerp_coefficients(g_aa: float, g_ab: float, g_bb: float, t: float) -> tuple[float, float]:
    """SLERP's two coefficients from the Gram entries of a and b: ``cos = g_ab / (sqrt(g_aa) *
    sqrt(g_bb))``; lerp ``(1 - t, t)`` when |cos| > 0.9995 or when a or b is zero; else
    ``theta = acos(cos)``, ``(sin(theta - theta * t) / sin(theta), sin(theta * t) / sin(theta))``.

    Raises:
        ValueError: t is not finite.
    """
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t must be finite, got {t}")
    if g_aa == 0.0 or g_bb == 0.0:
        return 1.0 - t, t
    cos = g_ab / (math.sqrt(g_aa) * math.sqrt(g_bb))
    if abs(cos) > LERP_DOT:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin(theta - theta * t) / s, math.sin(theta * t) / s


def model_stock_t(gram: Sequence[Sequence[float]]) -> float:
    """Model Stock's ratio from the N x N Gram matrix of the task vectors: the mean pairwise cosine c
    (each cosine clamped to [-1, 1], 0 where a task vector is zero; the mean clamped to [-1, 1]),
    ``t = N c / (1 + (N - 1) c)`` for c > 0, else 0, clamped to [0, 1] (mergekit leaves t unclamped).

    Raises:
        ValueError: fewer than 2 task vectors.
    """
    n = len(gram)
    if n < 2:
        raise ValueError(f"model_stock: needs at least 2 models besides the base, got {n}")
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            gi, gj = float(gram[i][i]), float(gram[j][j])
            c = 0.0 if gi == 0.0 or gj == 0.0 else float(gram[i][j]) / (math.sqrt(gi) * math.sqrt(gj))
            total += min(1.0, max(-1.0, c))
            pairs += 1
    c = min(1.0, max(-1.0, total / pairs))
    if not c > 0.0:
        return 0.0
    return min(1.0, max(0.0, n * c / (1.0 + (n - 1) * c)))
