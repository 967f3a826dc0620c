"""Interpolation between two checkpoints (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022): ``(1 - alpha) * theta_0 + alpha * theta_1``, and a sweep over alpha scored with
the greedy search's cached evaluation."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ArgumentError
from ..engine import weighted_sum

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def interpolate(theta_0: Any, theta_1: Any, alpha: float, **kwargs: Any):
    """``(1 - alpha) * theta_0 + alpha * theta_1``, streamed (any ingredient types; ``alpha`` outside
    [0, 1] extrapolates). Options, output and errors as :func:`fastsoup.weighted_sum` (``out=None``
    returns a state dict, a path writes safetensors there).

    Example:
        >>> fastsoup.interpolate("zeroshot.safetensors", "finetuned.safetensors", 0.5, out="wise.safetensors")  # doctest: +SKIP
    """
    a = _alpha(alpha)
    return weighted_sum([theta_0, theta_1], [1.0 - a, a], **kwargs)


def _alpha(alpha: Any) -> float:
    a = float(alpha)
    if a != a or a in (float("inf"), float("-inf")):
        raise ArgumentError(f"alpha must be finite, got {alpha}")
    return a


@dataclass
class SweepResult:
    """Scores of ``(1 - alpha) theta_0 + alpha theta_1`` for each alpha: ``scores[set][i]`` is the
    score on a data set ("heldout" and each eval set) at ``alphas[i]``; ``best_alpha`` maximizes the
    held-out score (the first one on ties)."""

    alphas: list[float]
    scores: dict[str, list[float]]
    best_alpha: float
    sources: list

    def state_dict(self, alpha: float | None = None) -> dict:
        """The interpolation at ``alpha`` (default: ``best_alpha``) as a state dict."""
        return interpolate(self.sources[0], self.sources[1], self.best_alpha if alpha is None else alpha)


def wise_ft_sweep(
    zero_shot: Any,
    fine_tuned: Any,
    model: Any,
    heldout: Iterable,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    evals: dict[str, Iterable] | None = None,
    cache_dir: str | os.PathLike | None = None,
    eval_device: Any = None,
    merge_device: Any = None,
    progress: bool | None = None,
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    device: Any = None,
) -> SweepResult:
    """Scores the WiSE-FT interpolation at each alpha on the held-out set and every eval set.

    The data sets are prepared once; each alpha's soup is formed by one fused pass over the two
    checkpoints written into the model in place (rounded once: bit for bit what :func:`interpolate`
    and :meth:`SweepResult.state_dict` return); with ``cache_dir`` the logits are cached (a rerun, or more alphas later, costs only
    the new points); ``verify`` says how the cache fingerprints the two checkpoints (``"sample"``
    or ``"full"``, see :func:`~fastsoup.greedy_soup`); ``key_map`` and ``strip_prefix`` how their
    names become the model's (see :func:`~fastsoup.greedy_soup`); ``eval_device`` where the model
    is evaluated and ``merge_device`` where each interpolation is formed (as in
    :func:`~fastsoup.greedy_soup`; ``device``: deprecated name of ``eval_device``).

    Returns:
        A :class:`SweepResult`.
    """
    from ..search.evaluation import score_logits
    from ..search.search import Search, eval_device_of

    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ArgumentError("alphas is empty")
    eval_device = eval_device_of(eval_device, device, "wise_ft_sweep")
    s = Search([zero_shot, fine_tuned], model, heldout, cache_dir=cache_dir, eval_device=eval_device,
               merge_device=merge_device, progress=progress, evals=evals, verify=verify, key_map=key_map,
               strip_prefix=strip_prefix)
    sets = list(s.data)
    scores: dict[str, list[float]] = {d: [] for d in sets}
    for logits in sweep_logits(s, 0, 1, alphas, sets):
        for d in sets:
            scores[d].append(score_logits(logits[d], s.data[d].labels, s.metric))
    best = max(range(len(alphas)), key=lambda i: (scores["heldout"][i], -i))
    return SweepResult(alphas, scores, alphas[best], [zero_shot, fine_tuned])


def sweep_logits(s: Any, i0: int, i1: int, alphas: Sequence[float], sets: Sequence[str] = ("heldout",),
                 progress: Any = None) -> Iterator[dict]:
    """The logits of ``(1 - alpha) * theta_i0 + alpha * theta_i1`` on each data set, for each alpha in
    turn, from a prepared :class:`~fastsoup.search.Search` ``s``: cached, else one fused pass over the
    two checkpoints into the model (:meth:`~fastsoup.search.Search.mixed_logits`: bit for bit the
    model :func:`interpolate` gives) and an evaluation. ``progress``: a tqdm-like bar updated once
    per alpha. Used by :func:`wise_ft_sweep` and ``fastsoup.analysis``'s interpolation."""
    for a in map(_alpha, alphas):
        out = s.mixed_logits([i0, i1], [1.0 - a, a], sets)
        if progress is not None:
            progress.update(1)
        yield out


__all__ = ["DEFAULT_ALPHAS", "SweepResult", "interpolate", "sweep_logits", "wise_ft_sweep"]
