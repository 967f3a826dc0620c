"""Plain-torch references of every native primitive: the oracle the tests compare against.

Never used as a fallback for a missing or broken native build. Each follows the summation order
documented in csrc/include/fastsoup/kernels.h: start from -0.0, add ``w_k * float32(x_k)`` for
k = 0..K-1 (product and sum each rounded to float32, no FMA), cast once at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype,
                 accumulate_into: torch.Tensor | None = None) -> torch.Tensor:
    if accumulate_into is not None:
        acc = accumulate_into.detach().clone().float()
    elif tensors:
        acc = torch.full(tensors[0].shape, -0.0, dtype=torch.float32)
    else:
        raise ValueError("weighted_sum reference: no tensors")
    for t, w in zip(tensors, weights):
        acc = acc + t.detach().float() * torch.tensor(w, dtype=torch.float32)
    return acc if accumulate_into is not None else acc.to(dtype)


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What fastsoup.average computes: normalized weights (in float64, then float32), fused sum,
    integer/bool tensors copied from the first state dict."""
    k = len(state_dicts)
    if weights is None:
        ws = [1.0 / k] * k
    else:
        total = sum(float(w) for w in weights)
        ws = [float(w) / total for w in weights]
    return combine_state_dicts(state_dicts, ws, dtype)


def combine_state_dicts(state_dicts, ws, dtype=None):
    out = {}
    for name, t0 in state_dicts[0].items():
        if t0.is_floating_point():
            out[name] = weighted_sum([sd[name] for sd in state_dicts], ws, dtype or t0.dtype)
        else:
            out[name] = t0.clone()
    return out


def multi_dot(tensors: Sequence[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """float64 reference of sum_i g[i] * x_k[i] (the native one sums float32 products in blocks)."""
    gd = g.detach().reshape(-1).double()
    return torch.stack([(t.detach().reshape(-1).double() * gd).sum() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def gram(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, 0, dtype=torch.float64)
    x = torch.stack([t.detach().reshape(-1).double() for t in tensors])
    return x @ x.T


def soup_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor]) -> dict:
    """The uniform soup as fastsoup.Soup computes it, re-summed from scratch: for float tensors
    ``cast(float32(1/n) * (((0 + x_0) + x_1) + ...))`` in ``like``'s dtypes; others from the first."""
    n = len(state_dicts)
    out = {}
    for name, ref in like.items():
        if not ref.is_floating_point():
            out[name] = state_dicts[0][name].clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for sd in state_dicts:
            acc = acc + sd[name].detach().float()
        out[name] = (acc * torch.tensor(1.0 / n, dtype=torch.float32)).to(ref.dtype)
    return out


def greedy_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]], model: torch.nn.Module, batches, *,
                strict: bool = False) -> tuple[list[int], float, list[float]]:
    """The paper's Recipe 1, plainly: score every ingredient on every batch, stable sort descending,
    and for each next ingredient re-average the kept ones plus it from scratch (float32), evaluate on
    all the held-out data, keep it if accuracy >= the best (``>`` when strict).

    Returns:
        (kept indices in order, greedy soup accuracy, individual accuracies).
    """
    like = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def accuracy(sd) -> float:
        model.load_state_dict(sd)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in batches:
                correct += int((model(x).argmax(dim=-1) == y).sum())
                total += int(y.shape[0])
        return correct / total

    scores = [accuracy(sd) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        acc = accuracy(soup_state_dict([state_dicts[i] for i in kept + [j]], like))
        if acc > best or (not strict and acc == best):
            kept.append(j)
            best = acc
    return kept, best, scores
