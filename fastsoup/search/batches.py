"""Walkers over the nested batches of a held-out set: a batch is ``(inputs, labels)`` or a mapping, and
inputs are a tensor, a tuple/list of tensors or a dict of them (nested freely). Every function here
takes such a structure apart or rebuilds it; nothing here knows of data sets, stores or ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._errors import DataError, FastsoupError

_LABELS = ("labels", "label")
_POSITIONAL = ("images", "inputs", "input")  # {"images": x, "labels": y}: model(x)


def split_batch(batch: Any, name: str, i: int):
    """(inputs, labels) of one batch. A mapping (a dict, or the BatchEncoding of a tokenizer or a
    collator) holds ``labels`` (or ``label``) and either ``images``/``inputs``/``input`` (the model
    is called with that value) or the model's own input names (``pixel_values``, ``input_ids``,
    ``attention_mask``, ...: the model is called with them as keyword arguments)."""
    if isinstance(batch, Mapping):
        keys = [str(k) for k in batch.keys()]
        y = next((batch[k] for k in _LABELS if k in batch), None)
        if y is None:
            what = "dict" if isinstance(batch, dict) else type(batch).__name__
            raise DataError(f"{name}: batch {i} is a {what} with keys {sorted(keys)} but no 'labels' (or 'label'); "
                                "expected the labels and the inputs ('images', 'inputs', or the model's input names)")
        positional = next((k for k in _POSITIONAL if k in batch), None)
        if positional is not None:
            return batch[positional], y
        inputs = {k: batch[k] for k in batch.keys() if k not in _LABELS}
        if not inputs:
            raise DataError(f"{name}: batch {i} holds labels but no inputs (keys {sorted(keys)})")
        return inputs, y  # model(**inputs), as transformers models take them
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(f"{name}: batch {i} is a {type(batch).__name__}; expected (inputs, labels)")


def model_logits(model, x, y=None, name: str = "data") -> torch.Tensor:
    """The model's logits on one batch (a tensor, or the ``.logits`` of what it returns), checked to
    have one row per label when ``y`` is given."""
    logits = call_model(model, x)
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


def call_model(model, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def hash_batch(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(x, dict):
        for k in sorted(x):
            h.update(repr(k).encode())
            hash_batch(h, x[k])
    elif isinstance(x, (tuple, list)):
        h.update(b"(")
        for v in x:
            hash_batch(h, v)
        h.update(b")")
    else:
        h.update(repr(x).encode())


def device_of(x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    if isinstance(x, dict):
        return device_of(next(iter(x.values())))
    return device_of(x[0])


def signature(batch):
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


def gather_rows(items: list, rows: list):
    """The rows ``rows[i]`` of ``items[i]`` (tensors, or dicts/tuples of tensors of one structure),
    concatenated in that order."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        if len(items) == 1:
            return first.index_select(0, rows[0])
        return torch.cat([t.index_select(0, r) for t, r in zip(items, rows)])
    if isinstance(first, dict):
        return {k: gather_rows([t[k] for t in items], rows) for k in first}
    return type(first)(gather_rows([t[i] for t in items], rows) for i in range(len(first)))


def nbytes_of(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(nbytes_of(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(nbytes_of(v) for v in x)
    return 0


def take_rows(x: Any, n: int, lo: int, hi: int):
    """Rows ``lo:hi`` of every tensor of ``x`` that has ``n`` rows (the others as they are)."""
    if hasattr(x, "shape") and len(getattr(x, "shape", ())) > 0 and x.shape[0] == n:
        return x[lo:hi]
    if isinstance(x, dict):
        return {k: take_rows(v, n, lo, hi) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(take_rows(v, n, lo, hi) for v in x)
    return x


def storable(x) -> bool:
    """True for a tensor, or dicts (string keys), tuples and lists of storable things."""
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return all(isinstance(k, str) and storable(v) for k, v in x.items())
    if isinstance(x, (tuple, list)):
        return all(storable(v) for v in x)
    return False


__all__ = ["call_model", "device_of", "gather_rows", "hash_batch", "model_device", "model_logits", "nbytes_of",
           "signature", "split_batch", "storable", "take_rows", "to_device"]
