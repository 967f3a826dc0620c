"""Interpolation between two checkpoints (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022): ``(1 - alpha) * theta_0 + alpha * theta_1``, and a sweep over alpha scored with
the greedy search's cached evaluation."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
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
    a = float(alpha)
    if a != a or a in (float("inf"), float("-inf")):
        raise ArgumentError(f"alpha must be finite, got {alpha}")
    return weighted_sum([theta_0, theta_1], [1.0 - a, a], **kwargs)


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
    checkpoints; with ``cache_dir`` the logits are cached (a rerun, or more alphas later, costs only
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
    for a in alphas:
        logits = s.soup_logits([0, 1], sets, weights=[1.0 - a, a])
        for d in sets:
            scores[d].append(score_logits(logits[d], s.data[d].labels, s.metric))
    best = max(range(len(alphas)), key=lambda i: (scores["heldout"][i], -i))
    return SweepResult(alphas, scores, alphas[best], [zero_shot, fine_tuned])


__all__ = ["DEFAULT_ALPHAS", "SweepResult", "interpolate", "wise_ft_sweep"]
