"""Held-out data prepared once, and model evaluation with exact early rejection.

The official greedy-soup loop runs the data pipeline (decode + transforms) again for every
candidate. Here the pipeline runs once: :func:`prepare` keeps the model's input tensors (on the
evaluation device) and the labels, and fingerprints their bytes so a cache can tell whether the data
changed. Given ``store=``, it also writes them, batch by batch as they come, to a file
(:class:`Store`); on the CPU the set then lives in that file, memory-mapped copy-on-write, so it need
not fit in RAM, and :func:`load_heldout` gives it back to a later run without the pipeline.
:func:`evaluate` then runs the model batch by batch and, for accuracy, stops as soon as the
candidate can no longer reach the acceptance threshold even with every remaining example right, so
its decisions are those of a full evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed as _distributed
from .._errors import FastsoupError
from ..io import _tempfiles

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class HeldOut:
    """A data set prepared for repeated evaluation: batches on the device, labels, fingerprint."""

    name: str
    batches: list  # (inputs, labels) with inputs a tensor, a tuple of tensors or a dict of tensors
    labels: torch.Tensor  # all labels, concatenated, on the CPU
    fingerprint: str
    prepare_seconds: float = 0.0
    split: Any = None  # a fastsoup.distributed.Split when `batches` holds this rank's part of the set only
    store: Any = None  # the Store written by prepare(store=...), until installed or discarded
    watch: Any = None  # the file the batches are mapped from (a stored set on the CPU), checked after use

    def verify(self) -> None:
        """Raises :class:`~fastsoup.InputChangedError` when the file the batches are mapped from (a
        stored set) was truncated or rewritten since it was mapped: what was read is not the set."""
        if self.watch is not None:
            self.watch.check(f"the evaluation on the stored {self.name!r} set")

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_batches(self) -> int:
        """Batches of the whole set (split across ranks, ``batches`` holds this rank's parts)."""
        return len(self.batches) if self.split is None else len(self.split.sizes)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(x) for x, _ in self.batches) + self.labels.numel() * self.labels.element_size()


def prepare(data: Iterable, device: torch.device | str, *, name: str = "heldout", split: str | None = "batches",
            store: str | None = None) -> HeldOut:
    """Runs ``data`` (an iterable or DataLoader of batches) once and keeps its tensors on ``device``.

    ``store``: a path prefix; the batches are also written to ``PREFIX.bin`` / ``PREFIX.json`` (see
    :class:`Store`: temporary names until ``held.store.install()``), and on the CPU the returned
    batches are copy-on-write mappings of that file instead of copies in RAM. Batches that hold
    anything but tensors are not stored (``held.store`` is None then). Not under torch.distributed.

    Under torch.distributed (every rank gives the whole set), each rank keeps its part only:
    ``split="batches"``: batch i on rank i % world; ``"rows"``: a range of rows of every batch; None:
    all of it (see :mod:`fastsoup.distributed`).

    A batch is ``(inputs, labels)``, or a dict (any mapping: a tokenizer's or a collator's
    BatchEncoding too) with ``"labels"`` (or ``"label"``) and either ``"images"`` (or
    ``"inputs"``/``"input"``) or the model's input names as transformers models take them
    (``{"pixel_values", "labels"}``, ``{"input_ids", "attention_mask", "labels"}``: the model is
    called as ``model(**inputs)`` without the labels). Inputs are a tensor, a tuple of tensors
    (``model(*inputs)``) or a dict (``model(**inputs)``); labels a tensor with one entry per example.

    Raises:
        FastsoupError: the data is empty or a batch has another structure.
    """
    comm = _distributed.current() if split is not None else None
    st = Store(store) if store is not None and comm is None else None
    try:
        return _prepare(data, device, name, split, comm, st)
    except BaseException:  # the pipeline failed or was interrupted: no half-written store is left
        if st is not None:
            st.discard()
        raise


def _prepare(data: Iterable, device, name: str, split, comm, st) -> HeldOut:
    import time

    start = time.perf_counter()
    device = torch.device(device)
    h = hashlib.blake2b(digest_size=16)
    batches, labels = [], []
    mapped = st is not None and device.type == "cpu"  # the CPU set lives in the store's file
    parts, offset = [], 0
    try:
        iterator = iter(data)
    except TypeError:
        raise FastsoupError(f"{name}: expected an iterable of (inputs, labels) batches, got {type(data).__name__}") from None
    for i, batch in enumerate(iterator):
        x, y = _split(batch, name, i)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dim() == 0:
            raise FastsoupError(f"{name}: batch {i} has a scalar label tensor; expected one label per example")
        _hash(h, x)
        _hash(h, y)
        if st is not None and not st.add(x, y):  # not storable: keep the set in memory, as without a store
            if mapped:
                batches = st.mapped()
                labels = [yb for _, yb in batches]
            st.discard()
            st, mapped = None, False
        if mapped:
            # Mapped from the store's file at the end, labels too: nothing of the batch stays in RAM (even
            # a small tensor kept per batch would pin the freed memory of the large ones in the heap).
            batches.append(None)
        elif comm is None:
            labels.append(y.detach().cpu())
            batches.append((_to(x, device), y.detach().to(device)))
        else:  # torch.distributed: this rank's part only
            labels.append(y.detach().cpu())
            part = _distributed.take_part(comm, split, i, offset, x, y)
            if part is not None:
                batches.append((_to(part[0], device), part[1].detach().to(device)))
                parts.append(part[2])
        offset += int(y.shape[0])
    if st is not None:
        st.finish(name, h.hexdigest())
        if mapped:
            batches = st.mapped()
            labels = [y for _, y in batches]
    watch = getattr(batches, "watch", None) or getattr(data, "watch", None)  # batches mapped from a file
    if not labels or sum(y.shape[0] for y in labels) == 0:
        if st is not None:
            st.discard()
        raise FastsoupError(f"{name}: the data set is empty (no batches, or no examples): greedy search needs held-out examples")
    held = HeldOut(name, batches, torch.cat(labels), h.hexdigest(), time.perf_counter() - start, store=st,
                   watch=watch if device.type == "cpu" else None)
    if watch is not None:
        watch.check(f"the preparation of {name!r}")  # read once: for the fingerprint (and the copy to a GPU)
    if comm is not None:
        held.split = _distributed.agree_split(comm, split, parts, [int(y.shape[0]) for y in labels], held.fingerprint, name)
    return held


class Regrouping:
    """A plan to run a :class:`HeldOut` set's examples in another order, regrouped into batches of the
    set's own sizes (so the model sees the same batch shapes). Built by :func:`regroup`.

    ``ids[t]``: the examples of batch t (ascending, on the CPU); ``parts[t]``: (source batch, rows on
    the data's device) pairs that gather them.
    """

    def __init__(self, ids: list, parts: list):
        self.ids, self.parts = ids, parts

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, data: HeldOut, t: int):
        """Batch t: (inputs, labels) gathered from the set's batches."""
        parts = self.parts[t]
        xs = [data.batches[b][0] for b, _ in parts]
        ys = [data.batches[b][1] for b, _ in parts]
        rows = [r for _, r in parts]
        return _gather(xs, rows), _gather(ys, rows)


def regroupable(data: HeldOut) -> str | None:
    """None when the examples of ``data`` can be regrouped into other batches (every batch has the same
    structure of inputs, each a tensor with one row per label and the same trailing shape, dtype and
    device in every batch); else why not."""
    if data.split is not None:
        return "the set is split across torch.distributed ranks"
    if len(data.batches) < 2:
        return "the set has a single batch"
    ref = _signature(data.batches[0])
    if ref is None:
        return "a batch holds something other than tensors with one row per label"
    for i, batch in enumerate(data.batches[1:], 1):
        if _signature(batch) != ref:
            return f"batch {i} differs from batch 0 in structure, trailing shape, dtype or device"
    return None


def regroup(data: HeldOut, order: torch.Tensor) -> Regrouping:
    """The plan to run the examples in ``order`` (a permutation of ``range(data.size)``): batch t holds
    the next ``len(batch t)`` examples of ``order``, so the batch sizes are the set's own."""
    sizes = [int(y.shape[0]) for _, y in data.batches]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    source = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.as_tensor(order, dtype=torch.int64).cpu()
    if order.shape != (data.size,) or not torch.equal(torch.sort(order).values, torch.arange(data.size)):
        raise ValueError(f"order must be a permutation of the {data.size} example indices")
    device = _device_of(data.batches[0][1])
    ids, parts, start = [], [], 0
    for n in sizes:
        chunk = torch.sort(order[start:start + n]).values
        start += n
        b = source[chunk]
        bs, counts = torch.unique_consecutive(b, return_counts=True)
        rows = (chunk - offsets[b]).split(counts.tolist())
        ids.append(chunk)
        parts.append([(int(bi), r.to(device)) for bi, r in zip(bs.tolist(), rows)])
    return Regrouping(ids, parts)


CHECK_BATCHES = 3  # model calls of check_regrouping


def check_regrouping(model: torch.nn.Module, data: HeldOut, plan: Regrouping) -> str | None:
    """Checks, with the model's current weights, that regrouping leaves every example's logits
    unchanged bit for bit: the batch that gives most rows to the plan's first batch is run as it is,
    in reverse row order, and inside the first batch of the plan (``CHECK_BATCHES`` model calls).
    None when equal; else what differs.

    This is what keeps hardest-first regrouping exact: a model whose outputs depend on the other
    examples of the batch (or on the row position) fails it, and the search keeps the set's batches.
    """
    parts = plan.parts[0]
    k = max(range(len(parts)), key=lambda i: int(parts[i][1].numel()))
    b, rows = parts[k]
    x, y = data.batches[b]
    rev = torch.arange(int(y.shape[0]) - 1, -1, -1, device=_device_of(y))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            natural = model_logits(model, x, y, data.name).float().cpu()
            reversed_ = model_logits(model, _gather([x], [rev]), y, data.name).float().cpu()
            px, py = plan.batch(data, 0)
            inside = model_logits(model, px, py, data.name).float().cpu()
    finally:
        model.train(was_training)
    at = sum(int(r.numel()) for _, r in parts[:k])
    if not torch.equal(reversed_.flip(0).view(torch.int32), natural.view(torch.int32)):
        return f"batch {b}'s logits change when its rows are reversed"
    if not torch.equal(inside[at:at + int(rows.numel())].view(torch.int32), natural[rows.cpu()].view(torch.int32)):
        return f"batch {b}'s logits change when its rows are batched with other examples"
    return None


STORE_FORMAT = "fastsoup-heldout-1"
_ALIGN = 64  # byte alignment of every tensor in a store's .bin


class Store:
    """A prepared data set on disk: ``PREFIX.bin`` holds the tensors' bytes (each 64-byte aligned,
    written as the batches come, so the set never has to be in memory at once) and ``PREFIX.json``
    the batches' structure, every tensor's dtype, shape and offset, the set's name and fingerprint.

    Written under temporary names of :mod:`fastsoup.io._tempfiles` (``.BASE.tmp-PID-TOKEN.bin`` and
    ``.json``, locked while this process has them), which a later Store of the same prefix reaps
    once their process is gone (a kill that no handler saw); :meth:`install` renames them into
    place (the .json last, so a complete .json always describes a complete .bin), :meth:`discard`
    removes them.
    """

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        folder = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(folder, exist_ok=True)
        _tempfiles.reap(folder, os.path.basename(self.prefix))
        self.tmp = _tempfiles.temp_path(self.prefix)  # the files are self.tmp + ".bin" / ".json"
        self._file = open(self.tmp + ".bin", "xb")
        self._locks = [_tempfiles.hold(self.tmp + ".bin")]
        self.tensors: list = []  # [dtype, shape, offset, nbytes]
        self.batches: list = []  # [x structure, y structure]; leaves index self.tensors
        self.offset = 0

    def add(self, x, y) -> bool:
        """Appends one batch; False (nothing appended) when it holds anything but tensors."""
        if not (_storable(x) and _storable(y)):
            return False
        self.batches.append([self._put(x), self._put(y)])
        return True

    def _put(self, x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            pad = -self.offset % _ALIGN
            if pad:
                self._file.write(b"\0" * pad)
                self.offset += pad
            nbytes = t.numel() * t.element_size()
            if nbytes:
                self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
            self.tensors.append([str(t.dtype).replace("torch.", ""), list(t.shape), self.offset, nbytes])
            self.offset += nbytes
            return len(self.tensors) - 1
        if isinstance(x, dict):
            return {"dict": [[k, self._put(v)] for k, v in x.items()]}
        return {type(x).__name__: [self._put(v) for v in x]}

    def finish(self, name: str, fingerprint: str) -> None:
        """Closes the .bin and writes the (temporary) .json."""
        self._file.close()
        with open(self.tmp + ".json", "x") as f:
            self._locks.append(_tempfiles.hold(self.tmp + ".json"))
            json.dump({"format": STORE_FORMAT, "name": name, "fingerprint": fingerprint, "bytes": self.offset,
                       "tensors": self.tensors, "batches": self.batches}, f)

    def mapped(self) -> list:
        """The batches written so far, as copy-on-write views of the .bin (no copy in RAM)."""
        if not self._file.closed:
            self._file.flush()
        return _batches_of(self.tmp + ".bin", self.tensors, self.batches, self.offset)

    def install(self) -> None:
        """Moves the files into place (replacing an earlier store of the same prefix: its .json goes
        first, so no moment pairs the old .json with the new .bin)."""
        try:
            os.remove(self.prefix + ".json")
        except FileNotFoundError:
            pass
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".json", self.prefix + ".json")
        self._release()

    def discard(self) -> None:
        """Removes the temporary files (again: nothing)."""
        if not self._file.closed:
            self._file.close()
        for ext in (".bin", ".json"):
            _tempfiles.remove(self.tmp + ext)
        self._release()

    def _release(self) -> None:
        locks, self._locks = self._locks, []
        for fd in locks:
            _tempfiles.release(fd)


def load_heldout(prefix: str) -> tuple[list, str]:
    """The batches a :class:`Store` at ``prefix`` holds (CPU tensors, copy-on-write views of its .bin)
    and the fingerprint it was stored with.

    Raises:
        FastsoupError: nothing is stored there, or the files are not (or no longer) a stored set.
    """
    path = prefix + ".json"
    if not os.path.exists(path):
        raise FastsoupError(f"{path}: no stored held-out data (a search with this cache_dir stores it; give the data "
                            "set itself instead)")
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {STORE_FORMAT!r}")
        batches = _batches_of(prefix + ".bin", meta["tensors"], meta["batches"], int(meta["bytes"]))
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise FastsoupError(f"{prefix}.bin/.json: the stored held-out set is damaged ({e}): give the data set to "
                            "store it again") from None
    return batches, meta.get("fingerprint", "")


class _MappedBatches(list):
    """Batches whose tensors are views of one mapped file; ``watch`` checks that file after use."""

    watch: Any = None


def _batches_of(path: str, tensors: list, batches: list, size: int) -> list:
    from ..io.checkpoint import FileWatch, _map

    # Copy-on-write (private pages: a model that writes into its inputs never writes the file), and
    # guarded: a read past the end of a file truncated meanwhile reads zeros, which watch.check() refuses.
    mapped = _map(path, writable=True)
    have = mapped.size
    if have < size:
        raise ValueError(f"{path} has {have} bytes, the set needs {size}: truncated")
    mm = mapped if have else None

    def tensor(i):
        dtype, shape, offset, nbytes = tensors[i]
        dt = getattr(torch, dtype)
        if not isinstance(dt, torch.dtype) or offset + nbytes > have:
            raise ValueError(f"tensor {i}: dtype {dtype!r} or bytes [{offset}, {offset + nbytes}) out of range")
        if nbytes == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize, offset=offset).view(shape)

    def build(spec):
        if isinstance(spec, int):
            return tensor(spec)
        (kind, items), = spec.items()
        if kind == "dict":
            return {k: build(v) for k, v in items}
        values = [build(v) for v in items]
        return tuple(values) if kind == "tuple" else values

    out = _MappedBatches((build(sx), build(sy)) for sx, sy in batches)
    out.watch = FileWatch(path, mapped.fileno(), mapped, mapped)
    return out


def _storable(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return all(isinstance(k, str) and _storable(v) for k, v in x.items())
    if isinstance(x, (tuple, list)):
        return all(_storable(v) for v in x)
    return False


@dataclass
class Evaluation:
    logits: torch.Tensor | None  # all logits (CPU, float32) when evaluated to the end
    score: float | None  # None when stopped early
    correct: int | None  # accuracy only
    batches: int  # batches evaluated
    complete: bool


def evaluate(
    model: torch.nn.Module,
    data: HeldOut,
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
    if data.split is not None:  # split across the ranks of torch.distributed: collective
        return _distributed.evaluate(model, data, metric, need=need, progress=progress)
    nb = len(data.batches) if regrouping is None else len(regrouping)
    if order is None:
        order = range(nb)
    elif sorted(order) != list(range(nb)):
        raise ValueError(f"order must be a permutation of the {nb} batch indices")
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
    raise ValueError(f"metric must be 'accuracy' or a callable (logits, labels) -> float, got {metric!r}")


def metric_name(metric: str | Metric) -> str:
    if isinstance(metric, str):
        return metric
    return f"{getattr(metric, '__module__', '?')}.{getattr(metric, '__qualname__', repr(metric))}"


def progress_bar(enabled: bool | None, total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr is not None and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


_LABELS = ("labels", "label")
_POSITIONAL = ("images", "inputs", "input")  # {"images": x, "labels": y}: model(x)


def _split(batch: Any, name: str, i: int):
    """(inputs, labels) of one batch. A mapping (a dict, or the BatchEncoding of a tokenizer or a
    collator) holds ``labels`` (or ``label``) and either ``images``/``inputs``/``input`` (the model
    is called with that value) or the model's own input names (``pixel_values``, ``input_ids``,
    ``attention_mask``, ...: the model is called with them as keyword arguments)."""
    if isinstance(batch, Mapping):
        keys = [str(k) for k in batch.keys()]
        y = next((batch[k] for k in _LABELS if k in batch), None)
        if y is None:
            what = "dict" if isinstance(batch, dict) else type(batch).__name__
            raise FastsoupError(f"{name}: batch {i} is a {what} with keys {sorted(keys)} but no 'labels' (or 'label'); "
                                "expected the labels and the inputs ('images', 'inputs', or the model's input names)")
        positional = next((k for k in _POSITIONAL if k in batch), None)
        if positional is not None:
            return batch[positional], y
        inputs = {k: batch[k] for k in batch.keys() if k not in _LABELS}
        if not inputs:
            raise FastsoupError(f"{name}: batch {i} holds labels but no inputs (keys {sorted(keys)})")
        return inputs, y  # model(**inputs), as transformers models take them
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise FastsoupError(f"{name}: batch {i} is a {type(batch).__name__}; expected (inputs, labels)")


def model_logits(model, x, y=None, name: str = "data") -> torch.Tensor:
    """The model's logits on one batch (a tensor, or the ``.logits`` of what it returns), checked to
    have one row per label when ``y`` is given."""
    logits = _call(model, x)
    if not isinstance(logits, torch.Tensor):
        logits = getattr(logits, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise FastsoupError("the model must return a logits tensor (or an object with .logits)")
    if y is not None and logits.shape[0] != y.shape[0]:
        raise FastsoupError(f"{name}: the model returned {logits.shape[0]} rows of logits for a batch of {y.shape[0]} labels")
    return logits


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) is; the CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _call(model, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _hash(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(x, dict):
        for k in sorted(x):
            h.update(repr(k).encode())
            _hash(h, x[k])
    elif isinstance(x, (tuple, list)):
        h.update(b"(")
        for v in x:
            _hash(h, v)
        h.update(b")")
    else:
        h.update(repr(x).encode())


def _device_of(x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    if isinstance(x, dict):
        return _device_of(next(iter(x.values())))
    return _device_of(x[0])


def _signature(batch):
    """(structure, trailing shapes, dtypes, devices) of a batch whose every tensor has one row per
    label; None when it holds anything else."""
    x, y = batch
    if not isinstance(y, torch.Tensor) or y.dim() == 0:
        return None
    n = int(y.shape[0])

    def sig(t):
        if isinstance(t, torch.Tensor):
            if t.dim() == 0 or int(t.shape[0]) != n:
                raise TypeError
            return ("t", tuple(t.shape[1:]), t.dtype, t.device)
        if isinstance(t, dict):
            return ("d", tuple((k, sig(t[k])) for k in sorted(t)))
        if isinstance(t, (tuple, list)) and t:
            return (type(t).__name__, tuple(sig(v) for v in t))
        raise TypeError

    try:
        return sig(x), sig(y)
    except TypeError:
        return None


def _gather(items: list, rows: list):
    """The rows ``rows[i]`` of ``items[i]`` (tensors, or dicts/tuples of tensors of one structure),
    concatenated in that order."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        if len(items) == 1:
            return first.index_select(0, rows[0])
        return torch.cat([t.index_select(0, r) for t, r in zip(items, rows)])
    if isinstance(first, dict):
        return {k: _gather([t[k] for t in items], rows) for k in first}
    return type(first)(_gather([t[i] for t in items], rows) for i in range(len(first)))


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0
