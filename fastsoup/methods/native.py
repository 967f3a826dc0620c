"""The native per-tensor merge of the task-vector methods: a thin wrapper of ``_core.sparse_merge``.

One call merges one tensor: task arithmetic, TIES, breadcrumbs (and its TIES variant), DARE linear
and DARE TIES, bit for bit ``fastsoup._reference``'s function of the same name (same defaults). The
tensors are given as ``(address, dtype name)`` pairs (file mappings, buffers: no torch needed) or as
torch tensors (CPU, contiguous; torch is imported only when one is passed).

Example (torch tensors)::

    out = torch.empty_like(base)
    sparse_merge("ties", base, [m1, m2], out, density=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._dtypes import info
from .._native import _core
from .rng import fnv1a64

__all__ = ["DEFAULTS", "METHODS", "sparse_merge"]

METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties")

# The reference's (and mergekit's) defaults: normalize on for ties only, rescale "density" for DARE.
DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"normalize": False, "rescale": None},
    "ties": {"normalize": True, "rescale": None, "density": 1.0},
    "breadcrumbs": {"normalize": False, "rescale": None, "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": False, "rescale": None, "density": 1.0, "gamma": 0.01},
    "dare_linear": {"normalize": False, "rescale": "density", "density": 1.0},
    "dare_ties": {"normalize": False, "rescale": "density", "density": 1.0},
}

_UNSET: Any = object()


def _ref(x: Any, what: str, device: int | None = None) -> tuple[tuple[int, int], int]:
    """``(address, dtype code)`` and numel (-1 when unknown) of a torch tensor or an (address, dtype) pair;
    with ``device`` (a CUDA index), tensors may also be on that GPU."""
    if hasattr(x, "data_ptr"):  # a torch tensor
        if x.device.type != "cpu" and not (device is not None and x.device.type == "cuda"
                                           and x.device.index == device):
            where = "a CPU tensor" if device is None else f"a CPU tensor or one on cuda:{device}"
            raise ValueError(f"sparse_merge: {what} is on {x.device}, expected {where}")
        if not x.is_contiguous():
            raise ValueError(f"sparse_merge: {what} is not contiguous")
        name = str(x.dtype).replace("torch.", "")
        return (x.data_ptr(), _code(name, what)), x.numel()
    addr, dtype = x
    return (int(addr), _code(str(dtype), what)), -1


def _code(name: str, what: str) -> int:
    try:
        code = info(name).code
    except Exception:
        code = -1
    if code < 0:
        raise ValueError(f"sparse_merge: {what} has dtype {name}, expected float16, bfloat16, float32 or float64")
    return code


def _per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * k
    vals = [float(v) for v in value]
    if len(vals) != k:
        raise ValueError(f"sparse_merge: {what} has {len(vals)} values for {k} models")
    return vals


def sparse_merge(method: str, base: Any, models: Sequence[Any], out: Any, *, n: int | None = None,
                 weights: float | Sequence[float] | None = None, density: float | Sequence[float] = _UNSET,
                 gamma: float | Sequence[float] = _UNSET, lam: float = 1.0, normalize: bool = _UNSET,
                 rescale: str | None = _UNSET, seed: int = 0, name: str | None = None, threads: int = 0,
                 chunk: int = 0, device: int | None = None, stream: int = 0) -> None:
    """Merges one tensor into ``out`` with ``method`` (one of ``METHODS``), natively.

    Args:
        method: the method's name.
        base, models, out: torch tensors (CPU, contiguous) or ``(address, dtype name)`` pairs.
        n: the elements of each tensor (required when none is a torch tensor).
        weights: per-model weights (default 1 each).
        density, gamma: a scalar or one per model (defaults: ``DEFAULTS``).
        lam, normalize, rescale: as ``fastsoup._reference`` (defaults per method: ``DEFAULTS``).
        seed, name: DARE's RNG: the seed and the tensor's name (required for DARE).
        threads: 0 uses every core; the result does not depend on it.
        chunk: elements per parallel task (0: automatic; the result does not depend on it).
        device: a CUDA device index: merge on that GPU (``_core.sparse_merge_cuda``, the same bits;
            tensors may be on it or in host memory; ``threads`` and ``chunk`` do not apply). None: the CPU.
        stream: with ``device``, the ``cudaStream_t`` (as an integer) to run on; 0 the default stream.
            Torch tensors on the GPU: pass ``torch.cuda.current_stream().cuda_stream``.

    Raises:
        ValueError: an unknown method, a bad dtype, size, or parameter (named in the message).
    """
    if method not in METHODS:
        raise ValueError(f"sparse_merge: unknown method {method!r}, expected one of {', '.join(METHODS)}")
    defaults = DEFAULTS[method]
    k = len(models)
    base_ref, nb = _ref(base, "base", device)
    out_ref, no = _ref(out, "out", device)
    ins = [_ref(m, f"models[{j}]", device) for j, m in enumerate(models)]
    sizes = {s for s in [nb, no, *(s for _, s in ins)] if s >= 0}
    if n is None:
        if not sizes:
            raise ValueError("sparse_merge: n is required when no tensor is a torch tensor")
        n = sizes.pop() if len(sizes) == 1 else -1
    if n < 0 or any(s != n for s in sizes):
        raise ValueError(f"sparse_merge: the tensors have different sizes ({sorted(sizes)}), or n = {n}")
    ws = _per_model(1.0 if weights is None else weights, k, "weights")
    dens = [] if "density" not in defaults else _per_model(
        defaults["density"] if density is _UNSET else density, k, "density")
    gams = [] if "gamma" not in defaults else _per_model(defaults["gamma"] if gamma is _UNSET else gamma, k, "gamma")
    if "density" not in defaults and density is not _UNSET:
        raise ValueError(f"sparse_merge: {method} takes no density")
    if "gamma" not in defaults and gamma is not _UNSET:
        raise ValueError(f"sparse_merge: {method} takes no gamma")
    name_hash = 0
    if method.startswith("dare"):
        if name is None:
            raise ValueError(f"sparse_merge: {method} needs the tensor's name (it keys the RNG)")
        name_hash = fnv1a64(name)
    if not math.isfinite(float(lam)):
        raise ValueError(f"sparse_merge: lam must be finite, got {lam!r}")
    common = dict(density=dens, gamma=gams, lam=float(lam),
                  normalize=bool(defaults["normalize"] if normalize is _UNSET else normalize),
                  rescale=defaults["rescale"] if rescale is _UNSET else rescale, seed=int(seed), name_hash=name_hash)
    if device is None:
        _core.sparse_merge(method, n, [r for r, _ in ins], base_ref, out_ref, ws, threads=threads, chunk=chunk, **common)
    else:
        _core.sparse_merge_cuda(method, n, [r for r, _ in ins], base_ref, out_ref, ws, device=int(device),
                                stream=int(stream), **common)
