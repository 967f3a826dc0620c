"""Hardest-first regrouping of a held-out set's examples into batches of the set's own sizes, and the
check that keeps it exact (a model whose logits depend on the rest of the batch keeps the set's batches)."""

from __future__ import annotations

import torch

from .._errors import ArgumentError
from .batches import device_of, gather_rows, model_logits, signature


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

    def batch(self, data, t: int):
        """Batch t: (inputs, labels) gathered from the set's batches."""
        parts = self.parts[t]
        xs = [data.batches[b][0] for b, _ in parts]
        ys = [data.batches[b][1] for b, _ in parts]
        rows = [r for _, r in parts]
        return gather_rows(xs, rows), gather_rows(ys, rows)


def regroupable(data) -> str | None:
    """None when the examples of ``data`` can be regrouped into other batches (every batch has the same
    structure of inputs, each a tensor with one row per label and the same trailing shape, dtype and
    device in every batch); else why not."""
    if data.split is not None:
        return "the set is split across torch.distributed ranks"
    if len(data.batches) < 2:
        return "the set has a single batch"
    ref = signature(data.batches[0])
    if ref is None:
        return "a batch holds something other than tensors with one row per label"
    for i, batch in enumerate(data.batches[1:], 1):
        if signature(batch) != ref:
            return f"batch {i} differs from batch 0 in structure, trailing shape, dtype or device"
    return None


def regroup(data, order: torch.Tensor) -> Regrouping:
    """The plan to run the examples in ``order`` (a permutation of ``range(data.size)``): batch t holds
    the next ``len(batch t)`` examples of ``order``, so the batch sizes are the set's own."""
    sizes = [int(y.shape[0]) for _, y in data.batches]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    source = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.as_tensor(order, dtype=torch.int64).cpu()
    if order.shape != (data.size,) or not torch.equal(torch.sort(order).values, torch.arange(data.size)):
        raise ArgumentError(f"order must be a permutation of the {data.size} example indices")
    device = device_of(data.batches[0][1])
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


def check_regrouping(model: torch.nn.Module, data, plan: Regrouping) -> str | None:
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
    rev = torch.arange(int(y.shape[0]) - 1, -1, -1, device=device_of(y))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            natural = model_logits(model, x, y, data.name).float().cpu()
            reversed_ = model_logits(model, gather_rows([x], [rev]), y, data.name).float().cpu()
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


__all__ = ["CHECK_BATCHES", "Regrouping", "check_regrouping", "regroup", "regroupable"]
