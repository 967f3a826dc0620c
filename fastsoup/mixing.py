"""Checkpoints into a model's parameters, and the gradient pass over checkpoints: the model-side
operations of the soups (a :class:`~fastsoup.Soup`'s value, a greedy search's individual models, a
learned soup's mix and its dL/dalpha), each one call of the engine's executor."""

from __future__ import annotations

from typing import Any

from ._dtypes import info as dtype_info
from ._errors import FastsoupError
from ._native import _core
from .engine import CPU, Device, Segments, source
from .io.checkpoint import Checkpoint
from .io.names import prefix_hint


def write_model(model: Any, layout: Checkpoint, sources: dict, weights, staging: dict, extras: dict | None,
                 threads: int, device: Device = CPU, divisor: float = 1.0) -> None:
    """model's float tensors ``name`` = round(sum_k w_k * sources[name][k] / divisor), one executor call.

    ``sources``: name -> K ``(address, dtype code, location)``; ``weights``: K numbers for every
    tensor, or a dict name -> K numbers. On ``device`` "cpu", tensors on a GPU or not contiguous go
    through pinned host buffers kept in ``staging``; on a CUDA device, tensors on it are written in
    place and others through buffers on it. Non-float tensors are copied from ``extras`` (when given).
    """
    from . import _torch

    state = model.state_dict(keep_vars=False)
    missing = [n for n in layout if n not in state]
    extra = [n for n in state if n not in layout and n not in layout.aliases]
    what = type(model).__name__
    if missing or extra:
        hint = prefix_hint(missing, extra) or ("pass key_map= if the soup's names are the module's under other "
                                               "names" if missing and extra else None)
        raise FastsoupError(f"{what}'s state dict does not match the soup: missing {missing[:10]}, extra {extra[:10]}"
                            + (f" ({hint})" if hint else ""))
    per_tensor = isinstance(weights, dict)
    K = len(next(iter(sources.values()))) if sources else 1
    segs, staged = Segments(K), []
    for name, src in sources.items():
        t = state[name]
        shape = tuple(layout[name].shape)
        if tuple(t.shape) != shape:
            raise FastsoupError(f"{what}: tensor {name!r} has shape {list(t.shape)}, the soup {list(shape)}")
        dt = _torch.dtype_name(t.dtype)
        if dtype_info(dt).kind != "float":
            raise FastsoupError(f"{what}: tensor {name!r} is {dt}, the soup's is a float")
        dst = t
        direct = _torch.on_device(t, device) if device.is_cuda else (t.device.type == "cpu" and t.is_contiguous())
        if not direct:
            dst = staging.get(name)
            if dst is None or dst.dtype != t.dtype or str(dst.device) != (str(device) if device.is_cuda else "cpu"):
                dst = staging[name] = _torch.staging_like(t, str(device) if device.is_cuda else "cpu")
            staged.append((t, dst))
        if t.numel():
            segs.weighted(t.numel(), -1, dst.data_ptr(), dtype_info(dt).code, src,
                          weights[name] if per_tensor else None)
    if segs.n:
        segs.run(None if per_tensor else weights, threads=threads, device=device, divisor=divisor)
    for t, dst in staged:
        t.copy_(dst, non_blocking=True)
    if extras is not None:
        for name, value in extras.items():
            state[name].copy_(value)
    for alias, canon in layout.aliases.items():  # tied weights: one tensor, unless this model unties them
        if alias in state and canon in state and state[alias].data_ptr() != state[canon].data_ptr():
            state[alias].copy_(state[canon], non_blocking=True)
    if staged:
        _torch.synchronize(staged[0][0].device)


def load_checkpoint(ck: Checkpoint, model: Any, threads: int = 0, staging: dict | None = None,
                     device: Device = CPU) -> None:
    """Loads one checkpoint into ``model`` in place (cast to the model's dtypes): one read of it.
    ``staging`` keeps host buffers between calls for models on a GPU."""
    sources, extras, keep = {}, {}, []
    for name, ref in ck.items():
        if dtype_info(ref.dtype).kind == "float":
            sources[name] = [source(ck, name, device, keep)]
        else:
            extras[name] = ck.tensor(name)
    write_model(model, ck, sources, [1.0], staging if staging is not None else {}, extras, threads, device)
    ck.verify("its load into the model")  # a changed file is never evaluated as if it were the checkpoint


def mix_into_model(ckpts: list[Checkpoint], model: Any, weights, staging: dict, threads: int = 0,
                    device: Device = CPU) -> None:
    """model's float tensors = cast(sum_k w_k theta_k), reading the K checkpoints once (one executor
    call). ``weights``: K numbers, or a dict tensor name -> K numbers (layer-wise)."""
    first = ckpts[0]
    sources, keep = {}, []
    for name, ref in first.items():
        if dtype_info(ref.dtype).kind == "float":
            sources[name] = [source(ck, name, device, keep) for ck in ckpts]
    write_model(model, first, sources, weights, staging, None, threads, device)
    for ck in ckpts:
        ck.verify("the mix into the model")


def dots(ckpts: list[Checkpoint], grads: dict, threads: int = 0, device: Device = CPU) -> dict:
    """name -> [<grads[name], theta_k[name]> for k]: one fused multi_dot pass over the K checkpoints
    per tensor (float64 results). The pages of the files read are released after each tensor (as the
    merge executor does), so resident memory does not grow with K.

    ``device`` "cpu": ``grads`` are contiguous float CPU tensors, the CPU kernel. A CUDA device:
    ``grads`` are contiguous float tensors on it, and one native call (``_core.dots_cuda``) runs
    every tensor's K dot products there, the checkpoints' host data streamed through the CUDA merge
    ring's pinned slots (their tensors already on the device read in place): GPU memory is the
    ring's, whatever K (see csrc/include/fastsoup/cuda.h, ``run_dots``)."""
    from . import _torch

    if device.is_cuda:
        return _dots_cuda(ckpts, grads, threads, device)
    out = {}
    for name, g in grads.items():
        addrs, codes, keep = [], [], []
        for ck in ckpts:
            r = ck[name]
            addr, _mapped, obj = ck.buffer(r)
            keep.append(obj)
            addrs.append(addr)
            codes.append(dtype_info(r.dtype).code)
        g_code = dtype_info(_torch.dtype_name(g.dtype)).code
        out[name] = _core.multi_dot(addrs, codes, g.data_ptr(), g_code, g.numel(), threads)
        for ck in ckpts:
            ck.release(name)
    for ck in ckpts:
        ck.verify("the gradient pass")
    return out


def _dots_cuda(ckpts: list[Checkpoint], grads: dict, threads: int, device: Device) -> dict:
    from . import _torch
    from .engine.plan import NSLOTS, SLOT_BYTES

    names, inputs, codes, locs, gs, g_codes, ns, keep = [], [], [], [], [], [], [], []
    for name, g in grads.items():
        if not _torch.on_device(g, device):
            raise FastsoupError(f"the gradient pass on {device}: the gradient of {name!r} is on {g.device}"
                                + ("" if g.is_contiguous() else " and not contiguous"))
        srcs = [source(ck, name, device, keep) for ck in ckpts]
        names.append(name)
        inputs.append([a for a, _, _ in srcs])
        codes.append([c for _, c, _ in srcs])
        locs.append([int(loc) for _, _, loc in srcs])
        gs.append(g.data_ptr())
        g_codes.append(dtype_info(_torch.dtype_name(g.dtype)).code)
        ns.append(g.numel())
    for name, n in zip(names, ns):
        if ckpts and ckpts[0][name].numel != n:
            raise FastsoupError(f"the gradient pass: {name!r} has {n} elements in the model, "
                                f"{ckpts[0][name].numel} in the checkpoints")
    vals = _core.dots_cuda(inputs, codes, locs, gs, g_codes, ns, device=device.index,
                           stream=_torch.cuda_stream(device.index), slot_bytes=SLOT_BYTES, nslots=NSLOTS,
                           fill_threads=threads)
    del keep
    for ck in ckpts:
        ck.verify("the gradient pass")
    return dict(zip(names, vals))


__all__ = ["dots", "load_checkpoint", "mix_into_model", "write_model"]
