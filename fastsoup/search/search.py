"""The shared state of the searches over checkpoints (:class:`Search`): the opened ingredients, the
prepared held-out (and eval) sets, the logit cache, and the logits of ingredients and soups.

Cached logits make ensembles exact and free; they say nothing about a soup of the same ingredients
(a soup's logits are not a function of its ingredients' logits), so soups are always evaluated.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import ArgumentError, ArgumentTypeError, DataError
from .._native import _core
from ..distributed import comm as _comm
from ..distributed.cache import open_cache
from ..engine import CPU, resolve_device
from ..io.checkpoint import Checkpoint, check_compatible, open_checkpoint
from ..io.names import NameMap
from ..mixing import load_checkpoint, mix_into_model
from ..soup import Soup
from . import cache as _cache
from .batches import model_device
from .evaluation import Metric, check_metric, evaluate, progress_bar, score_logits
from .heldout import HeldOut, prepare
from .store import load_heldout


@dataclass
class SearchStats:
    """Where a search spent its time and its reads."""

    prepare_seconds: float = 0.0  # running the data pipeline once (all data sets)
    individual_seconds: float = 0.0  # loading and scoring every ingredient
    form_seconds: float = 0.0  # forming candidates and soups (reads + fused kernel + parameter writes)
    eval_seconds: float = 0.0  # evaluating candidates and soups
    evaluations: int = 0  # model evaluations run (ingredients and candidates)
    cached: int = 0  # evaluations answered by the cache or the journal
    batches_evaluated: int = 0  # candidate batches run
    batches_saved: int = 0  # candidate batches skipped by early rejection
    reorder: str = ""  # how candidate batches were ordered: "examples", "batches" or "none"
    reorder_note: str = ""  # why examples were not regrouped, when "examples" was asked for
    check_batches: int = 0  # model calls of the one-time check that regrouping changes no logit
    bytes_read_individual: int = 0  # checkpoint bytes read from files to score the ingredients
    bytes_read_search: int = 0  # checkpoint bytes read from files by the greedy search



class Search:
    """The shared state of the searches: opened ingredients, prepared data, the cache.

    ``regrouping``: None until a search first regroups the held-out examples; then "ok", or why the
    model's logits change with regrouping (the check of :func:`~fastsoup.search.regroup.check_regrouping`
    runs once per Search).

    Checks everything before any evaluation: the ingredients against each other and against the
    model, the data sets (non-empty), and the cache (same model and data as when it was written).
    ``verify``: how ingredients are fingerprinted for the cache (see :func:`greedy_soup`).

    Two devices: ``eval_device`` (default: the model's) is where the model is moved, the data sets
    are kept and the evaluations run (``self.device``); ``merge_device`` (default: the evaluation
    device when it is a GPU this build's CUDA engine can use, else the CPU) is where the soups are
    summed and written into the model (``self.engine_device``). ``device=`` is the deprecated name of
    ``eval_device=``.
    """

    def __init__(
        self,
        ingredients: Sequence[Any],
        model: torch.nn.Module,
        heldout: Iterable | None,
        *,
        metric: str | Metric = "accuracy",
        cache_dir: str | os.PathLike | None = None,
        eval_device: Any = None,
        merge_device: Any = None,
        progress: bool | None = None,
        evals: dict[str, Iterable] | None = None,
        verify: str = "sample",
        key_map: Any = None,
        strip_prefix: str | None = None,
        device: Any = None,
    ):
        eval_device = eval_device_of(eval_device, device, "Search")
        self.metric = check_metric(metric)
        self.verify = _cache.check_verify(verify)
        self.sources = list(ingredients)
        if not self.sources:
            raise ArgumentError("no ingredients: give at least one checkpoint")
        if not isinstance(model, torch.nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.progress = progress
        self.stats = SearchStats()
        self.names = [_name(src, i) for i, src in enumerate(self.sources)]
        opened = [open_checkpoint(src) for src in self.sources]
        self.device = torch.device(eval_device) if eval_device is not None else model_device(model)
        self.engine_device = merge_device_for(self.device, merge_device)
        self.model = model.to(self.device)
        layout = open_checkpoint(model)
        # The files' names as the module's (a key map, a prefix, transformers' own renames), tied weights alike.
        self.name_map = NameMap.build(key_map=key_map, strip_prefix=strip_prefix, model=model, layout=layout)
        self.ckpts: list[Checkpoint] = self.name_map.apply(opened)
        check_compatible([layout] + self.ckpts)
        self.model_fp = _cache.fingerprint_model(model)
        self.fps = [_cache.fingerprint_checkpoint(ck, verify) for ck in self.ckpts]
        comm = _comm.current()
        if comm is not None:  # file identities can differ across nodes: every rank names entries as rank 0
            self.fps = comm.broadcast(self.fps)
        # Under torch.distributed only rank 0 touches the cache; the other ranks get its answers.
        self.cache = open_cache(_cache.LogitCache, cache_dir) if cache_dir is not None else None
        stored = store = None
        if self.cache is not None and _comm.current() is None:
            store = self.cache.data_prefix("heldout")
        if heldout is None:  # the held-out set a search stored in the cache: no pipeline to run
            if cache_dir is None:
                raise ArgumentError("heldout=None takes the held-out data stored in cache_dir: give cache_dir, or the data")
            if _comm.current() is not None:
                raise ArgumentError("heldout=None is not supported under torch.distributed: give every rank the data")
            heldout, stored = load_heldout(store)
            store = None
        # With a cache, the held-out set is written there as it is prepared (on the CPU it then lives in
        # that file, memory-mapped); it is installed once the cache has accepted it.
        self.data: dict[str, HeldOut] = {"heldout": prepare(heldout, self.device, name="heldout", store=store)}
        try:
            if stored is not None and self.heldout.fingerprint != stored:
                raise DataError(f"{self.cache.data_prefix('heldout')}.bin: the stored held-out data does not match the "
                                    "fingerprint it was stored with (damaged): give the data set to store it again")
            for name, loader in (evals or {}).items():
                if name == "heldout":
                    raise ArgumentError("'heldout' is the held-out set's name; give the eval set another name")
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
        return self._get(self.key(members, data, weights))

    def store(self, members: Sequence[int], data: str, logits: torch.Tensor,
              weights: Sequence[float] | None = None) -> None:
        self._put(self.key(members, data, weights), logits)

    def _get(self, k: str) -> torch.Tensor | None:
        if k in self._memory:
            return self._memory[k]
        if self.cache is not None:
            t = self.cache.get(k)
            if t is not None:
                self._memory[k] = t
            return t
        return None

    def _put(self, k: str, logits: torch.Tensor) -> None:
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
            load_checkpoint(ck, self.model, staging=self._staging, device=self.engine_device)
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
            t0 = time.perf_counter()
            soup = Soup.like(self.model, device=self.engine_device, _names=self.name_map)
            for n, i in enumerate(members):
                soup.add(self.ckpts[i], 1.0 if weights is None else weights[n])
            soup.load_into(self.model)
            t1 = time.perf_counter()
            for d in missing:
                ev = evaluate(self.model, self.data[d], self.metric)
                self.stats.evaluations += 1
                self.store(members, d, ev.logits, weights)
                out[d] = ev.logits
            self.stats.form_seconds += t1 - t0
            self.stats.eval_seconds += time.perf_counter() - t1
        return out

    def mixed_logits(self, members: Sequence[int], weights: Sequence[float],
                     sets: Sequence[str] = ("heldout",)) -> dict[str, torch.Tensor]:
        """Logits of the linear combination ``sum_k weights[k] * theta_{members[k]}`` (the weights as
        given, not normalized: any real numbers, for interpolations, extrapolations and planes through
        checkpoints) on each data set: cached, else formed by one fused pass over the members'
        checkpoints written into the model's parameters in place (:func:`~fastsoup.mixing.mix_into_model`:
        computed in float64 and rounded once, bit for bit :func:`~fastsoup.weighted_sum` of the same
        checkpoints and weights) and evaluated to the end on the sets that miss. The cache keys differ
        from those of :meth:`soup_logits` (a running float32 sum, rounded otherwise)."""
        members, weights = [int(i) for i in members], [float(w) for w in weights]
        if not members or len(weights) != len(members):
            raise ArgumentError(f"mixed_logits: give one weight per member ({len(members)} members, {len(weights)} weights)")
        keys = {d: _cache.key("mix", self.model_fp, self.data[d].fingerprint,
                              [[self.fps[i], w] for i, w in zip(members, weights)]) for d in sets}
        out = {d: self._get(k) for d, k in keys.items()}
        missing = [d for d, t in out.items() if t is None]
        if missing:
            t0 = time.perf_counter()
            mix_into_model([self.ckpts[i] for i in members], self.model, weights, self._staging, device=self.engine_device)
            t1 = time.perf_counter()
            for d in missing:
                ev = evaluate(self.model, self.data[d], self.metric)
                self.stats.evaluations += 1
                self._put(keys[d], ev.logits)
                out[d] = ev.logits
            self.stats.form_seconds += t1 - t0
            self.stats.eval_seconds += time.perf_counter() - t1
        self.stats.cached += len(out) - len(missing)
        return out

    def ranking(self, scores: Sequence[float], order: Sequence[int] | None) -> list[int]:
        n = len(scores)
        if order is None:
            return sorted(range(n), key=lambda i: -scores[i])  # stable: ties keep the input order
        order = [int(i) for i in order]
        if not order or len(set(order)) != len(order) or not all(0 <= i < n for i in order):
            raise ArgumentError(f"order must list distinct ingredient indices in [0, {n}), got {order}")
        return order


def eval_device_of(eval_device: Any, device: Any, caller: str, stacklevel: int = 3) -> Any:
    """A search's evaluation device, from ``eval_device=`` and ``device=``, its deprecated name (a
    FutureWarning; both given: an ArgumentError). ``stacklevel`` points the warning at the caller of
    ``caller``."""
    if device is None:
        return eval_device
    if eval_device is not None:
        raise ArgumentError(f"{caller}: device= is the deprecated name of eval_device=; pass eval_device= alone")
    warnings.warn(f"{caller}(device=...) is deprecated: pass eval_device= (where the model and the held-out data are "
                  "evaluated); merge_device= says where the soups are formed", FutureWarning, stacklevel=stacklevel)
    return device


def merge_device_for(eval_device: Any, merge_device: Any = None):
    """The engine device the soups are summed on and written into the model from: ``merge_device``
    ("cpu", "cuda", "cuda:N"), or by default where the model is evaluated: the CUDA engine for a
    model on a GPU (checkpoints stream through pinned memory; the float32 sum stays on the GPU), else
    the CPU (a model on a GPU then gets its parameters through host staging)."""
    if merge_device is not None:
        return resolve_device(merge_device)
    dev = torch.device(eval_device)
    if dev.type == "cuda" and _core.cuda_compiled and _core.cuda_device_count() > 0:
        return resolve_device(f"cuda:{dev.index if dev.index is not None else 0}")
    return CPU


def _name(src: Any, i: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return f"<ingredient {i}>"



__all__ = ["Search", "SearchStats"]
