"""Data-parallel evaluation of a held-out set split across the ranks: the evaluation strategy the
search selects (:func:`~fastsoup.search.heldout.prepare` gives a split set this strategy under a process
group; :func:`~fastsoup.search.evaluation.evaluate` runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import ArgumentError, DistributedError
from ..search.batches import model_logits, take_rows
from ..search.evaluation import Evaluation, correct_count, score_logits
from .comm import Comm


@dataclass
class Split:
    """How a :class:`~fastsoup.search.heldout.HeldOut` is split: this rank holds ``parts`` (global
    batch index, global row offset, rows) of the batches whose sizes are ``sizes``.

    ``mode``: "batches" (batch i on rank i % world: whole batches, as one process evaluates them) or
    "rows" (every batch cut into ``world`` row ranges: the learned soup's steps are over whole batches)."""

    comm: Comm
    mode: str
    parts: list
    sizes: list

    @property
    def rounds(self) -> int:
        """Steps in which every rank evaluates at most one part."""
        n = len(self.sizes)
        return -(-n // self.comm.world) if self.mode == "batches" else n

    def evaluate(self, model, data, metric, *, need: int | None, progress: Any):
        """The data-parallel evaluation strategy of a set split this way: see :func:`evaluate`."""
        return evaluate(model, data, metric, need=need, progress=progress)


def take_part(comm: Comm, mode: str, index: int, offset: int, x: Any, y: Any):
    """This rank's part of held-out batch ``index`` (its first row is row ``offset`` of the set):
    ``(inputs, labels, (index, global offset, rows))``, or None."""
    n = int(y.shape[0])
    if mode == "batches":
        return (x, y, (index, offset, n)) if index % comm.world == comm.rank else None
    if mode != "rows":
        raise ArgumentError(f"split must be 'batches' or 'rows', got {mode!r}")
    lo, hi = n * comm.rank // comm.world, n * (comm.rank + 1) // comm.world
    return take_rows(x, n, lo, hi), y[lo:hi], (index, offset + lo, hi - lo)


def agree_split(comm: Comm, mode: str, parts: list, sizes: list, fingerprint: str, name: str) -> Split:
    """Checks that every rank read the same data set (fastsoup splits it: give every rank all of it),
    and returns this rank's :class:`Split`."""
    seen = comm.check(None, fingerprint)
    if len(set(seen)) > 1:
        raise DistributedError(
            f"{name}: the ranks read different data (fingerprints {sorted(set(seen))}): give every rank the whole "
            "held-out set, in the same order; fastsoup splits it across the ranks itself (no DistributedSampler)"
        )
    return Split(comm, mode, parts, sizes)


def evaluate(model, data, metric, *, need: int | None, progress: Any):
    """:func:`fastsoup.search.evaluation.evaluate` over a split data set (collective): every rank runs its
    parts; with early rejection the per-batch correct counts are exchanged after every round and
    every rank stops at the batch where one process would have stopped; the logits of a complete
    evaluation are gathered in the set's order. Same result, on every rank, as one process."""
    import torch

    sp: Split = data.split
    comm = sp.comm
    accuracy = metric == "accuracy"
    sync = accuracy and need is not None
    total, nb = data.size, len(sp.sizes)
    outs: list = []
    error: BaseException | None = None
    rows_in = [0] * nb
    correct_in = [0] * nb
    next_b = cum_correct = cum_seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for r in range(sp.rounds):
                info = []
                if error is None and r < len(data.batches):
                    try:
                        x, y = data.batches[r]
                        b, off, rows = sp.parts[r]
                        logits = model_logits(model, x, y, data.name)
                        outs.append((off, logits.detach().float().cpu()))
                        info.append((b, rows, int((logits.argmax(dim=-1) == y).sum()) if accuracy else 0))
                        if progress is not None:
                            progress.update(1)
                    except Exception as e:  # noqa: BLE001 - reported to every rank below
                        error = e
                if not sync:
                    if error is not None:
                        break
                    continue
                for part in comm.check(error, info):
                    for b, rows, c in part:
                        rows_in[b] += rows
                        correct_in[b] += c
                while next_b < nb and rows_in[next_b] == sp.sizes[next_b]:
                    cum_correct += correct_in[next_b]
                    cum_seen += sp.sizes[next_b]
                    next_b += 1
                    if cum_seen < total and cum_correct + (total - cum_seen) < need:
                        return Evaluation(None, None, None, next_b, False)
    finally:
        model.train(was_training)
    gathered = comm.check(error, outs)
    pieces = sorted(((off, r, j), t) for r, part in enumerate(gathered) for j, (off, t) in enumerate(part))
    logits = torch.cat([t for _, t in pieces])
    return Evaluation(logits, score_logits(logits, data.labels, metric),
                      correct_count(logits, data.labels) if accuracy else None, nb, True)


__all__ = ["Split", "agree_split", "evaluate", "take_part"]
