"""The paper's greedy ensemble baseline, from cached logits (an ensemble's logits are the mean of its
members': exact and free once the ingredients are evaluated)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..io.checkpoint import with_key
from ..search.evaluation import Metric, score_logits
from ..search.search import Search, eval_device_of


@dataclass
class EnsembleResult:
    """The outcome of :func:`greedy_ensemble`.

    Attributes:
        indices: the members' positions in the ``ingredients`` argument, in the order they were added
            (``members`` is the deprecated name).
        score: the held-out score of the ensemble.
        history: one dict per step: ``step, index, name, score, accepted``.
        individual_scores: the held-out score of every ingredient, in the input order.
        names: names of all ingredients (paths, or ``<ingredient i>``).
        ingredients: the members (as given), in the order they were added.
        (:meth:`weights`: each member's weight in the mean of the logits, ``1/n``.)
    """

    indices: list[int]
    score: float
    history: list[dict]
    individual_scores: list[float]
    names: list[str]
    ingredients: list = field(default_factory=list)

    def weights(self) -> list[float]:
        """Each member's weight in the ensemble (the mean of their logits), normalized: ``1/n`` each."""
        return [1.0 / len(self.indices)] * len(self.indices)

    @property
    def members(self) -> list[int]:
        """Deprecated name of :attr:`indices`."""
        warnings.warn("EnsembleResult.members is deprecated: use .indices (and .ingredients for the members "
                      "themselves)", DeprecationWarning, stacklevel=2)
        return self.indices


def greedy_ensemble(
    ingredients: Sequence[Any],
    model: torch.nn.Module,
    heldout: Iterable | None,
    *,
    metric: str | Metric = "accuracy",
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    eval_device: Any = None,
    merge_device: Any = None,
    progress: bool | None = None,
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    device: Any = None,
) -> EnsembleResult:
    """The paper's greedy ensemble baseline: greedy soup's procedure over logit ensembles (the mean of
    the members' logits), computed from the ingredients' held-out logits (cached: free on a rerun).

    Arguments as :func:`greedy_soup` (``merge_device``: where each ingredient is written into the
    model to be evaluated; ``device``: deprecated name of ``eval_device``).
    """
    eval_device = eval_device_of(eval_device, device, "greedy_ensemble")
    s = Search(with_key(ingredients, key), model, heldout, metric=metric, cache_dir=cache_dir, eval_device=eval_device,
               merge_device=merge_device, progress=progress, verify=verify, key_map=key_map, strip_prefix=strip_prefix)
    return run_greedy_ensemble(s, strict=strict)


def run_greedy_ensemble(s: Search, *, strict: bool = False, data: str = "heldout") -> EnsembleResult:
    labels = s.data[data].labels
    logits = s.individual_logits(data)
    scores = [score_logits(t, labels, s.metric) for t in logits]
    ranking = s.ranking(scores, None)
    members = [ranking[0]]
    total = logits[ranking[0]].double().clone()
    best = scores[ranking[0]]
    history = [{"step": 0, "index": ranking[0], "name": s.names[ranking[0]], "score": best, "accepted": True}]
    for step, j in enumerate(ranking[1:], 1):
        cand = total + logits[j].double()
        score = score_logits((cand / (len(members) + 1)).float(), labels, s.metric)
        accepted = score > best if strict else score >= best
        if accepted:
            members.append(j)
            total, best = cand, score
        history.append({"step": step, "index": j, "name": s.names[j], "score": score, "accepted": accepted})
    return EnsembleResult(members, best, history, scores, s.names, ingredients=[s.sources[i] for i in members])


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logit ensemble: the mean of the members' logits (accumulated in float64)."""
    total = torch.zeros_like(logits[0], dtype=torch.float64)
    for t in logits:
        total += t.double()
    return (total / len(logits)).float()


__all__ = ["EnsembleResult", "ensemble_logits", "greedy_ensemble", "run_greedy_ensemble"]
