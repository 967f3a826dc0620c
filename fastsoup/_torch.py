"""The one module that knows torch: tensors <-> addresses and dtype codes, torch files, the
tensor-level entry points of the native kernels, and the torch custom ops
``torch.ops.fastsoup.weighted_sum`` / ``multi_dot`` (registered when this module is imported).

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


def copy_bytes_into(dst: torch.Tensor, addr: int, nbytes: int) -> None:
    """Copies ``nbytes`` of host memory at ``addr`` into the contiguous tensor ``dst`` (on any device)."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        _core.copy(src.data_ptr(), addr, nbytes)
    dst.reshape(-1).view(torch.uint8).copy_(src)


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


# ---------------------------------------------------------------------------------------------------
# torch custom ops: torch.ops.fastsoup.weighted_sum and torch.ops.fastsoup.multi_dot, registered when
# this module is imported (never by ``import fastsoup`` or a merge of files). Each op is defined once
# with its schema, gets one kernel per device (CPU: the native CPU kernels; CUDA: the ``_cuda``
# variants on torch's current stream of the data's device) and a fake kernel, which checks the
# operands as the real ones do and gives the result's shape, dtype and device, so that
# ``torch.compile`` traces through the ops and meta tensors work. Both are differentiable. Registering
# the CUDA kernels needs neither a GPU nor a CUDA build of fastsoup: without one, they raise when called.


def _op_operands(op: str, tensors: Sequence[torch.Tensor], like: str, numel, device: torch.device) -> list[int]:
    """The dtype codes of the operands, checked: float, contiguous, on ``device`` and with ``numel``
    elements, those of the operand named ``like``. Reads no data, so fake and meta tensors pass too."""
    codes = []
    for k, t in enumerate(tensors):
        codes.append(_float_code(op, f"inputs[{k}]", t, device))
        if t.numel() != numel:
            raise ValueError(f"{op}: inputs[{k}] has {t.numel()} elements, {like} {numel}: pass tensors of one size")
    return codes


def _weighted_sum_check(inputs, weights, out_dtype) -> tuple[list[int], torch.dtype]:
    op = "fastsoup::weighted_sum"
    if len(inputs) == 0:
        raise ValueError(f"{op}: no inputs: pass at least one tensor (the result takes the shape of inputs[0])")
    if len(weights) != len(inputs):
        raise ValueError(f"{op}: got {len(inputs)} inputs and {len(weights)} weights: pass one weight per input")
    codes = _op_operands(op, inputs, "inputs[0]", inputs[0].numel(), inputs[0].device)
    dtype = inputs[0].dtype if out_dtype is None else out_dtype
    if dtype_name(dtype) not in FLOAT_NAMES:
        raise ValueError(f"{op}: out_dtype is {dtype_name(dtype)}, expected float16, bfloat16, float32 or float64")
    return codes, dtype


torch.library.define(
    "fastsoup::weighted_sum", "(Tensor[] inputs, float[] weights, ScalarType? out_dtype=None) -> Tensor")


@torch.library.register_fake("fastsoup::weighted_sum")
def _weighted_sum_fake(inputs, weights, out_dtype=None):
    _, dtype = _weighted_sum_check(inputs, weights, out_dtype)
    return inputs[0].new_empty(inputs[0].shape, dtype=dtype)


@torch.library.register_kernel("fastsoup::weighted_sum", "cpu")
def _weighted_sum_cpu(inputs, weights, out_dtype=None):
    codes, dtype = _weighted_sum_check(inputs, weights, out_dtype)
    out = torch.empty(inputs[0].shape, dtype=dtype)
    _core.weighted_sum([t.data_ptr() for t in inputs], codes, [float(w) for w in weights], out.numel(),
                       out.data_ptr(), info(dtype_name(dtype)).code)
    return out


@torch.library.register_kernel("fastsoup::weighted_sum", "cuda")
def _weighted_sum_cuda(inputs, weights, out_dtype=None):
    codes, dtype = _weighted_sum_check(inputs, weights, out_dtype)
    dev = inputs[0].device
    index = _cuda_index("fastsoup::weighted_sum", dev)
    out = torch.empty(inputs[0].shape, dtype=dtype, device=dev)
    _core.weighted_sum_cuda([t.data_ptr() for t in inputs], codes, [float(w) for w in weights], out.numel(),
                            out.data_ptr(), info(dtype_name(dtype)).code, False, index, cuda_stream(index))
    return out


@torch.library.register_kernel("fastsoup::weighted_sum", None)
def _weighted_sum_other(inputs, weights, out_dtype=None):
    # No tensor to dispatch on (no inputs), or tensors on a device without a kernel of its own.
    _weighted_sum_check(inputs, weights, out_dtype)
    raise ValueError(f"fastsoup::weighted_sum: inputs on {inputs[0].device}: fastsoup's kernels run on the CPU "
                     "and on CUDA devices; move the tensors to one of them")


def _weighted_sum_setup(ctx, inputs, output):
    tensors, weights = inputs[0], inputs[1]
    ctx.weights = [float(w) for w in weights]
    ctx.likes = [(t.dtype, t.shape) for t in tensors]


def _weighted_sum_backward(ctx, grad):
    # d out / d inputs[k] = weights[k]: each gradient is the op itself, one rounding to the input's dtype.
    grad = grad.contiguous()
    grads = [torch.ops.fastsoup.weighted_sum([grad], [w], dtype).reshape(shape)
             for w, (dtype, shape) in zip(ctx.weights, ctx.likes)]
    # One entry per argument the op was given: the dispatcher drops out_dtype where it is None, its
    # default, and needs_input_grad has the length of what remains.
    return (grads, *[None] * (len(ctx.needs_input_grad) - 1))


torch.library.register_autograd("fastsoup::weighted_sum", _weighted_sum_backward, setup_context=_weighted_sum_setup)


def _multi_dot_check(inputs, g) -> tuple[list[int], int]:
    op = "fastsoup::multi_dot"
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: g is a {type(g).__name__}, expected a torch.Tensor")
    g_code = _float_code(op, "g", g, g.device)
    return _op_operands(op, inputs, "g", g.numel(), g.device), g_code


torch.library.define("fastsoup::multi_dot", "(Tensor[] inputs, Tensor g) -> Tensor")


@torch.library.register_fake("fastsoup::multi_dot")
def _multi_dot_fake(inputs, g):
    _multi_dot_check(inputs, g)
    return g.new_empty((len(inputs),), dtype=torch.float64)


@torch.library.register_kernel("fastsoup::multi_dot", "cpu")
def _multi_dot_cpu(inputs, g):
    codes, g_code = _multi_dot_check(inputs, g)
    vals = _core.multi_dot([t.data_ptr() for t in inputs], codes, g.data_ptr(), g_code, g.numel())
    return torch.tensor(vals, dtype=torch.float64)


@torch.library.register_kernel("fastsoup::multi_dot", "cuda")
def _multi_dot_cuda(inputs, g):
    codes, g_code = _multi_dot_check(inputs, g)
    index = _cuda_index("fastsoup::multi_dot", g.device)
    vals = _core.multi_dot_cuda([t.data_ptr() for t in inputs], codes, g.data_ptr(), g_code, g.numel(), index,
                                cuda_stream(index))  # returns once the K values are on the host
    return torch.tensor(vals, dtype=torch.float64, device=g.device)


@torch.library.register_kernel("fastsoup::multi_dot", None)
def _multi_dot_other(inputs, g):
    _multi_dot_check(inputs, g)
    raise ValueError(f"fastsoup::multi_dot: g on {g.device}: fastsoup's kernels run on the CPU and on CUDA devices; "
                     "move the tensors to one of them")


def _multi_dot_setup(ctx, inputs, output):
    tensors, g = inputs
    ctx.save_for_backward(g, *tensors)


def _multi_dot_backward(ctx, grad):
    # out[k] = <inputs[k], g>: d/d inputs[k] = grad[k] * g, d/d g = sum_k grad[k] * inputs[k] (in float64).
    g, *tensors = ctx.saved_tensors
    gd = g.to(torch.float64)
    grads = [(grad[k] * gd).to(t.dtype).reshape(t.shape) for k, t in enumerate(tensors)]
    dg = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
    for k, t in enumerate(tensors):
        dg = dg + grad[k] * t.to(torch.float64).reshape(g.shape)
    return grads, dg.to(g.dtype)


torch.library.register_autograd("fastsoup::multi_dot", _multi_dot_backward, setup_context=_multi_dot_setup)
