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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import DataError
from ..distributed import comm as _comm
from ..distributed import evaluation as _parallel
from .batches import hash_batch, nbytes_of, split_batch, to_device
from .store import Store


@dataclass
class HeldOut:
    """A data set prepared for repeated evaluation: batches on the device, labels, fingerprint."""

    name: str
    batches: list  # (inputs, labels) with inputs a tensor, a tuple of tensors or a dict of tensors
    labels: torch.Tensor  # all labels, concatenated, on the CPU
    fingerprint: str
    prepare_seconds: float = 0.0
    split: Any = None  # a fastsoup.distributed.evaluation.Split when `batches` holds this rank's part of the set only
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
        return sum(nbytes_of(x) for x, _ in self.batches) + self.labels.numel() * self.labels.element_size()


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
    comm = _comm.current() if split is not None else None
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
        raise DataError(f"{name}: expected an iterable of (inputs, labels) batches, got {type(data).__name__}") from None
    for i, batch in enumerate(iterator):
        x, y = split_batch(batch, name, i)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dim() == 0:
            raise DataError(f"{name}: batch {i} has a scalar label tensor; expected one label per example")
        hash_batch(h, x)
        hash_batch(h, y)
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
            batches.append((to_device(x, device), y.detach().to(device)))
        else:  # torch.distributed: this rank's part only
            labels.append(y.detach().cpu())
            part = _parallel.take_part(comm, split, i, offset, x, y)
            if part is not None:
                batches.append((to_device(part[0], device), part[1].detach().to(device)))
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
        raise DataError(f"{name}: the data set is empty (no batches, or no examples): greedy search needs held-out examples")
    held = HeldOut(name, batches, torch.cat(labels), h.hexdigest(), time.perf_counter() - start, store=st,
                   watch=watch if device.type == "cpu" else None)
    if watch is not None:
        watch.check(f"the preparation of {name!r}")  # read once: for the fingerprint (and the copy to a GPU)
    if comm is not None:
        held.split = _parallel.agree_split(comm, split, parts, [int(y.shape[0]) for y in labels], held.fingerprint, name)
    return held



__all__ = ["HeldOut", "prepare"]
