"""The one module that knows torch: tensors <-> addresses and dtype codes, torch files, and the
tensor-level entry points of the native kernels.

Imported on first use only; ``import fastsoup`` and merges of safetensors files never import it.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from collections.abc import Sequence

import torch

from ._dtypes import BY_NAME, FLOAT_NAMES, info
from ._errors import CheckpointError
from ._native import _core

_TORCH_DTYPES = {name: getattr(torch, name) for name in BY_NAME if isinstance(getattr(torch, name, None), torch.dtype)}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16"."""
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name} has no torch equivalent in torch {torch.__version__}") from None


# Types a torch file may hold besides tensors and the containers torch allows by default: plain data
# containers only, never a class whose construction runs code of its own. argparse.Namespace: timm's
# train.py saves its arguments as one (``checkpoint["args"]``).
PLAIN_GLOBALS = (argparse.Namespace,)


def _allowing_plain_globals():
    """The scope of :data:`PLAIN_GLOBALS` in ``torch.load(weights_only=True)``: the ``safe_globals``
    context manager (torch >= 2.5), else ``add_safe_globals`` (process-wide, torch 2.4)."""
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):
        return ser.safe_globals(list(PLAIN_GLOBALS))
    if hasattr(ser, "add_safe_globals"):
        ser.add_safe_globals(list(PLAIN_GLOBALS))
    return contextlib.nullcontext()


def load_file(path: str):
    """``torch.load`` of a .pt/.bin file: memory-mapped and weights-only where the format allows.
    Returns ``(object, mapped)``: mapped is False for legacy (non-zip) files, which are read whole.

    ``weights_only=True`` always, with :data:`PLAIN_GLOBALS` allowed besides torch's defaults. A file
    that needs any other global (a class, a function: what a pickle can run) raises a
    :class:`~fastsoup.CheckpointError` naming it; nothing of the file is executed."""
    try:
        with _allowing_plain_globals():
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True), True
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: load them whole
                    raise
                return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a damaged file, not a refused type
            raise
        raise CheckpointError(_refusal(path, e)) from None


def _refusal(path: str, e: Exception) -> str:
    """The message for a torch file that weights-only loading refused: the types it needs, or what
    stopped the unpickler (a damaged file, or not a torch file)."""
    names = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(e))))
    if not names and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        plain = {f"{t.__module__}.{t.__qualname__}" for t in PLAIN_GLOBALS}
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in plain]
        except Exception:  # not a zip file, or unreadable: no names
            names = []
    if not names:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        return (f"{path}: cannot load as a torch checkpoint (damaged, or not one): weights-only unpickling stopped"
                + (f" at: {detail.group(1).strip()}" if detail else ""))
    allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in PLAIN_GLOBALS)
    return (
        f"{path}: holds a {', '.join(names)} object, which fastsoup does not load: it reads torch files with "
        f"weights_only=True (tensors, numbers, strings, lists, tuples, dicts, {allowed}) and never runs code from a "
        "checkpoint. If you trust the file, load it in your own code and save its state dict alone "
        "(safetensors.torch.save_file(state_dict, 'model.safetensors'))"
    )


def save_state_dict(tensors, fd: int) -> None:
    """``torch.save`` of a state dict (name -> torch tensor or numpy array) into the open file ``fd``,
    from its start: CPU tensors, each saved with a storage of its own size (a view of a larger
    buffer would otherwise carry the whole buffer into the file)."""
    import os

    sd = {}
    for name, t in tensors.items():
        t = t if isinstance(t, torch.Tensor) else torch.from_numpy(t)
        t = t.detach().cpu()
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        sd[name] = t
    with os.fdopen(os.dup(fd), "wb") as f:
        torch.save(sd, f)


def guard_mapped_storages(obj, path: str):
    """A native FaultGuard over the file mapping that ``torch.load(mmap=True)`` made for ``path``:
    the span of the storages of the tensors in ``obj`` (a possibly nested state dict), which all lie
    in that one mapping. A read of a page that a truncation removed then reads zeros and is counted,
    instead of killing the process with SIGBUS. None when there is no tensor data."""
    lo, hi = None, None
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_meta:
                continue
            st = x.untyped_storage()
            if st.nbytes() == 0:
                continue
            a = st.data_ptr()
            lo = a if lo is None else min(lo, a)
            hi = a + st.nbytes() if hi is None else max(hi, a + st.nbytes())
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    if lo is None:
        return None
    return _core.FaultGuard(lo, hi - lo, path)


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with t's data: t itself when it already is one, else a copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def as_tensor(x) -> torch.Tensor:
    """A torch tensor from a torch tensor (detached) or a numpy array (shared memory)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return torch.from_numpy(x)


def empty(shape: Sequence[int], dtype: str, device: str = "cpu") -> torch.Tensor:
    try:
        return torch.empty(tuple(shape), dtype=torch_dtype(dtype), device=device)
    except (RuntimeError, OverflowError) as e:  # sizes torch cannot allocate (overflow, out of memory)
        raise ValueError(f"cannot allocate a {dtype} tensor of shape {list(shape)} on {device}: {e}") from None


def current_cuda_index() -> int:
    return torch.cuda.current_device()


def cuda_stream(index: int) -> int:
    """torch's current stream on CUDA device ``index``, as the integer the native core takes."""
    return torch.cuda.current_stream(index).cuda_stream


def on_device(t, device) -> bool:
    """Whether t is a contiguous torch tensor in the memory of ``device`` (an engine Device)."""
    return (isinstance(t, torch.Tensor) and device.is_cuda and t.device.type == "cuda"
            and t.device.index == device.index and t.is_contiguous())


def tensor_from_address(addr: int, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A new tensor holding a copy of the bytes at ``addr`` (data of the given dtype and shape)."""
    out = empty(shape, dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes:
        _core.copy(out.data_ptr(), addr, nbytes)  # a guarded mapping: a truncation reads zeros (checked by the caller)
    return out


def staging_like(t: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """A contiguous tensor shaped like t on ``device``; on the host it is pinned when t is on a GPU
    (for async copies)."""
    if device != "cpu":
        return torch.empty(tuple(t.shape), dtype=t.dtype, device=device)
    return torch.empty(tuple(t.shape), dtype=t.dtype, pin_memory=t.device.type == "cuda")


def synchronize(device: torch.device) -> None:
    """Waits for the copies queued on device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# Tensor-level kernels (CPU). Arguments are checked here, at the boundary, with messages that name
# the op and the argument; the native core checks addresses and codes again.


def _float_code(op: str, what: str, t: torch.Tensor, device: torch.device | None = None) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {what} is a {type(t).__name__}, expected a torch.Tensor")
    want = device if device is not None else torch.device("cpu")
    if t.device != want:
        raise ValueError(f"{op}: {what} is on {t.device}, the other operands on {want}: put them on one device")
    name = dtype_name(t.dtype)
    if name not in FLOAT_NAMES:
        raise ValueError(f"{op}: {what} has dtype {name}, expected float16, bfloat16, float32 or float64")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {what} is not contiguous; pass t.contiguous()")
    return info(name).code


def _inputs(op: str, tensors: Sequence[torch.Tensor], numel: int | None, device: torch.device | None = None):
    addrs, codes = [], []
    for k, t in enumerate(tensors):
        codes.append(_float_code(op, f"inputs[{k}]", t, device))
        if numel is not None and t.numel() != numel:
            raise ValueError(f"{op}: inputs[{k}] has {t.numel()} elements, expected {numel}")
        addrs.append(t.data_ptr())
    return addrs, codes


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    out: torch.Tensor | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: bool = False,
    threads: int = 0,
    divisor: float = 1.0,
    divisor_lo: float = 0.0,
) -> torch.Tensor:
    """``out = round(sum_k weights[k] * tensors[k] / divisor)`` in one fused pass (native kernel):
    binary64 arithmetic, one rounding to ``out``'s dtype (csrc/include/fastsoup/kernels.h).

    Args:
        tensors: K contiguous tensors with the same number of elements (float16, bfloat16,
            float32 or float64, mixed freely), all on the CPU or all on one CUDA device (then the
            CUDA kernel runs on torch's current stream).
        weights: K numbers (applied in float64).
        out: where to write (same number of elements, contiguous); a new tensor shaped like
            ``tensors[0]`` when None.
        dtype: dtype of a new ``out`` (default: that of ``tensors[0]``).
        accumulate: add into ``out`` (float32) instead of overwriting it (divisor must be 1).
        threads: CPU threads (0 = all).
        divisor: the sum is divided by it once, before the rounding (``weights`` of 1 and
            ``divisor=K`` give the mean of K tensors rounded once).
        divisor_lo: a low part of the divisor (it is ``divisor + divisor_lo``), used when an
            operand is float64 (e.g. the rounding error of a weight total, ``math.fsum``).

    Returns:
        ``out``.
    """
    from ._dtypes import parse_float_dtype

    op = "weighted_sum"
    if len(weights) != len(tensors):
        raise ValueError(f"{op}: got {len(tensors)} tensors and {len(weights)} weights")
    if out is None:
        if accumulate:
            raise ValueError(f"{op}: accumulate=True needs out")
        if not tensors:
            raise ValueError(f"{op}: with no tensors, pass out")
        name = parse_float_dtype(dtype) if dtype is not None else dtype_name(tensors[0].dtype)
        out = torch.empty(tensors[0].shape, dtype=torch_dtype(name), device=tensors[0].device)
    dev = out.device
    out_code = _float_code(op, "out", out, dev)
    if accumulate and out.dtype != torch.float32:
        raise ValueError(f"{op}: accumulate=True needs a float32 out, got {dtype_name(out.dtype)}")
    addrs, codes = _inputs(op, tensors, out.numel(), dev)
    ws = [float(w) for w in weights]
    if dev.type == "cuda":
        index = _cuda_index(op, dev)
        _core.weighted_sum_cuda(addrs, codes, ws, out.numel(), out.data_ptr(), out_code, accumulate, index,
                                cuda_stream(index), float(divisor), float(divisor_lo))
    else:
        _core.weighted_sum(addrs, codes, ws, out.numel(), out.data_ptr(), out_code, accumulate, threads,
                           float(divisor), float(divisor_lo))
    return out


def _cuda_index(op: str, dev: torch.device) -> int:
    if not _core.cuda_compiled:
        raise RuntimeError(f"{op}: CUDA tensors, but this build of fastsoup has no CUDA (reinstall where nvcc is found)")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def multi_dot(tensors: Sequence[torch.Tensor], g: torch.Tensor, *, threads: int = 0) -> torch.Tensor:
    """``[sum_i g[i] * tensors[k][i] for k]`` in one pass; a float64 tensor of K values."""
    op = "multi_dot"
    g_code = _float_code(op, "g", g, g.device)
    addrs, codes = _inputs(op, tensors, g.numel(), g.device)
    if g.device.type == "cuda":
        index = _cuda_index(op, g.device)
        vals = _core.multi_dot_cuda(addrs, codes, g.data_ptr(), g_code, g.numel(), index, cuda_stream(index))
    else:
        vals = _core.multi_dot(addrs, codes, g.data_ptr(), g_code, g.numel(), threads)
    return torch.tensor(vals, dtype=torch.float64)


def gram(tensors: Sequence[torch.Tensor], *, threads: int = 0) -> torch.Tensor:
    """The K x K matrix of pairwise dot products of K tensors, in one pass (float64)."""
    op = "gram"
    numel = tensors[0].numel() if tensors else 0
    dev = tensors[0].device if tensors else torch.device("cpu")
    addrs, codes = _inputs(op, tensors, numel, dev)
    K = len(tensors)
    if dev.type == "cuda":
        index = _cuda_index(op, dev)
        vals = _core.gram_cuda(addrs, codes, numel, index, cuda_stream(index))
    else:
        vals = _core.gram(addrs, codes, numel, threads)
    return torch.tensor(vals, dtype=torch.float64).reshape(K, K)
