"""The merge engine: plans a weighted combination of K checkpoints and drives the native executor.

Plan: validate the ingredients (:func:`~fastsoup.check_compatible`), lay the output out (memory, or
the shards of the writer), and turn every output tensor into a *segment*: its destination and the
K input addresses (file mappings or in-memory tensors). Consecutive tensors that sit back to back
in every input and in the output are fused into one segment, so checkpoints written alike (as
safetensors writes them) need one kernel stream per shard, not one per tensor. The native executor
then streams the segments in steps of bounded size: prefetch ahead, fused one-pass kernel, release
what was read, and a writer thread for file output.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._dtypes import BY_CODE
from ._dtypes import info as dtype_info
from ._dtypes import parse_float_dtype
from . import distributed as _distributed
from ._native import _core
from .io.checkpoint import Checkpoint, check_compatible, open_checkpoint
from .io.writer import TensorSpec, plan_output

SLOT_BYTES = 32 << 20  # CUDA pipeline: host input bytes per pinned slot (all inputs together)
NSLOTS = 3  # pinned slots in the ring: fill j+1 while j is copied and j-1 is summed
WINDOW_BYTES = 64 << 20  # input bytes per step, all K inputs together: bounds resident memory
BUFFER_BYTES = 2 << 20  # one staging buffer of file output: small enough to stay in L3 (measured: 2 MiB best)
NBUFFERS = 4
AUTO_PROGRESS_BYTES = 256 << 20  # progress=None shows a bar on a terminal from this much input


@dataclass(frozen=True)
class Device:
    """Where the engine computes: ``Device("cpu")`` or ``Device("cuda", index)``."""

    type: str = "cpu"
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


CPU = Device()


def resolve_device(device: Any) -> Device:
    """"cpu", "cuda", "cuda:N" or a torch.device -> :class:`Device`, checking that CUDA is usable."""
    if device is None or isinstance(device, Device):
        return device or CPU
    text = str(device)
    if text == "cpu":
        return CPU
    if text == "cuda" or text.startswith("cuda:"):
        if not _core.cuda_compiled:
            raise ValueError(f"device={device!r}: this build of fastsoup has no CUDA (reinstall where nvcc is found)")
        count = _core.cuda_device_count()
        if count == 0:
            raise ValueError(f"device={device!r}: no CUDA device is visible to this process")
        if text == "cuda":
            from . import _torch

            index = _torch.current_cuda_index()
        else:
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"device={device!r}: expected 'cuda' or 'cuda:N'") from None
        if not 0 <= index < count:
            raise ValueError(f"device={device!r}: {count} CUDA device(s) visible")
        return Device("cuda", index)
    raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def average(
    ingredients: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    out: str | os.PathLike | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    threads: int | None = None,
    shard_size: int | str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    fsync: bool = False,
):
    """Averages checkpoints: ``sum_k w_k * theta_k / sum_k w_k`` for every float tensor.

    A drop-in for the hand-written averaging loop, streaming from memory-mapped files with one
    fused pass over the inputs and memory that does not grow with K. The sum is accumulated in
    float64 with the weights as given, then divided once by their total and rounded once to the
    output dtype (a uniform soup: the plain sum divided by K), so results are within one unit in
    the last place of the exact mean (README, "Numerics").

    Args:
        ingredients: what :func:`~fastsoup.open_checkpoint` takes (paths of files, folders or index
            files, state dicts, modules), mixed freely.
        weights: one number per ingredient, like ``numpy.average``; None for the uniform soup.
            Negative weights are allowed; their sum must not be zero.
        out: None to return ``dict[str, torch.Tensor]``; a path to write safetensors there (one file
            if it ends in ``.safetensors``, else a sharded folder) and return the path.
        dtype: output dtype ("fp16", "bf16", "fp32", or a torch dtype); default: each tensor's dtype
            in the first ingredient. Integer and bool tensors are copied from the first ingredient.
        device: "cpu", or "cuda"/"cuda:N": file inputs stream through pinned memory to the GPU, the
            fused kernel sums there; ``out=None`` then returns CUDA tensors (inputs already on that
            GPU are read in place), a path is written back through pinned memory.
        threads: CPU threads (default: every core this process may use; on CUDA, the threads that
            fill the pinned buffers).
        shard_size: largest output shard (bytes or e.g. "5GB"); default: shard like the first
            ingredient.
        progress: show a progress bar (default: on a terminal, for merges of 256 MB or more).
        overwrite: replace an existing ``out`` (only once the new soup is complete).
        fsync: flush the output to disk before it is renamed into place.

    Returns:
        The state dict (``out=None``) or ``out``.

    Raises:
        CheckpointError: an ingredient is unreadable or does not match the others.
        ValueError: bad weights or options.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> fastsoup.average(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
        >>> soup = fastsoup.average([model_a.state_dict(), model_b.state_dict()])  # doctest: +SKIP
    """
    ingredients = list(ingredients)
    ws, divisor = _normalization(weights, len(ingredients))
    with _distributed.merge_job(out, overwrite=overwrite, what="fastsoup.average"):  # collective under torch.distributed
        return _merge(ingredients, ws, out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size,
                      progress=progress, overwrite=overwrite, fsync=fsync, desc="average", divisor=divisor)


def _normalization(weights: Sequence[float] | None, k: int) -> tuple[list[float], tuple[float, float]]:
    """The kernel weights and divisor of an average: the sum is divided once by the weight total.

    Uniform: weights 1 and divisor K (the plain sum, exact in float64 for float16 inputs, divided
    once). Otherwise the weights as given and their total as ``(hi, lo)``: ``math.fsum`` (the
    correctly rounded total) and the rest, which the float64 kernels divide by too. All scaled by
    one power of two so the largest weight lies in [1, 2): exact, the same quotient and rounding,
    and no overflow or underflow from extreme weights.
    """
    if weights is None:
        return [1.0] * k, (float(max(k, 1)), 0.0)
    ws = _check_weights(weights, k)
    total = math.fsum(ws)
    if total == 0.0:
        raise ValueError(f"weights sum to zero ({list(weights)}): cannot normalize; use fastsoup.weighted_sum")
    rest = math.fsum([*ws, -total])
    shift = math.frexp(max(abs(w) for w in ws))[1] - 1
    return [math.ldexp(w, -shift) for w in ws], (math.ldexp(total, -shift), math.ldexp(rest, -shift))


def weighted_sum(
    ingredients: Sequence[Any],
    weights: Sequence[float],
    *,
    out: str | os.PathLike | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    threads: int | None = None,
    shard_size: int | str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    fsync: bool = False,
):
    """The raw linear combination ``sum_k w_k * theta_k`` (no normalization), e.g. for task
    arithmetic (``theta_0 + lambda * (theta_1 - theta_0)`` is ``weights=[1 - lambda, lambda]``).

    Arguments, returns and errors as :func:`average`, with ``weights`` required.
    """
    ingredients = list(ingredients)
    ws = _check_weights(weights, len(ingredients))
    with _distributed.merge_job(out, overwrite=overwrite, what="fastsoup.weighted_sum"):  # collective under torch.distributed
        return _merge(ingredients, ws, out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size,
                      progress=progress, overwrite=overwrite, fsync=fsync, desc="weighted_sum")


def _check_weights(weights: Sequence[float], k: int) -> list[float]:
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be numbers, got {weights!r}") from None
    if len(ws) != k:
        raise ValueError(f"got {len(ws)} weights for {k} ingredients")
    if not all(math.isfinite(w) for w in ws):
        raise ValueError(f"weights must be finite, got {ws}")
    return ws


def _merge(ingredients, weights, *, out, dtype, device, threads, shard_size, progress, overwrite, fsync, desc,
           divisor=(1.0, 0.0)):
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    out_override = parse_float_dtype(dtype) if dtype is not None else None
    opened = [open_checkpoint(src) for src in ingredients]
    try:
        check_compatible(opened)
        return _run(opened, weights, out, out_override, threads or 0, shard_size, progress, overwrite, fsync, desc,
                    device=dev, divisor=divisor)
    finally:
        for src, ck in zip(ingredients, opened):
            if ck is not src:
                ck.close()


def _output_dtype(ref, override):
    kind = dtype_info(ref.dtype).kind
    if kind == "float":
        return override or ref.dtype, True
    return ref.dtype, False


def _run(ckpts: list[Checkpoint], weights, out, override, threads, shard_size, progress, overwrite, fsync, desc,
         layout: Checkpoint | None = None, device: Device = CPU, divisor: tuple[float, float] = (1.0, 0.0)):
    # `layout` (default: the first input) gives the tensor order, default dtypes, shards and metadata.
    # Float tensors: round(sum_k weights[k] * theta_k / divisor), divisor = (high part, low part).
    first = layout if layout is not None else ckpts[0]
    K = len(ckpts)
    names = list(first)
    out_dtypes = {name: _output_dtype(first[name], override) for name in names}  # name -> (dtype, averaged?)
    keep: list[Any] = []  # objects whose memory the native plan points into

    # Destinations.
    result = None
    writer = None
    if out is None:
        from . import _torch

        result = {}
        dests = []
        for name in names:
            t = _torch.empty(first[name].shape, out_dtypes[name][0], device=str(device))
            result[name] = t
            dests.append((-1, t.data_ptr()))
    else:
        specs, groups = [], []
        shard_index = {f: i for i, f in enumerate(first.files)}
        for name in names:
            ref = first[name]
            od = out_dtypes[name][0]
            specs.append(TensorSpec(name, od, ref.shape, ref.numel * dtype_info(od).itemsize))
            groups.append(shard_index.get(ref.file, 0))
        metadata = first.metadata if first.metadata is not None else {"format": "pt"}
        plan = plan_output(specs, out, shard_size=shard_size, groups=groups if len(first.files) > 1 else None,
                           metadata=metadata)
        locations = plan.locations()
        dests = [locations[name] for name in names]
        # One process: AtomicOutput and every tensor; in a collective merge (torch.distributed) this
        # rank's writer and the tensors of its shards only.
        # (The ranks compare the effective weights, weights / divisor.)
        writer, names, dests = _distributed.output(plan, names, dests, [w / divisor[0] for w in weights],
                                                   overwrite=overwrite, fsync=fsync)

    # Segments, fused where contiguous in every input and in the output.
    segs = _Segments(K)
    for name, (dfile, doff) in zip(names, dests):
        ref0 = first[name]
        od, is_float = out_dtypes[name]
        if ref0.nbytes == 0:
            continue
        if is_float:
            segs.weighted(ref0.numel, dfile, doff, dtype_info(od).code, [_source(ck, name, device, keep) for ck in ckpts])
        else:
            addr, loc, obj = ckpts[0].buffer(ckpts[0][name], device)
            if loc != 1:
                keep.append(obj)
            segs.copy(ref0.nbytes, dfile, doff, addr, loc)
    total_in = segs.total_in

    bar = _progress_bar(progress, total_in, desc)
    callback = None
    if bar is not None:
        def callback(done_in, _done_out):
            bar.update(done_in - bar.n)

    try:
        if writer is not None:
            writer.open()
        try:
            segs.run(weights, fds=writer.fds if writer is not None else [], threads=threads, progress=callback,
                     device=device, divisor=divisor)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.commit()
    finally:
        if bar is not None:
            bar.close()
        del keep
    return result if out is None else os.fspath(out)


def _source(ck: Checkpoint, name: str, device: Device, keep: list) -> tuple[int, int, int]:
    """One input of a segment: ``(address, dtype code, location)`` of tensor ``name`` of ``ck`` (see
    ``Checkpoint.buffer``); anything that must stay alive while the address is used goes to ``keep``."""
    ref = ck[name]
    addr, loc, obj = ck.buffer(ref, device)
    if loc != 1:
        keep.append(obj)
    return addr, dtype_info(ref.dtype).code, loc


class _Segments:
    """The segment lists of one native merge plan, built tensor by tensor.

    A tensor that continues the previous one in every input and in the output (same kinds and
    dtypes, back to back) extends its segment instead of opening a new one, so files written alike
    stream as one flat range per shard.
    """

    def __init__(self, num_inputs: int):
        self.K = num_inputs
        self.n: list[int] = []
        self.kind: list[int] = []
        self.out_file: list[int] = []
        self.out_offset: list[int] = []
        self.out_dtype: list[int] = []
        self.in_addr: list[int] = []
        self.in_dtype: list[int] = []
        self.in_mapped: list[int] = []
        self.weights: list[float] = []  # per-segment weights (segment-major), when any segment has its own
        self.total_in = 0  # input bytes
        self._last = None  # (kind, out_file, out_end, out_code, input ends, input codes, mapped)

    def weighted(self, n: int, out_file: int, out_offset: int, out_code: int, inputs, weights=None) -> None:
        """out[:n] = round(sum_k w_k * in_k[:n] / divisor); inputs: K ``(address, dtype code, location)`` with
        location 0 host memory, 1 a file mapping (True/False work), 2 device memory.

        ``weights``: this segment's own K weights (then every segment of the plan must have them);
        None: the weights given to :meth:`run`.
        """
        if len(inputs) != self.K:
            raise ValueError(f"expected {self.K} inputs, got {len(inputs)}")
        addrs = [a for a, _, _ in inputs]
        codes = [c for _, c, _ in inputs]
        mapped = [int(m) for _, _, m in inputs]
        units = [BY_CODE[c].itemsize for c in codes]
        ends = [a + n * u for a, u in zip(addrs, units)]
        self.total_in += n * sum(units)
        ws = None if weights is None else [float(w) for w in weights]
        if ws is not None and len(ws) != self.K:
            raise ValueError(f"expected {self.K} weights, got {len(ws)}")
        self._add(0, n, out_file, out_offset, out_code, n * BY_CODE[out_code].itemsize, addrs, codes, mapped, ends, ws)

    def copy(self, nbytes: int, out_file: int, out_offset: int, addr: int, loc: int) -> None:
        """out[:nbytes] = the bytes at addr (tensors that are not averaged); loc as in :meth:`weighted`."""
        pad = [0] * (self.K - 1)
        self.total_in += nbytes
        self._add(1, nbytes, out_file, out_offset, 0, nbytes, [addr] + pad, [0] * self.K,
                  [int(loc)] + pad, [addr + nbytes] + pad, None)

    def _add(self, kind, n, dfile, doff, out_code, out_len, addrs, codes, mapped, ends, ws):
        last = self._last
        if (last is not None and last[0] == kind and last[1] == dfile and last[2] == doff and last[3] == out_code
                and last[4] == addrs and last[5] == codes and last[6] == mapped and last[7] == ws):
            self.n[-1] += n
        else:
            if (ws is None) != (not self.weights) and self.n:
                raise ValueError("either every segment has its own weights or none has")
            if ws is not None:
                self.weights.extend(ws)
            self.n.append(n)
            self.kind.append(kind)
            self.out_file.append(dfile)
            self.out_offset.append(doff)
            self.out_dtype.append(out_code)
            self.in_addr.extend(addrs)
            self.in_dtype.extend(codes)
            self.in_mapped.extend(mapped)
        self._last = (kind, dfile, doff + out_len, out_code, ends, codes, mapped, ws)

    def run(self, weights=None, *, fds=(), threads: int = 0, progress=None, accumulate: bool = False,
            device: Device = CPU, divisor: float | tuple[float, float] = 1.0) -> None:
        """Runs the plan in the native executor (GIL released; Ctrl-C is seen between steps).
        ``weights``: K weights for every segment; None when the segments carry their own.
        ``divisor``: every weighted sum is divided by it once, before its rounding (a number, or
        ``(high, low)`` parts: see kernels.h, ``divisor_lo``).
        ``device``: CUDA runs the pipeline of pinned slots and the fused kernel on torch's current
        stream of that device (outputs with out_file -1 are then device addresses)."""
        if (weights is None) != bool(self.weights) and self.n:
            raise ValueError("pass weights to run() exactly when the segments have none of their own")
        ws = [float(w) for w in weights] if weights is not None else self.weights
        hi, lo = (float(divisor), 0.0) if not isinstance(divisor, tuple) else (float(divisor[0]), float(divisor[1]))
        if device.is_cuda:
            from . import _torch

            _core.merge_cuda(
                ws, self.n, self.kind, self.out_file, self.out_offset, self.out_dtype, self.in_addr, self.in_dtype,
                self.in_mapped, list(fds), device.index, _torch.cuda_stream(device.index), SLOT_BYTES, NSLOTS,
                threads, progress, accumulate, hi, lo,
            )
            return
        if 2 in self.in_mapped:
            raise ValueError("a device (CUDA) input in a CPU merge: run on that device")
        _core.merge(
            ws, self.n, self.kind, self.out_file, self.out_offset, self.out_dtype,
            self.in_addr, self.in_dtype, self.in_mapped, list(fds), threads, WINDOW_BYTES, BUFFER_BYTES, NBUFFERS,
            progress, accumulate=accumulate, divisor=hi, divisor_lo=lo,
        )


def _progress_bar(progress: bool | None, total: int, desc: str):
    if progress is None:
        progress = total >= AUTO_PROGRESS_BYTES and sys.stderr is not None and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True, leave=False)


__all__ = ["CPU", "Device", "average", "resolve_device", "weighted_sum"]
