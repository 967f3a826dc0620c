"""The driver of a merge: lays the output out (memory, a torch file, or the shards of the writer), turns
every output tensor into segments of the native plan, runs it, and installs the output atomically.

The output goes to an :class:`OutputSink`: the engine's own :class:`~fastsoup.io.writer.AtomicOutput`,
or the one a :class:`Collective` plug-in gives (torch.distributed: :mod:`fastsoup.distributed.output`,
installed by ``fastsoup/__init__.py``); the engine knows nothing of torch.distributed.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .._dtypes import info as dtype_info
from .._errors import ArgumentError, CheckpointError
from ..io import _sidefiles
from ..io._sidefiles import Donor, SoupInfo
from ..io.checkpoint import Checkpoint
from ..io.writer import (
    AtomicOutput,
    TensorSpec,
    TorchOutput,
    is_torch_output,
    plan_output,
)
from .device import CPU, Device
from .plan import Segments, source

AUTO_PROGRESS_BYTES = 256 << 20  # progress=None shows a bar on a terminal from this much input


def _output_dtype(ref, override):
    kind = dtype_info(ref.dtype).kind
    if kind == "float":
        return override or ref.dtype, True
    return ref.dtype, False


class OutputSink(Protocol):
    """Where a merge writes its file output (the engine's default: :class:`~fastsoup.io.writer.AtomicOutput`).

    ``fds[i]``: the open file of the plan's shard i (-1: a shard another writer fills), ``names[i]``
    its path for messages. :meth:`open` creates the files (before any work), :meth:`commit` finishes
    and installs them, :meth:`abort` removes them (on any error)."""

    fds: list[int]
    names: list[str]

    def open(self) -> None: ...

    def commit(self) -> str: ...

    def abort(self) -> None: ...


class Collective(Protocol):
    """A plug-in that makes file merges collective across processes (:mod:`fastsoup.distributed.output`).

    ``job(out, overwrite=, what=)``: a context manager around one merge; ``output(plan, names, dests,
    weights, overwrite=, fsync=, protect=, extras=)``: inside a job, this process's sink and the
    tensors it computes, ``(sink, names, dests)``, or None for the engine's own writer;
    ``rank0(fn)``: ``fn()`` on one process, its result on every one (torch-file outputs)."""

    def job(self, out: Any, *, overwrite: bool, what: str) -> Any: ...

    def output(self, plan: Any, names: list, dests: list, weights: list, *, overwrite: bool, fsync: bool,
               protect: Any = (), extras: Any = None) -> tuple[OutputSink, list, list] | None: ...

    def rank0(self, fn: Any) -> Any: ...


_COLLECTIVE: list = []  # [the Collective plug-in], set by use_collective


def use_collective(plugin: Collective | None) -> None:
    """Installs the plug-in that makes file merges collective (None: every merge is one process's)."""
    _COLLECTIVE[:] = [plugin] if plugin is not None else []


def collective(out: Any, overwrite: bool, what: str, merge):
    """``merge()`` as one collective merge when a :class:`Collective` plug-in is installed (under
    torch.distributed); a torch-file output is computed and written by one process alone (the others
    wait), as ``torch.save`` is. Without a plug-in: ``merge()``."""
    if not _COLLECTIVE:
        return merge()
    plugin = _COLLECTIVE[0]
    if out is not None and is_torch_output(out):
        return plugin.rank0(merge)
    with plugin.job(out, overwrite=overwrite, what=what):
        return merge()


@dataclass
class MergeSpec:
    """One merge for :func:`run`: float tensors ``round(sum_k weights[k] * inputs[k] / divisor)``.

    ``weights``: K numbers, or a dict tensor name -> K numbers for every float tensor (layer-wise).

    ``layout`` (default: the first input) gives the tensor order, default dtypes, shards and
    metadata; ``dtype`` overrides the float dtype; ``divisor`` is ``(high part, low part)``;
    ``extras`` are files written into a folder output with it (name -> bytes: a sidecar); ``aliases``
    tied names of an in-memory result (alias -> name); ``info`` what the soup is made of (metadata,
    model card); ``donor`` the side files of a folder output (read by the caller before any work).

    ``kernel``: instead of the weighted sum, ``kernel(name, address)`` computes each float tensor
    into host memory at ``address`` (its output dtype, contiguous: the sparse methods' native
    ``sparse_merge``); the other tensors are copied from the first input. ``weights`` is then only
    what the ranks of a collective merge compare (a dict name -> numbers)."""

    inputs: list
    weights: list
    out: Any = None
    dtype: str | None = None
    divisor: tuple = (1.0, 0.0)
    layout: Checkpoint | None = None
    device: Device = CPU
    threads: int = 0
    shard_size: Any = None
    progress: bool | None = None
    overwrite: bool = False
    fsync: bool = False
    desc: str = "merge"
    extras: dict | None = None
    aliases: dict | None = None
    info: SoupInfo | None = None
    donor: Donor | None = None
    kernel: Any = None


def _write_all(fd: int, view: memoryview, offset: int, name: str) -> None:
    """``view`` into ``fd`` at ``offset`` (``os.pwrite`` until all is written)."""
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover -- pwrite raises on errors
            raise OSError(f"{name}: short write")
        view, offset = view[n:], offset + n


def _run_kernel(spec: MergeSpec, first: Checkpoint, names: list, dests: list, out_dtypes: dict, fds: list,
                fd_names: list, callback, result: dict | None = None) -> None:
    """The per-tensor execution of ``spec.kernel`` (see :class:`MergeSpec`): each float tensor computed
    by ``kernel(name, address)`` straight into an in-memory output, or into one reused host scratch of
    the largest output tensor's bytes and then ``os.pwrite`` into its shard at its offset; every other
    tensor copied from the first input (the base), into ``result``'s tensor when that is on a GPU.
    Memory: one output tensor's bytes (file outputs) plus the kernel's own; never K tensors (each
    tensor's mapped input pages are released after its kernel: :meth:`Checkpoint.release`)."""
    import ctypes

    ckpts = spec.inputs
    sizes = [first[n].numel * dtype_info(out_dtypes[n][0]).itemsize for n, (f, _) in zip(names, dests)
             if f >= 0 and out_dtypes[n][1]]
    scratch = bytearray(max(sizes, default=0))
    scratch_addr = ctypes.addressof((ctypes.c_char * len(scratch)).from_buffer(scratch)) if scratch else 0
    view = memoryview(scratch)
    done = 0
    try:
        for name, (dfile, doff) in zip(names, dests):
            ref0 = first[name]
            od, is_float = out_dtypes[name]
            if ref0.nbytes == 0:
                continue
            if is_float:
                nbytes = ref0.numel * dtype_info(od).itemsize
                spec.kernel(name, scratch_addr if dfile >= 0 else doff)
                for ck in ckpts:  # the inputs' pages of this tensor out of resident memory
                    ck.release(name)
                if dfile >= 0:
                    _write_all(fds[dfile], view[:nbytes], doff, fd_names[dfile])
                done += sum(ck[name].nbytes for ck in ckpts)
            else:
                addr, _loc, obj = ckpts[0].buffer(ckpts[0][name])
                if dfile >= 0:
                    _write_all(fds[dfile], memoryview((ctypes.c_char * ref0.nbytes).from_address(addr)).cast("B"),
                               doff, fd_names[dfile])
                elif result is not None and spec.device.is_cuda:  # an in-memory result on the GPU
                    from .. import _torch

                    _torch.copy_bytes_into(result[name], addr, ref0.nbytes)
                else:
                    ctypes.memmove(doff, addr, ref0.nbytes)
                del obj
                done += ref0.nbytes
            if callback is not None:
                callback(done, done)
    finally:
        view.release()


def run(spec: MergeSpec):
    """Runs one merge (see :class:`MergeSpec`); returns the state dict (``out=None``) or the path."""
    ckpts, weights, out, override, layout = spec.inputs, spec.weights, spec.out, spec.dtype, spec.layout
    threads, device, donor, info, extras, divisor = spec.threads, spec.device, spec.donor, spec.info, spec.extras, spec.divisor
    overwrite, fsync, desc = spec.overwrite, spec.fsync, spec.desc
    first = layout if layout is not None else ckpts[0]
    K = len(ckpts)
    names = list(first)
    out_dtypes = {name: _output_dtype(first[name], override) for name in names}  # name -> (dtype, averaged?)
    keep: list[Any] = []  # objects whose memory the native plan points into
    if (donor is not None and donor.adapter) or _sidefiles.has_lora_keys(names):
        _sidefiles.note(_sidefiles.ADAPTER_NOTE)
    torch_out = out is not None and is_torch_output(out)
    protect = [f for ck in [*ckpts, first] for f in ck.files]  # an overwrite never removes an input

    # Destinations.
    result = None
    writer = None
    if out is None or torch_out:
        from .. import _torch

        result = {}
        dests = []
        for name in names:
            try:
                t = _torch.empty(first[name].shape, out_dtypes[name][0], device=str(device))
            except ValueError as e:
                raise CheckpointError(f"{first.where(name)}: {e}; write the result to a file instead (out=PATH)") from None
            result[name] = t
            dests.append((-1, t.data_ptr()))
        if torch_out:  # the state dict, then torch.save into a temporary file installed as a file output is
            writer = TorchOutput(out, overwrite=overwrite, fsync=fsync, protect=protect)
    else:
        specs = []
        for name in names:
            ref = first[name]
            od = out_dtypes[name][0]
            specs.append(TensorSpec(name, od, ref.shape, ref.numel * dtype_info(od).itemsize))
        metadata = _sidefiles.soup_metadata(first.metadata, info)
        plan = plan_output(specs, out, shard_size=spec.shard_size, groups=_sidefiles.shard_groups(first, names),
                           metadata=metadata, weights_name=donor.weights_name if donor is not None else None)
        if donor is not None and donor.adapter and len(plan.shards) > 1:
            raise ArgumentError(f"{out}: a soup of peft adapters is one {donor.weights_name} (peft reads no shards); "
                             f"shard_size={spec.shard_size!r} would cut it into {len(plan.shards)}")
        if donor is not None and not plan.single:
            extras = {**donor.render(dtype=_soup_dtype(first, out_dtypes), info=info), **(extras or {})}
        locations = plan.locations()
        dests = [locations[name] for name in names]
        # One process: AtomicOutput and every tensor; in a collective merge (torch.distributed) this
        # rank's writer and the tensors of its shards only.
        # (The ranks compare the effective weights, weights / divisor.)
        made = None
        if _COLLECTIVE:
            made = _COLLECTIVE[0].output(plan, names, dests, _effective(weights, names, divisor[0]),
                                         overwrite=overwrite, fsync=fsync, protect=protect, extras=extras)
        if made is None:
            made = AtomicOutput(plan, overwrite=overwrite, fsync=fsync, protect=protect, extras=extras), names, dests
        writer, names, dests = made

    # Segments, fused where contiguous in every input and in the output.
    per_tensor = isinstance(weights, dict)
    segs = Segments(K, per_segment=per_tensor)
    for name, (dfile, doff) in zip(names, dests if spec.kernel is None else []):
        ref0 = first[name]
        od, is_float = out_dtypes[name]
        if ref0.nbytes == 0:
            continue
        if is_float:
            segs.weighted(ref0.numel, dfile, doff, dtype_info(od).code, [source(ck, name, device, keep) for ck in ckpts],
                          weights[name] if per_tensor else None)
        else:
            addr, loc, obj = ckpts[0].buffer(ckpts[0][name], device)
            if loc != 1:
                keep.append(obj)
            segs.copy(ref0.nbytes, dfile, doff, addr, loc)
    total_in = segs.total_in
    if spec.kernel is not None:  # per tensor (the sparse methods): inputs of the float tensors, copies
        total_in = sum(sum(ck[n].nbytes for ck in ckpts) if out_dtypes[n][1] else first[n].nbytes for n in names)

    bar = _progress_bar(spec.progress, total_in, desc)
    callback = None
    if bar is not None:
        def callback(done_in, _done_out):
            bar.update(done_in - bar.n)

    started = time.perf_counter()
    done = False
    try:
        if writer is not None:
            writer.open()
        try:
            files = writer is not None and not torch_out
            if spec.kernel is not None:
                _run_kernel(spec, first, names, dests, out_dtypes, writer.fds if files else [],
                            writer.names if files else [], callback, result)
            else:
                segs.run(None if per_tensor else weights, fds=writer.fds if files else [], threads=threads,
                         progress=callback, device=device, fd_names=writer.names if files else (), divisor=divisor)
            verify_inputs(ckpts)  # truncated or rewritten meanwhile: nothing is installed or returned
            if result is not None:
                for alias, canon in (spec.aliases or {}).items():  # tied weights: both names, one tensor
                    if canon in result and alias not in result:
                        result[alias] = result[canon]
            if torch_out:
                writer.write(result)  # torch.save keeps the two names on one storage, as state_dict() does
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.commit()
        done = True
    finally:
        if bar is not None:
            bar.close()  # the bar is erased (leave=False) ...
            if done:  # ... and a finished one leaves its summary
                print(progress_summary(desc, total_in, time.perf_counter() - started), file=sys.stderr)
        del keep
    if out is None:
        return result
    return os.fspath(out)


def _effective(weights, names: list, divisor: float) -> list:
    """The weights the ranks of a collective merge compare: weights / divisor (per tensor: every
    tensor's, in order)."""
    if isinstance(weights, dict):
        return [w / divisor for name in names if name in weights for w in weights[name]]
    return [w / divisor for w in weights]


def progress_summary(desc: str, nbytes: int, seconds: float) -> str:
    """The line a finished progress bar leaves: ``average: 4.87 GB in 0.61 s (8.0 GB/s)`` (input bytes)."""
    rate = f"{nbytes / seconds / 1e9:.1f} GB/s" if seconds > 0 else "- GB/s"
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"
    return f"{desc}: {size} in {seconds:.2f} s ({rate})"


def _soup_dtype(first: Checkpoint, out_dtypes: dict) -> str | None:
    """The soup's dtype as a config names it: the float dtype of most of the averaged elements."""
    count: dict[str, int] = {}
    for name, (od, is_float) in out_dtypes.items():
        if is_float:
            count[od] = count.get(od, 0) + first[name].numel
    return max(count, key=lambda d: (count[d], d)) if count else None


def verify_inputs(ckpts, during: str = "the merge") -> None:
    """Raises :class:`~fastsoup.InputChangedError` when a file of one of the checkpoints changed
    since it was opened or a read of it faulted (see ``Checkpoint.verify``)."""
    for ck in ckpts:
        ck.verify(during)



def _progress_bar(progress: bool | None, total: int, desc: str):
    if progress is None:
        progress = total >= AUTO_PROGRESS_BYTES and sys.stderr is not None and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True, leave=False)



__all__ = ["AUTO_PROGRESS_BYTES", "Collective", "MergeSpec", "OutputSink", "collective", "progress_summary", "run",
           "use_collective", "verify_inputs"]
