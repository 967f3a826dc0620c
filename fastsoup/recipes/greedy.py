"""Greedy soup (the paper's Recipe 1) and greedy ensemble, as a cached-logit search.

Cost model. The official ``main.py`` keeps a running average too (each checkpoint is loaded once);
its time goes to the data pipeline run again for every candidate, two state-dict clones plus a
``load_state_dict`` per candidate, and every rejected candidate evaluated to the end. Here:

1. the held-out data goes through its pipeline once (:func:`~fastsoup.search.heldout.prepare`);
2. the running soup is a float32 :class:`~fastsoup.Soup`; a candidate is one fused pass that reads
   the new checkpoint once and writes the model's parameters in place, and accepting it reads nothing;
3. accuracy is evaluated batch by batch and a candidate is rejected as soon as it cannot reach the
   threshold (exact: the decisions are those of a full evaluation); the examples the current soup
   gets most wrong run first, regrouped into batches of the set's sizes, so a rejected candidate
   stops after a fraction of the set (regrouping is checked once per search to leave every
   example's logits unchanged bit for bit; a model that fails the check keeps the set's batches);
4. logits of every ingredient and every fully evaluated soup, and every decision, are kept in
   ``cache_dir``: a rerun evaluates nothing, and an interrupted search resumes at the next untried
   candidate.

Cached logits make ensembles exact and free; they say nothing about a soup of the same ingredients
(a soup's logits are not a function of its ingredients' logits), so soups are always evaluated."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import ArgumentError
from .._native import _core
from ..distributed import comm as _comm
from ..io._sidefiles import SoupInfo
from ..io.checkpoint import with_key
from ..io.writer import with_sidecar
from ..search import cache as _cache
from ..search.evaluation import (
    Evaluation,
    Metric,
    correct_count,
    evaluate,
    metric_name,
    progress_bar,
    score_logits,
)
from ..search.heldout import HeldOut
from ..search.regroup import CHECK_BATCHES, check_regrouping, regroup, regroupable
from ..search.search import Search, SearchStats, eval_device_of
from ..soup import Soup


@dataclass
class GreedyResult:
    """The outcome of :func:`greedy_soup`.

    Attributes:
        ingredients: the kept ingredients (as given), in the order they were added.
        indices: their positions in the ``ingredients`` argument.
        (:meth:`weights`: their weights in the soup, ``1/n`` each.)
        score: the held-out score of the greedy soup.
        history: one dict per step: ``step, index, name, score (None when rejected early), accepted,
            batches, of (batches in the set), source ("evaluated", "cache" or "journal")``.
        individual_scores: the held-out score of every ingredient, in the input order.
        order: the order the candidates were tried in.
        names: names of all ingredients (paths, or ``<ingredient i>``).
        stats: a :class:`SearchStats`.
    """

    ingredients: list
    indices: list[int]
    score: float
    history: list[dict]
    individual_scores: list[float]
    order: list[int]
    names: list[str]
    metric: str
    strict: bool
    stats: SearchStats = field(default_factory=SearchStats)
    _mapped: list = field(default=None, repr=False, compare=False)  # the kept ingredients, named as the model's
    _names: Any = field(default=None, repr=False, compare=False)  # their NameMap (to save under the files' names)

    def weights(self) -> list[float]:
        """The soup's weight of each kept ingredient (as :attr:`ingredients`), normalized: ``1/n`` each."""
        return [1.0 / len(self.indices)] * len(self.indices)

    def soup(self) -> Soup:
        """The greedy soup as a :class:`~fastsoup.Soup`, summed in the order of the search (so its value
        is bit for bit the one that was evaluated). Reads each kept ingredient once. Its names are the
        model's; :meth:`save` writes the names of the ingredients' files."""
        ings = self._mapped or self.ingredients
        soup = Soup.like(ings[0], _names=self._names)
        for ing in ings:
            soup.add(ing)
        return soup

    def state_dict(self, dtype: Any = None) -> dict:
        """The greedy soup's state dict (dtypes of the first kept ingredient, or ``dtype``)."""
        return self.soup().value(dtype)

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Writes the greedy soup into ``model``'s parameters in place; returns the model."""
        return self.soup().load_into(model)

    def save(self, out: str | os.PathLike, **options: Any) -> str:
        """Writes the soup with the layout rules of ``average(out=...)`` (options: dtype, shard_size,
        overwrite, fsync, progress, config_from), and a JSON sidecar with the ingredients, scores and
        history: ``NAME.json`` next to a ``NAME.safetensors`` (or ``.pt``) file, ``soup.json`` inside
        a folder. A folder output also gets the side files of the first kept ingredient's folder (or
        of ``config_from``) and a model card, as :func:`~fastsoup.average` writes them."""
        soup = self.soup()
        kept = [self.names[i] for i in self.indices]
        info = SoupInfo("greedy_soup", kept, [1.0 / len(kept)] * len(kept))
        return with_sidecar(out, self.to_json(), lambda extras: soup.save(out, _extras=extras, _info=info, **options),
                            overwrite=bool(options.get("overwrite", False)),
                            rank0=lambda fn: _comm.rank0(fn, share=False))  # collective save, rank 0's record

    def to_json(self) -> dict:
        return {
            "recipe": "greedy_soup",
            "rule": ">" if self.strict else ">=",
            "metric": self.metric,
            "score": self.score,
            "ingredients": [self.names[i] for i in self.indices],
            "indices": self.indices,
            "order": self.order,
            "individual_scores": [{"name": n, "score": v} for n, v in zip(self.names, self.individual_scores)],
            "history": self.history,
            "stats": self.stats.__dict__,
        }


def greedy_soup(
    ingredients: Sequence[Any],
    model: torch.nn.Module,
    heldout: Iterable | None,
    *,
    metric: str | Metric = "accuracy",
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    eval_device: Any = None,
    merge_device: Any = None,
    order: Sequence[int] | None = None,
    progress: bool | None = None,
    reorder: str = "examples",
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    device: Any = None,
) -> GreedyResult:
    """Greedy soup, the paper's Recipe 1: rank the ingredients by held-out score, start from the best,
    try each next one once, keep it if the soup's held-out score does not drop.

    Args:
        ingredients: checkpoints (paths, state dicts, modules) fine-tuned from one init.
        model: an ``nn.Module`` whose state dict matches the ingredients; its parameters are
            overwritten during the search (load the result with ``result.load_into(model)``).
        heldout: ``(inputs, labels)`` batches (a DataLoader or any iterable); iterated once. With
            ``cache_dir``, the batches are written there as they come (``data/heldout.bin``, the
            size of the prepared tensors); on the CPU the search then reads them memory-mapped from
            that file, so the set need not fit in RAM. ``None`` takes them from there instead of
            running the data pipeline again (a rerun or a resume that trusts the stored data).
        metric: "accuracy" (top-1; enables exact early rejection) or ``f(logits, labels) -> float``,
            higher is better.
        strict: keep a candidate only if it improves the score (``>``, as the official ``main.py``);
            default ``False`` keeps it when the score does not drop (``>=``, as the paper's Recipe 1).
        cache_dir: where logits and the decision journal are kept: a rerun evaluates nothing and an
            interrupted search resumes at the next untried candidate. Every entry and record there
            carries a checksum: a damaged one is recomputed (one warning), never trusted; the
            temporary files of a killed run are removed by the next one.
        eval_device: the evaluation device (default: the model's): the model is moved there and the
            held-out tensors are kept there.
        merge_device: where the soups are summed and written into the model: "cpu", "cuda" or
            "cuda:N" (default: the evaluation device when it is a GPU and this build has CUDA, else
            the CPU; a model on a GPU then gets its parameters through host staging). The soup's
            value is the same bits on either.
        device: deprecated name of ``eval_device`` (a FutureWarning; it is not the merge device that
            ``device`` means in :func:`~fastsoup.average` and :class:`~fastsoup.Soup`).
        order: indices of the ingredients in the order to try them (overrides the ranking).
        progress: progress bars (default: on a terminal).
        reorder: accuracy only, how a candidate's held-out examples are ordered for early rejection
            (none of these changes a decision or a score): ``"examples"`` (default) runs first the
            examples the current soup gets most wrong (smallest margin), regrouped into batches of
            the set's sizes; it needs batches of tensors of one shape, and a model whose logits for
            an example do not depend on the rest of its batch, which is checked bit for bit once;
            otherwise (reported in ``result.stats.reorder_note``) it falls back to ``"batches"``:
            the set's batches, those where the current soup errs most first; ``"none"``: the set's
            order.
        verify: how the cache tells an ingredient's logits are its own: ``"sample"`` (default) by
            its tensors' names, dtypes, shapes, small tensors and samples of large ones, and for
            files their identity (inode, size, modification and change times, so a file edited in
            place is evaluated again); ``"full"`` by every byte of every tensor (reads each
            checkpoint once more per run; for in-memory ingredients changed between runs, or to
            be sure). Without ``cache_dir`` it changes nothing.
        key: the state dict to take from training checkpoints, e.g. ``"state_dict_ema"`` (see
            :func:`~fastsoup.open_checkpoint`); path ingredients become :class:`~fastsoup.KeyedPath`.
        key_map: the model's name of each tensor name in the ingredients' files (a callable, a dict,
            or ``(regex, replacement)`` pairs). For a transformers model it defaults to the renaming
            transformers itself applies between its files and the module, so ``save_pretrained``
            folders of ViT, DINOv2, Swin, CLIP ... work with the model as they are.
        strip_prefix: removes this prefix from the ingredients' names (``"module."``: DDP, open_clip).

    Returns:
        A :class:`GreedyResult`.

    Raises:
        ArgumentError: a bad option (``order``, ``reorder``, ``metric``, ``verify``, a device; both
            ``device`` and ``eval_device``).
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        CheckpointError: the ingredients do not match each other or the model.
        DataError: the held-out data is empty or not ``(inputs, labels)`` batches.
        CacheMismatchError: a cache written for another model or data set.

    Example:
        >>> result = fastsoup.greedy_soup(paths, model, val_loader, cache_dir="soup-cache")  # doctest: +SKIP
        >>> result.indices, result.score  # doctest: +SKIP
        >>> result.save("greedy.safetensors")  # doctest: +SKIP
    """
    eval_device = eval_device_of(eval_device, device, "greedy_soup")
    s = Search(with_key(ingredients, key), model, heldout, metric=metric, cache_dir=cache_dir, eval_device=eval_device,
               merge_device=merge_device, progress=progress, verify=verify, key_map=key_map, strip_prefix=strip_prefix)
    return run_greedy(s, strict=strict, order=order, reorder=reorder)


REORDERS = ("examples", "batches", "none")


def run_greedy(s: Search, *, strict: bool = False, order: Sequence[int] | None = None,
               reorder: str = "examples") -> GreedyResult:
    """The greedy loop over a prepared :class:`~fastsoup.search.Search` (see :func:`greedy_soup`)."""
    if reorder not in REORDERS:
        raise ArgumentError(f"reorder must be one of {', '.join(map(repr, REORDERS))}, got {reorder!r}")
    return _Greedy(s, bool(strict), order, reorder).run()


class _Greedy:
    """One greedy search: the soup so far (``kept``, its score, its logits) and how the next candidate
    is formed, ordered, evaluated and judged against it.

    The running :class:`~fastsoup.Soup` holds the sum of ``kept[:summed]``, a prefix: decisions taken
    from the journal or the cache are added lazily, only when a later candidate needs evaluating, so
    each checkpoint is read once."""

    def __init__(self, s: Search, strict: bool, order: Sequence[int] | None, reorder: str):
        self.s, self.strict = s, strict
        self.held: HeldOut = s.heldout
        self.accuracy = s.metric == "accuracy"
        self.logits = s.individual_logits()
        self.scores = [score_logits(t, self.held.labels, s.metric) for t in self.logits]
        self.ranking = s.ranking(self.scores, order)
        self.nb = self.held.num_batches
        self.key = _cache.key("greedy", s.model_fp, self.held.fingerprint, metric_name(s.metric), strict,
                              [s.fps[i] for i in self.ranking])
        self.journal = self._journal_records()
        first = self.ranking[0]
        self.kept = [first]
        self.best_score = self.scores[first]
        self.best_correct = correct_count(self.logits[first], self.held.labels) if self.accuracy else None
        self.best_logits = self.logits[first]
        self.soup: Soup | None = None
        self.summed = 0
        self.plan = self.plan_for = None  # the regrouping for the current soup (`plan_for`: its logits)
        # Hardest first: a candidate is rejected once its errors exceed what the threshold allows, so the
        # examples (or whole batches) where the current soup errs most run first; accuracy does not depend
        # on the order, so the decisions stay those of a full evaluation.
        self.reorder = reorder
        if not self.accuracy or self.held.split is not None:
            self.reorder = "none"
        elif reorder == "examples":
            why = regroupable(self.held)
            if why is not None:
                self.reorder, s.stats.reorder_note = "batches", f"examples not regrouped: {why}"

    def run(self) -> GreedyResult:
        s, first = self.s, self.ranking[0]
        history = [{"step": 0, "index": first, "name": s.names[first], "score": self.best_score, "accepted": True,
                    "batches": self.nb, "of": self.nb, "source": "individual"}]
        before = _core.counters()["mapped_bytes_read"]
        for step, j in enumerate(self.ranking[1:], 1):
            history.append(self._step(step, j))
        s.stats.bytes_read_search += _core.counters()["mapped_bytes_read"] - before
        s.stats.reorder = self.reorder
        kept = self.kept
        return GreedyResult(
            ingredients=[s.sources[i] for i in kept], indices=kept, score=self.best_score, history=history,
            individual_scores=self.scores, order=self.ranking, names=s.names, metric=metric_name(s.metric),
            strict=self.strict, stats=dataclasses.replace(s.stats), _mapped=[s.ckpts[i] for i in kept],
            _names=s.name_map,
        )

    def _journal_records(self) -> dict:
        """step -> this search's candidate record (records whose checksum and fields check out)."""
        if self.s.cache is None:
            return {}
        return {r["step"]: r for r in self.s.cache.journal.records()
                if r.get("kind") == "candidate" and r.get("search") == self.key}

    def _step(self, step: int, j: int) -> dict:
        """Tries candidate ``j``: from the journal, the cache, or formed and evaluated; keeps it or not."""
        s, held = self.s, self.held
        rec = self.journal.get(step)
        ev, pending = None, False
        if (rec is not None and rec["index"] == j and rec["fingerprint"] == s.fps[j] and rec["of"] == self.nb
                and (rec["correct"] is not None or not (self.accuracy and rec["accepted"]))):
            accepted, score, correct, batches, source = rec["accepted"], rec["score"], rec["correct"], rec["batches"], "journal"
            s.stats.cached += 1
        else:
            members = self.kept + [j]
            cached = s.cached(members, "heldout")
            if cached is not None:
                ev = Evaluation(cached, score_logits(cached, held.labels, s.metric),
                                correct_count(cached, held.labels) if self.accuracy else None, self.nb, True)
                source = "cache"
                s.stats.cached += 1
            else:
                ev = self._evaluate(step, j)
                pending = True
                if ev.complete:
                    s.store(members, "heldout", ev.logits)
                source = "evaluated"
            score, correct, batches = ev.score, ev.correct, ev.batches
            accepted = self._accepts(ev)
            if s.cache is not None:
                s.cache.journal.append({
                    "kind": "candidate", "search": self.key, "step": step, "index": j, "name": s.names[j],
                    "fingerprint": s.fps[j], "score": score, "correct": correct, "accepted": accepted,
                    "batches": batches, "of": self.nb, "time": time.time(),
                })
        if accepted:
            self.kept.append(j)
            self.best_score, self.best_correct = score, correct
            self.best_logits = ev.logits if ev is not None and ev.logits is not None else s.cached(self.kept, "heldout")
            if pending:
                self.soup.accept()
                self.summed = len(self.kept)
        return {"step": step, "index": j, "name": s.names[j], "score": score, "accepted": accepted,
                "batches": batches, "of": self.nb, "source": source}

    def _accepts(self, ev: Evaluation) -> bool:
        if not ev.complete:
            return False
        if self.accuracy:
            return ev.correct > self.best_correct if self.strict else ev.correct >= self.best_correct
        return ev.score > self.best_score if self.strict else ev.score >= self.best_score

    def _evaluate(self, step: int, j: int) -> Evaluation:
        """Forms the candidate soup in the model (one read of ``j``) and evaluates it, hardest first,
        stopping once it cannot reach the current soup's score."""
        s, held = self.s, self.held
        t0 = time.perf_counter()
        if self.soup is None:
            self.soup = Soup.like(s.model, device=s.engine_device, _names=s.name_map)
        for i in self.kept[self.summed:]:
            self.soup.add(s.ckpts[i])
        self.summed = len(self.kept)
        self.soup.candidate(s.ckpts[j])
        t1 = time.perf_counter()
        need = (self.best_correct + (1 if self.strict else 0)) if self.accuracy else None
        batch_order, plan = self._order()
        bar = progress_bar(s.progress, self.nb, f"greedy {step}/{len(self.ranking) - 1}: {s.names[j]}")
        try:
            ev = evaluate(s.model, held, s.metric, need=need, progress=bar, order=batch_order, regrouping=plan)
        finally:
            if bar is not None:
                bar.close()
        s.stats.form_seconds += t1 - t0
        s.stats.eval_seconds += time.perf_counter() - t1
        s.stats.evaluations += 1
        s.stats.batches_evaluated += ev.batches
        s.stats.batches_saved += self.nb - ev.batches
        return ev

    def _order(self):
        """How to run the candidate's evaluation: ``(batch order or None, regrouping or None)``. The
        regrouping check runs once per Search, with real weights (the first candidate's)."""
        s, held = self.s, self.held
        if self.reorder == "examples" and self.best_logits is not None and self.plan_for is not self.best_logits:
            self.plan, self.plan_for = regroup(held, _hardest_examples(held, self.best_logits)), self.best_logits
            if s.regrouping is None:
                s.regrouping = check_regrouping(s.model, held, self.plan) or "ok"
                s.stats.check_batches += CHECK_BATCHES
            if s.regrouping != "ok":
                self.reorder, self.plan = "batches", None
                s.stats.reorder_note = f"examples not regrouped: {s.regrouping}"
        if self.reorder == "batches":
            return _hardest_first(held, self.best_logits), None
        return None, self.plan if self.reorder == "examples" else None


def _hardest_examples(held: HeldOut, logits: torch.Tensor) -> torch.Tensor:
    """Example indices by the current soup's margin (its logit of the true class minus its best other
    logit), smallest first: the examples it gets most confidently wrong, then those it barely gets
    right, where a candidate's errors concentrate (ties: the set's order)."""
    labels = held.labels.to(torch.int64)
    if logits.dim() != 2 or logits.shape[1] < 2:
        return torch.arange(held.size)
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return torch.argsort(true - other, stable=True)


def _hardest_first(held: HeldOut, logits: torch.Tensor | None) -> list[int] | None:
    """Batch indices by the current soup's errors in each, most first (ties: the set's order)."""
    if logits is None or held.split is not None:
        return None
    wrong = (logits.argmax(dim=-1) != held.labels).to(torch.int64)
    errors, start = [], 0
    for _, y in held.batches:
        n = int(y.shape[0])
        errors.append(int(wrong[start:start + n].sum()))
        start += n
    return sorted(range(len(errors)), key=lambda b: -errors[b])


__all__ = ["REORDERS", "GreedyResult", "greedy_soup", "run_greedy"]
