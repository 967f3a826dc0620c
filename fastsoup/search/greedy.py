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
(a soup's logits are not a function of its ingredients' logits), so soups are always evaluated.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed as _distributed
from .._errors import FastsoupError
from .._native import _core
from ..engine import CPU, resolve_device
from ..io._sidefiles import SoupInfo
from ..io.checkpoint import Checkpoint, check_compatible, open_checkpoint, with_key
from ..io.names import NameMap
from ..io.writer import sidecar_path, with_sidecar
from ..soup import Soup, _load_checkpoint
from . import cache as _cache
from .heldout import (
    Evaluation,
    HeldOut,
    CHECK_BATCHES,
    Metric,
    check_metric,
    check_regrouping,
    correct_count,
    evaluate,
    load_heldout,
    metric_name,
    model_device,
    prepare,
    progress_bar,
    regroup,
    regroupable,
    score_logits,
)


@dataclass
class SearchStats:
    """Where a search spent its time and its reads."""

    prepare_seconds: float = 0.0  # running the data pipeline once (all data sets)
    individual_seconds: float = 0.0  # loading and scoring every ingredient
    form_seconds: float = 0.0  # forming candidates (reads + fused kernel + parameter writes)
    eval_seconds: float = 0.0  # evaluating candidates
    evaluations: int = 0  # model evaluations run (ingredients and candidates)
    cached: int = 0  # evaluations answered by the cache or the journal
    batches_evaluated: int = 0  # candidate batches run
    batches_saved: int = 0  # candidate batches skipped by early rejection
    reorder: str = ""  # how candidate batches were ordered: "examples", "batches" or "none"
    reorder_note: str = ""  # why examples were not regrouped, when "examples" was asked for
    check_batches: int = 0  # model calls of the one-time check that regrouping changes no logit
    bytes_read_individual: int = 0  # checkpoint bytes read from files to score the ingredients
    bytes_read_search: int = 0  # checkpoint bytes read from files by the greedy search


@dataclass
class GreedyResult:
    """The outcome of :func:`greedy_soup`.

    Attributes:
        ingredients: the kept ingredients (as given), in the order they were added.
        indices: their positions in the ``ingredients`` argument.
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
                            rank0=lambda fn: _distributed.rank0(fn, share=False))  # collective save, rank 0's record

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


@dataclass
class EnsembleResult:
    """The outcome of :func:`greedy_ensemble`: ``members`` (indices, in order added), ``score``,
    ``history``, ``individual_scores``, ``names``."""

    members: list[int]
    score: float
    history: list[dict]
    individual_scores: list[float]
    names: list[str]




# ---------------------------------------------------------------------------------------------------


class Search:
    """The shared state of the searches: opened ingredients, prepared data, the cache.

    ``regrouping``: None until a search first regroups the held-out examples; then "ok", or why the
    model's logits change with regrouping (the check of :func:`~fastsoup.search.heldout.check_regrouping`
    runs once per Search).

    Checks everything before any evaluation: the ingredients against each other and against the
    model, the data sets (non-empty), and the cache (same model and data as when it was written).
    ``verify``: how ingredients are fingerprinted for the cache (see :func:`greedy_soup`).
    """

    def __init__(
        self,
        ingredients: Sequence[Any],
        model: torch.nn.Module,
        heldout: Iterable | None,
        *,
        metric: str | Metric = "accuracy",
        cache_dir: str | os.PathLike | None = None,
        device: Any = None,
        progress: bool | None = None,
        evals: dict[str, Iterable] | None = None,
        verify: str = "sample",
        key_map: Any = None,
        strip_prefix: str | None = None,
    ):
        self.metric = check_metric(metric)
        self.verify = _cache.check_verify(verify)
        self.sources = list(ingredients)
        if not self.sources:
            raise ValueError("no ingredients: give at least one checkpoint")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.progress = progress
        self.stats = SearchStats()
        self.names = [_name(src, i) for i, src in enumerate(self.sources)]
        opened = [open_checkpoint(src) for src in self.sources]
        self.device = torch.device(device) if device is not None else model_device(model)
        self.model = model.to(self.device)
        # The soup and the parameter writes run where the model is: the CUDA engine for a model on a
        # GPU (checkpoints stream through pinned memory; the fp32 sum stays on the GPU), else the CPU.
        self.engine_device = CPU
        if self.device.type == "cuda" and _core.cuda_compiled and _core.cuda_device_count() > 0:
            self.engine_device = resolve_device(f"cuda:{self.device.index if self.device.index is not None else 0}")
        layout = open_checkpoint(model)
        # The files' names as the module's (a key map, a prefix, transformers' own renames), tied weights alike.
        self.name_map = NameMap.build(key_map=key_map, strip_prefix=strip_prefix, model=model, layout=layout)
        self.ckpts: list[Checkpoint] = self.name_map.apply(opened)
        check_compatible([layout] + self.ckpts)
        self.model_fp = _cache.fingerprint_model(model)
        self.fps = [_cache.fingerprint_checkpoint(ck, verify) for ck in self.ckpts]
        comm = _distributed.current()
        if comm is not None:  # file identities can differ across nodes: every rank names entries as rank 0
            self.fps = comm.broadcast(self.fps)
        # Under torch.distributed only rank 0 touches the cache; the other ranks get its answers.
        self.cache = _distributed.open_cache(_cache.LogitCache, cache_dir) if cache_dir is not None else None
        stored = store = None
        if self.cache is not None and _distributed.current() is None:
            store = self.cache.data_prefix("heldout")
        if heldout is None:  # the held-out set a search stored in the cache: no pipeline to run
            if cache_dir is None:
                raise ValueError("heldout=None takes the held-out data stored in cache_dir: give cache_dir, or the data")
            if _distributed.current() is not None:
                raise ValueError("heldout=None is not supported under torch.distributed: give every rank the data")
            heldout, stored = load_heldout(store)
            store = None
        # With a cache, the held-out set is written there as it is prepared (on the CPU it then lives in
        # that file, memory-mapped); it is installed once the cache has accepted it.
        self.data: dict[str, HeldOut] = {"heldout": prepare(heldout, self.device, name="heldout", store=store)}
        try:
            if stored is not None and self.heldout.fingerprint != stored:
                raise FastsoupError(f"{self.cache.data_prefix('heldout')}.bin: the stored held-out data does not match the "
                                    "fingerprint it was stored with (damaged): give the data set to store it again")
            for name, loader in (evals or {}).items():
                if name == "heldout":
                    raise ValueError("'heldout' is the held-out set's name; give the eval set another name")
                self.data[name] = prepare(loader, self.device, name=name)
            if self.cache is not None:
                self.cache.check("model", self.model_fp, describe=f"the model ({type(model).__name__})")
                for name, d in self.data.items():
                    self.cache.check("data:" + name, d.fingerprint, describe=f"the data set {name!r}")
            if self.heldout.store is not None:
                self.heldout.verify()
                self.heldout.store.install()  # a later run can skip the pipeline (heldout=None)
                if self.heldout.watch is not None:  # the batches are mapped from it: now under its own name
                    self.heldout.watch.renamed(self.heldout.store.prefix + ".bin")
        except BaseException:  # KeyboardInterrupt too: no temporary file of the store is left
            if self.heldout.store is not None:
                self.heldout.store.discard()
            raise
        finally:
            self.heldout.store = None
        self.stats.prepare_seconds = sum(d.prepare_seconds for d in self.data.values())
        self._memory: dict[str, torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}
        self._individual: dict[str, list[torch.Tensor]] = {}
        self.regrouping: str | None = None

    @property
    def heldout(self) -> HeldOut:
        return self.data["heldout"]

    def key(self, members: Sequence[int], data: str, weights: Sequence[float] | None = None) -> str:
        ws = [1.0] * len(members) if weights is None else list(weights)
        return _cache.soup_key(self.model_fp, self.data[data].fingerprint, [(self.fps[i], w) for i, w in zip(members, ws)])

    def cached(self, members: Sequence[int], data: str, weights: Sequence[float] | None = None) -> torch.Tensor | None:
        k = self.key(members, data, weights)
        if k in self._memory:
            return self._memory[k]
        if self.cache is not None:
            t = self.cache.get(k)
            if t is not None:
                self._memory[k] = t
            return t
        return None

    def store(self, members: Sequence[int], data: str, logits: torch.Tensor,
              weights: Sequence[float] | None = None) -> None:
        k = self.key(members, data, weights)
        self._memory[k] = logits
        if self.cache is not None:
            self.cache.put(k, logits)

    def individual_logits(self, data: str = "heldout") -> list[torch.Tensor]:
        """Logits of every ingredient on a data set: from the cache, else each checkpoint is read once
        and evaluated on every data set that misses it."""
        if data in self._individual:
            return self._individual[data]
        start = time.perf_counter()
        before = _core.counters()["mapped_bytes_read"]
        sets = list(self.data)
        for i, ck in enumerate(self.ckpts):
            missing = [d for d in sets if self.cached([i], d) is None]
            if not missing:
                self.stats.cached += len(sets)
                continue
            _load_checkpoint(ck, self.model, staging=self._staging, device=self.engine_device)
            for d in missing:
                bar = progress_bar(self.progress, len(self.data[d].batches), f"{d}: {self.names[i]}")
                try:
                    ev = evaluate(self.model, self.data[d], self.metric, progress=bar)
                finally:
                    if bar is not None:
                        bar.close()
                self.stats.evaluations += 1
                self.store([i], d, ev.logits)
        for d in sets:
            self._individual[d] = [self.cached([i], d) for i in range(len(self.ckpts))]
        self.stats.bytes_read_individual += _core.counters()["mapped_bytes_read"] - before
        self.stats.individual_seconds += time.perf_counter() - start
        return self._individual[data]

    def individual_scores(self, data: str = "heldout") -> list[float]:
        labels = self.data[data].labels
        return [score_logits(t, labels, self.metric) for t in self.individual_logits(data)]

    def soup_logits(self, members: Sequence[int], sets: Sequence[str] = ("heldout",),
                    weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        """Logits of the soup of ``members`` (summed in that order; uniform, or ``weights``) on each
        data set: cached, else the soup is formed once (one read of each member) and evaluated on
        the sets that miss."""
        out = {d: self.cached(members, d, weights) for d in sets}
        missing = [d for d, t in out.items() if t is None]
        if missing:
            soup = Soup.like(self.model, device=self.engine_device, _names=self.name_map)
            for n, i in enumerate(members):
                soup.add(self.ckpts[i], 1.0 if weights is None else weights[n])
            soup.load_into(self.model)
            for d in missing:
                ev = evaluate(self.model, self.data[d], self.metric)
                self.stats.evaluations += 1
                self.store(members, d, ev.logits, weights)
                out[d] = ev.logits
        return out

    def ranking(self, scores: Sequence[float], order: Sequence[int] | None) -> list[int]:
        n = len(scores)
        if order is None:
            return sorted(range(n), key=lambda i: -scores[i])  # stable: ties keep the input order
        order = [int(i) for i in order]
        if not order or len(set(order)) != len(order) or not all(0 <= i < n for i in order):
            raise ValueError(f"order must list distinct ingredient indices in [0, {n}), got {order}")
        return order


def greedy_soup(
    ingredients: Sequence[Any],
    model: torch.nn.Module,
    heldout: Iterable | None,
    *,
    metric: str | Metric = "accuracy",
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    device: Any = None,
    order: Sequence[int] | None = None,
    progress: bool | None = None,
    reorder: str = "examples",
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
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
        device: the evaluation device (default: the model's); the held-out tensors are kept there.
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
        CheckpointError: the ingredients do not match each other or the model.
        FastsoupError: empty held-out data; a cache written for another model or data set.

    Example:
        >>> result = fastsoup.greedy_soup(paths, model, val_loader, cache_dir="soup-cache")  # doctest: +SKIP
        >>> result.indices, result.score  # doctest: +SKIP
        >>> result.save("greedy.safetensors")  # doctest: +SKIP
    """
    s = Search(with_key(ingredients, key), model, heldout, metric=metric, cache_dir=cache_dir, device=device,
               progress=progress, verify=verify, key_map=key_map, strip_prefix=strip_prefix)
    return run_greedy(s, strict=strict, order=order, reorder=reorder)


REORDERS = ("examples", "batches", "none")


def run_greedy(s: Search, *, strict: bool = False, order: Sequence[int] | None = None,
               reorder: str = "examples") -> GreedyResult:
    """The greedy loop over a prepared :class:`Search` (see :func:`greedy_soup`)."""
    if reorder not in REORDERS:
        raise ValueError(f"reorder must be one of {', '.join(map(repr, REORDERS))}, got {reorder!r}")
    held = s.heldout
    logits = s.individual_logits()
    scores = [score_logits(t, held.labels, s.metric) for t in logits]
    ranking = s.ranking(scores, order)
    accuracy = s.metric == "accuracy"
    search_key = _cache.key("greedy", s.model_fp, held.fingerprint, metric_name(s.metric), bool(strict),
                            [s.fps[i] for i in ranking])
    journal = {}
    if s.cache is not None:  # records whose checksum and fields check out (the journal skips the others)
        for r in s.cache.journal.records():
            if r.get("kind") == "candidate" and r.get("search") == search_key:
                journal[r["step"]] = r

    first = ranking[0]
    kept = [first]
    best_score = scores[first]
    best_correct = correct_count(logits[first], held.labels) if accuracy else None
    nb = held.num_batches
    history = [{"step": 0, "index": first, "name": s.names[first], "score": best_score, "accepted": True,
                "batches": nb, "of": nb, "source": "individual"}]
    # Hardest first: a candidate is rejected once its errors exceed what the threshold allows, so the
    # examples (or whole batches) where the current soup errs most run first; accuracy does not depend
    # on the order, so the decisions stay those of a full evaluation.
    best_logits = logits[first]
    if not accuracy or held.split is not None:
        reorder = "none"
    elif reorder == "examples":
        why = regroupable(held)
        if why is not None:
            reorder, s.stats.reorder_note = "batches", f"examples not regrouped: {why}"
    plan = plan_for = None  # the regrouping for the current soup (`plan_for`: its logits)
    soup: Soup | None = None  # its sum is the sum of kept[:summed] (a prefix: decisions from the cache are
    summed = 0                # added lazily, only when a later candidate needs evaluating, so each is read once)
    before = _core.counters()["mapped_bytes_read"]
    for step, j in enumerate(ranking[1:], 1):
        rec = journal.get(step)
        members = kept + [j]
        pending = False
        if (rec is not None and rec["index"] == j and rec["fingerprint"] == s.fps[j] and rec["of"] == nb
                and (rec["correct"] is not None or not (accuracy and rec["accepted"]))):
            accepted, score, correct, batches, source = rec["accepted"], rec["score"], rec["correct"], rec["batches"], "journal"
            s.stats.cached += 1
            ev = None
        else:
            cached = s.cached(members, "heldout")
            if cached is not None:
                ev = Evaluation(cached, score_logits(cached, held.labels, s.metric),
                                correct_count(cached, held.labels) if accuracy else None, nb, True)
                source = "cache"
                s.stats.cached += 1
            else:
                t0 = time.perf_counter()
                if soup is None:
                    soup = Soup.like(s.model, device=s.engine_device, _names=s.name_map)
                for i in kept[summed:]:
                    soup.add(s.ckpts[i])
                summed = len(kept)
                soup.candidate(s.ckpts[j])
                pending = True
                t1 = time.perf_counter()
                need = (best_correct + (1 if strict else 0)) if accuracy else None
                batch_order = None
                if reorder == "examples" and best_logits is not None and plan_for is not best_logits:
                    plan, plan_for = regroup(held, _hardest_examples(held, best_logits)), best_logits
                    if s.regrouping is None:  # once per Search, with real weights (this candidate's)
                        s.regrouping = check_regrouping(s.model, held, plan) or "ok"
                        s.stats.check_batches += CHECK_BATCHES
                    if s.regrouping != "ok":
                        reorder, plan = "batches", None
                        s.stats.reorder_note = f"examples not regrouped: {s.regrouping}"
                if reorder == "batches":
                    batch_order = _hardest_first(held, best_logits)
                bar = progress_bar(s.progress, nb, f"greedy {step}/{len(ranking) - 1}: {s.names[j]}")
                try:
                    ev = evaluate(s.model, held, s.metric, need=need, progress=bar, order=batch_order,
                                  regrouping=plan if reorder == "examples" else None)
                finally:
                    if bar is not None:
                        bar.close()
                s.stats.form_seconds += t1 - t0
                s.stats.eval_seconds += time.perf_counter() - t1
                s.stats.evaluations += 1
                s.stats.batches_evaluated += ev.batches
                s.stats.batches_saved += nb - ev.batches
                if ev.complete:
                    s.store(members, "heldout", ev.logits)
                source = "evaluated"
            score, correct, batches = ev.score, ev.correct, ev.batches
            if not ev.complete:
                accepted = False
            elif accuracy:
                accepted = correct > best_correct if strict else correct >= best_correct
            else:
                accepted = score > best_score if strict else score >= best_score
            if s.cache is not None:
                s.cache.journal.append({
                    "kind": "candidate", "search": search_key, "step": step, "index": j, "name": s.names[j],
                    "fingerprint": s.fps[j], "score": score, "correct": correct, "accepted": accepted,
                    "batches": batches, "of": nb, "time": time.time(),
                })
        if accepted:
            kept.append(j)
            best_score, best_correct = score, correct
            best_logits = ev.logits if ev is not None and ev.logits is not None else s.cached(kept, "heldout")
            if pending:
                soup.accept()
                summed = len(kept)
        history.append({"step": step, "index": j, "name": s.names[j], "score": score, "accepted": accepted,
                        "batches": batches, "of": nb, "source": source})
    s.stats.bytes_read_search += _core.counters()["mapped_bytes_read"] - before
    s.stats.reorder = reorder
    return GreedyResult(
        ingredients=[s.sources[i] for i in kept], indices=kept, score=best_score, history=history,
        individual_scores=scores, order=ranking, names=s.names, metric=metric_name(s.metric), strict=bool(strict),
        stats=dataclasses.replace(s.stats), _mapped=[s.ckpts[i] for i in kept], _names=s.name_map,
    )


def greedy_ensemble(
    ingredients: Sequence[Any],
    model: torch.nn.Module,
    heldout: Iterable | None,
    *,
    metric: str | Metric = "accuracy",
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    device: Any = None,
    progress: bool | None = None,
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
) -> EnsembleResult:
    """The paper's greedy ensemble baseline: greedy soup's procedure over logit ensembles (the mean of
    the members' logits), computed from the ingredients' held-out logits (cached: free on a rerun).

    Arguments as :func:`greedy_soup`.
    """
    s = Search(with_key(ingredients, key), model, heldout, metric=metric, cache_dir=cache_dir, device=device,
               progress=progress, verify=verify, key_map=key_map, strip_prefix=strip_prefix)
    return run_greedy_ensemble(s, strict=strict)


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
    return EnsembleResult(members, best, history, scores, s.names)


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logit ensemble: the mean of the members' logits (accumulated in float64)."""
    total = torch.zeros_like(logits[0], dtype=torch.float64)
    for t in logits:
        total += t.double()
    return (total / len(logits)).float()


def _name(src: Any, i: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return f"<ingredient {i}>"


__all__ = ["EnsembleResult", "GreedyResult", "Search", "SearchStats", "ensemble_logits", "greedy_ensemble", "greedy_soup",
           "run_greedy", "run_greedy_ensemble", "sidecar_path"]
