"""The native merge plan: segments (a destination and K inputs each), built tensor by tensor, fused
where contiguous, and run by the native executor in steps of bounded size (see ``csrc/cpu/merge.cpp``)."""

from __future__ import annotations

from .._dtypes import BY_CODE
from .._dtypes import info as dtype_info
from .._errors import InputChangedError
from .._native import _core
from ..io.checkpoint import Checkpoint
from .device import CPU, Device

SLOT_BYTES = 32 << 20  # CUDA pipeline: host input bytes per pinned slot (all inputs together)
NSLOTS = 3  # pinned slots in the ring: fill j+1 while j is copied and j-1 is summed
WINDOW_BYTES = 64 << 20  # input bytes per step, all K inputs together: bounds resident memory
BUFFER_BYTES = 2 << 20  # one staging buffer of file output: small enough to stay in L3 (measured: 2 MiB best)
NBUFFERS = 4


def source(ck: Checkpoint, name: str, device: Device, keep: list) -> tuple[int, int, int]:
    """One input of a segment: ``(address, dtype code, location)`` of tensor ``name`` of ``ck`` (see
    ``Checkpoint.buffer``); anything that must stay alive while the address is used goes to ``keep``."""
    ref = ck[name]
    addr, loc, obj = ck.buffer(ref, device)
    if loc != 1:
        keep.append(obj)
    return addr, dtype_info(ref.dtype).code, loc


class Segments:
    """The segment lists of one native merge plan, built tensor by tensor.

    A tensor that continues the previous one in every input and in the output (same kinds and
    dtypes, back to back) extends its segment instead of opening a new one, so files written alike
    stream as one flat range per shard. The first :meth:`run` turns the lists into a
    ``_core.MergePlan`` (checked once, natively); later runs reuse it with their own weights.
    """

    def __init__(self, num_inputs: int, *, per_segment: bool = False):
        # per_segment: every weighted segment brings its own K weights (a copy segment then carries
        # zeros, which the copy ignores), as a layer-wise soup's tensors do.
        self.K = num_inputs
        self.per_segment = per_segment
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
        self._plan = None  # the _core.MergePlan of these lists, once a run built it

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
                  [int(loc)] + pad, [addr + nbytes] + pad, [0.0] * self.K if self.per_segment else None)

    def _add(self, kind, n, dfile, doff, out_code, out_len, addrs, codes, mapped, ends, ws):
        self._plan = None  # the lists change: the next run builds the plan again
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
            device: Device = CPU, fd_names=(), divisor: float | tuple[float, float] = 1.0) -> None:
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
        try:
            self._run_native(ws, fds, threads, progress, accumulate, device, fd_names, hi, lo)
        except _core.InputFaultError as e:  # an input truncated (or unreadable) under the read: stopped
            raise InputChangedError(f"{e.filename} {e.strerror}") from None

    def _run_native(self, ws, fds, threads, progress, accumulate, device, fd_names, hi, lo) -> None:
        if self._plan is None:  # checked once here (ValueError naming the segment), then run as often as asked
            self._plan = _core.MergePlan(self.K, self.n, self.kind, self.out_file, self.out_offset, self.out_dtype,
                                         self.in_addr, self.in_dtype, self.in_mapped)
        common = dict(fds=list(fds), progress=progress, accumulate=accumulate, fd_names=list(fd_names), divisor=hi,
                      divisor_lo=lo)
        if device.is_cuda:
            from .. import _torch

            self._plan.run_cuda(ws, device=device.index, stream=_torch.cuda_stream(device.index), slot_bytes=SLOT_BYTES,
                                nslots=NSLOTS, fill_threads=threads, **common)
        else:  # a device input is refused natively (the plan knows where its inputs are)
            self._plan.run(ws, threads=threads, window_bytes=WINDOW_BYTES, buffer_bytes=BUFFER_BYTES, nbuffers=NBUFFERS,
                           **common)
