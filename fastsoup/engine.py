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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._dtypes import BY_CODE
from ._dtypes import info as dtype_info
from ._dtypes import parse_float_dtype
from . import distributed as _distributed
from ._errors import CheckpointError, InputChangedError
from ._native import _core
from .io import _sidefiles
from .io._sidefiles import Donor, SoupInfo
from .io.checkpoint import Checkpoint, check_compatible, open_checkpoint, with_key
from .io.names import NameMap
from .io.writer import TensorSpec, TorchOutput, is_torch_output, plan_output

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
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    config_from: Any = None,
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
        out: None to return ``dict[str, torch.Tensor]``; a path to write there and return: one
            safetensors file if it ends in ``.safetensors``, one torch file (``torch.save`` of the
            state dict) if it ends in ``.pt``, ``.pth``, ``.bin`` or ``.ckpt``, else a folder. A
            folder soup of model folders is a model folder: weights named as the first ingredient's
            (``model.safetensors``, or shards like it with ``model.safetensors.index.json``; a soup
            of peft adapters: ``adapter_model.safetensors``), the side files of the donor (see
            ``config_from``) and a model card. Every safetensors output records the recipe,
            ingredients, weights and fastsoup version in its metadata (``fastsoup.*``).
        dtype: output dtype ("fp16", "bf16", "fp32", or a torch dtype); default: each tensor's dtype
            in the first ingredient (a :class:`UserWarning` says so when the ingredients' dtypes
            differ). Integer and bool tensors are copied from the first ingredient.
        device: "cpu", or "cuda"/"cuda:N": file inputs stream through pinned memory to the GPU, the
            fused kernel sums there; ``out=None`` then returns CUDA tensors (inputs already on that
            GPU are read in place), a path is written back through pinned memory.
        threads: CPU threads (default: every core this process may use; on CUDA, the threads that
            fill the pinned buffers).
        shard_size: largest output shard (bytes or e.g. "5GB"); default: shard like the first
            ingredient.
        progress: show a progress bar (default: on a terminal, for merges of 256 MB or more); when
            it finishes, a summary line stays on stderr (``average: 4.87 GB in 0.61 s (8.0 GB/s)``).
        overwrite: replace an existing ``out`` (only once the new soup is complete; see the README for
            what may be replaced).
        fsync: flush the output to disk before it is renamed into place.
        key: the state dict to take from training checkpoints (torch files holding several
            entries), e.g. ``"state_dict_ema"`` of timm's ``train.py`` checkpoints; see
            :func:`~fastsoup.open_checkpoint`. Path ingredients become :class:`~fastsoup.KeyedPath`.
        key_map: renames the ingredients' tensors before they are matched: a callable, a dict
            ``{old: new}`` or a list of ``(regex, replacement)`` (see :mod:`fastsoup.io.names`).
        strip_prefix: removes this prefix from the names that have it, e.g. ``"module."`` for DDP and
            open_clip training checkpoints.

    Tied weights (one tensor under two names, as in language models with ``tie_word_embeddings``)
    are recognised in ``save_pretrained`` folders, ``model.state_dict()``, ``save_model`` files and
    ``.bin`` files alike; the soup writes the tensor once, under ``save_pretrained``'s name, and an
    in-memory result carries both names.
        config_from: the folder (or a file in it) whose side files a folder ``out`` gets:
            ``config.json`` (its dtype set to the soup's), ``generation_config.json``, tokenizer
            files, chat templates, processor configs, ``adapter_config.json``, ``README.md``.
            Default: the first ingredient's folder, when it has one (a folder, or a file named as
            transformers or peft name weights, e.g. ``x/model.safetensors``); False: none.

    Returns:
        The state dict (``out=None``) or ``out``.

    Raises:
        CheckpointError: an ingredient (or a side file) is unreadable or does not match the others.
        ValueError: bad weights or options.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> fastsoup.average(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
        >>> soup = fastsoup.average([model_a.state_dict(), model_b.state_dict()])  # doctest: +SKIP
    """
    ingredients = with_key(ingredients, key)
    ws, divisor = _normalization(weights, len(ingredients))
    recipe = "uniform_soup" if weights is None else "weighted_soup"
    return _collective(out, overwrite, "fastsoup.average", lambda: _merge(
        ingredients, ws, out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size,
        progress=progress, overwrite=overwrite, fsync=fsync, desc="average", recipe=recipe, config_from=config_from,
        key_map=key_map, strip_prefix=strip_prefix, divisor=divisor))

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
    if not any(ws):
        raise ValueError(f"weights sum to zero ({list(weights)}): cannot normalize; use fastsoup.weighted_sum")
    shift = math.frexp(max(abs(w) for w in ws))[1] - 1
    ws = [math.ldexp(w, -shift) for w in ws]  # scaled first: the total of huge weights (1e308, 1e308) fits
    total = math.fsum(ws)
    if total == 0.0:
        raise ValueError(f"weights sum to zero ({list(weights)}): cannot normalize; use fastsoup.weighted_sum")
    rest = math.fsum([*ws, -total])
    return ws, (total, rest)


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
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    config_from: Any = None,
):
    """The raw linear combination ``sum_k w_k * theta_k`` (no normalization), e.g. for task
    arithmetic (``theta_0 + lambda * (theta_1 - theta_0)`` is ``weights=[1 - lambda, lambda]``).

    Arguments, returns and errors as :func:`average`, with ``weights`` required.
    """
    ingredients = with_key(ingredients, key)
    ws = _check_weights(weights, len(ingredients))
    return _collective(out, overwrite, "fastsoup.weighted_sum", lambda: _merge(
        ingredients, ws, out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size,
        progress=progress, overwrite=overwrite, fsync=fsync, desc="weighted_sum", recipe="weighted_sum",
        config_from=config_from, key_map=key_map, strip_prefix=strip_prefix))


def _collective(out, overwrite: bool, what: str, merge):
    """``merge()`` as one collective merge under torch.distributed (see ``distributed.merge_job``); a
    torch-file output is computed and written by rank 0 alone (the others wait), as ``torch.save`` is."""
    if out is not None and is_torch_output(out):
        return _distributed.rank0(merge)
    with _distributed.merge_job(out, overwrite=overwrite, what=what):
        return merge()


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
           recipe, config_from=None, key_map=None, strip_prefix=None, divisor=(1.0, 0.0)):
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    out_override = parse_float_dtype(dtype) if dtype is not None else None
    opened = [open_checkpoint(src) for src in ingredients]
    try:
        names = NameMap.build(key_map=key_map, strip_prefix=strip_prefix)
        mapped = names.apply(opened)
        check_compatible(mapped)
        note = _sidefiles.mixed_dtypes_note(mapped, out_override)
        if note is not None:
            _sidefiles.note(note)
        donor = _sidefiles.donor_for(out, config_from, ingredients[0])  # read before any work
        info = SoupInfo(recipe, _sidefiles.ingredient_names(ingredients), [w / divisor[0] for w in weights])
        return _run(mapped, weights, out, out_override, threads or 0, shard_size, progress, overwrite, fsync, desc,
                    device=dev, aliases=names.aliases, info=info, donor=donor, divisor=divisor)
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
         layout: Checkpoint | None = None, device: Device = CPU, extras: dict | None = None,
         aliases: dict | None = None, info: SoupInfo | None = None, donor: Donor | None = None,
         divisor: tuple[float, float] = (1.0, 0.0)):
    # `layout` (default: the first input) gives the tensor order, default dtypes, shards and metadata.
    # Float tensors: round(sum_k weights[k] * theta_k / divisor), divisor = (high part, low part).
    # `extras`: files written into a folder output with it (name -> bytes: a sidecar).
    # `info`: what the soup is made of (its metadata and model card); `donor`: the side files of a
    # folder output (read by the caller before any work).
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
        from . import _torch

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
        plan = plan_output(specs, out, shard_size=shard_size, groups=_sidefiles.shard_groups(first, names),
                           metadata=metadata, weights_name=donor.weights_name if donor is not None else None)
        if donor is not None and donor.adapter and len(plan.shards) > 1:
            raise ValueError(f"{out}: a soup of peft adapters is one {donor.weights_name} (peft reads no shards); "
                             f"shard_size={shard_size!r} would cut it into {len(plan.shards)}")
        if donor is not None and not plan.single:
            extras = {**donor.render(dtype=_soup_dtype(first, out_dtypes), info=info), **(extras or {})}
        locations = plan.locations()
        dests = [locations[name] for name in names]
        # One process: AtomicOutput and every tensor; in a collective merge (torch.distributed) this
        # rank's writer and the tensors of its shards only.
        # (The ranks compare the effective weights, weights / divisor.)
        writer, names, dests = _distributed.output(plan, names, dests, [w / divisor[0] for w in weights],
                                                   overwrite=overwrite, fsync=fsync, protect=protect, extras=extras)

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

    started = time.perf_counter()
    done = False
    try:
        if writer is not None:
            writer.open()
        try:
            files = writer is not None and not torch_out
            segs.run(weights, fds=writer.fds if files else [], threads=threads, progress=callback,
                     device=device, fd_names=writer.names if files else (), divisor=divisor)
            verify_inputs(ckpts)  # truncated or rewritten meanwhile: nothing is installed or returned
            if result is not None:
                for alias, canon in (aliases or {}).items():  # tied weights: both names, one tensor
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
    stream as one flat range per shard. The first :meth:`run` turns the lists into a
    ``_core.MergePlan`` (checked once, natively); later runs reuse it with their own weights.
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
                  [int(loc)] + pad, [addr + nbytes] + pad, None)

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
            from . import _torch

            self._plan.run_cuda(ws, device=device.index, stream=_torch.cuda_stream(device.index), slot_bytes=SLOT_BYTES,
                                nslots=NSLOTS, fill_threads=threads, **common)
        else:  # a device input is refused natively (the plan knows where its inputs are)
            self._plan.run(ws, threads=threads, window_bytes=WINDOW_BYTES, buffer_bytes=BUFFER_BYTES, nbuffers=NBUFFERS,
                           **common)


def _progress_bar(progress: bool | None, total: int, desc: str):
    if progress is None:
        progress = total >= AUTO_PROGRESS_BYTES and sys.stderr is not None and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True, leave=False)


__all__ = ["CPU", "Device", "average", "resolve_device", "weighted_sum"]
