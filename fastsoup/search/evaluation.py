"""Model evaluation on a prepared held-out set, with exact early rejection, and the metrics.

:func:`evaluate` runs the model batch by batch and, for accuracy, stops as soon as the candidate can no
longer reach the acceptance threshold even with every remaining example right, so its decisions are
those of a full evaluation. A set split across the ranks of torch.distributed carries its own
evaluation strategy (``data.split``, :class:`fastsoup.distributed.evaluation.Split`), which runs instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import ArgumentError
from .batches import model_logits
from .regroup import Regrouping

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class Evaluation:
    logits: torch.Tensor | None  # all logits (CPU, float32) when evaluated to the end
    score: float | None  # None when stopped early
    correct: int | None  # accuracy only
    batches: int  # batches evaluated
    complete: bool


def evaluate(
    model: torch.nn.Module,
    data: Any,
    metric: str | Metric = "accuracy",
    *,
    need: int | None = None,
    progress: Any = None,
    order: Sequence[int] | None = None,
    regrouping: Regrouping | None = None,
) -> Evaluation:
    """Evaluates ``model`` on ``data``.

    Args:
        metric: "accuracy" (top-1) or ``f(logits, labels) -> float``, higher is better.
        need: accuracy only: the number of correct examples the model must reach; evaluation stops
            once ``correct + remaining < need`` (it cannot be reached), and the result is incomplete.
        progress: a tqdm-like bar to update by one per batch, or None.
        order: the order to run the batches in (a permutation of their indices; logits come back in
            the set's order). Accuracy does not depend on it; early rejection comes sooner when the
            batches most likely to be wrong run first. Ignored under torch.distributed (the ranks
            run their parts in the set's order).
        regrouping: run the examples regrouped by this plan (:func:`regroup`) instead of the set's
            batches (``order`` then indexes its batches); logits come back in the set's order.
            Exact only for models whose logits do not depend on the rest of the batch: see
            :func:`check_regrouping`.
    """
    if data.split is not None:  # split across the ranks of torch.distributed: its strategy, collective
        return data.split.evaluate(model, data, metric, need=need, progress=progress)
    nb = len(data.batches) if regrouping is None else len(regrouping)
    if order is None:
        order = range(nb)
    elif sorted(order) != list(range(nb)):
        raise ArgumentError(f"order must be a permutation of the {nb} batch indices")
    was_training = model.training
    model.eval()
    outs: list = [None] * nb
    correct, seen, done = 0, 0, 0
    total = data.size
    try:
        with torch.inference_mode():
            for b in order:
                x, y = data.batches[b] if regrouping is None else regrouping.batch(data, b)
                logits = model_logits(model, x, y, data.name)
                outs[b] = logits.detach().float().cpu()
                done += 1
                seen += y.shape[0]
                if progress is not None:
                    progress.update(1)
                if metric == "accuracy":
                    correct += int((logits.argmax(dim=-1) == y).sum())
                    if need is not None and seen < total and correct + (total - seen) < need:
                        data.verify()  # a rejection from data read past a truncation is no decision
                        return Evaluation(None, None, None, done, False)
    finally:
        model.train(was_training)
    data.verify()
    logits = torch.cat(outs)
    if regrouping is not None:  # back to the set's order
        logits = torch.empty_like(logits).index_copy_(0, torch.cat(regrouping.ids), logits)
    return Evaluation(logits, score_logits(logits, data.labels, metric), correct if metric == "accuracy" else None, done, True)


def score_logits(logits: torch.Tensor, labels: torch.Tensor, metric: str | Metric = "accuracy") -> float:
    """The metric of a whole set of logits (accuracy: the fraction of top-1 hits)."""
    if metric == "accuracy":
        return int((logits.argmax(dim=-1) == labels).sum()) / labels.shape[0]
    return float(metric(logits, labels))


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=-1) == labels).sum())


def check_metric(metric: Any) -> str | Metric:
    if metric == "accuracy" or callable(metric):
        return metric
    raise ArgumentError(f"metric must be 'accuracy' or a callable (logits, labels) -> float, got {metric!r}")


def metric_name(metric: str | Metric) -> str:
    if isinstance(metric, str):
        return metric
    return f"{getattr(metric, '__module__', '?')}.{getattr(metric, '__qualname__', repr(metric))}"


def progress_bar(enabled: bool | None, total: int, desc: str, unit: str = "batch"):
    """A tqdm bar on stderr (``enabled=None``: when stderr is a terminal), else None."""
    if enabled is None:
        enabled = sys.stderr is not None and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)



__all__ = ["Evaluation", "Metric", "check_metric", "correct_count", "evaluate", "metric_name", "progress_bar",
           "score_logits"]
