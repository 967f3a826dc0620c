"""The safetensors writer: one file or a sharded folder, streamed, written atomically.

The header of every shard is computed up front from the tensors' names, dtypes and shapes, so data
can be written in order as it is produced (the merge engine computes it chunk by chunk into reused
buffers that a native writer thread ``pwrite``\\ s). Everything goes to a temporary name beside the
target and is renamed into place at the end: on any error nothing is left at the target.
"""

from __future__ import annotations

import decimal
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import FastsoupError, OutputExistsError
from .._native import _core
from ._safetensors import build_header

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes; as transformers' save_pretrained

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read size {size!r}: use bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB")
        value = int(decimal.Decimal(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple
    nbytes: int


@dataclass
class ShardPlan:
    filename: str
    specs: list[TensorSpec]
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # name -> absolute byte offset in the file

    @property
    def size(self) -> int:
        return len(self.header) + sum(s.nbytes for s in self.specs)


@dataclass
class OutputPlan:
    """Where every output tensor goes: ``path`` is one .safetensors file or a sharded folder."""

    path: str
    single: bool
    shards: list[ShardPlan]
    metadata: dict | None

    def locations(self) -> dict[str, tuple[int, int]]:
        """name -> (shard index, absolute byte offset in that shard's file) of every tensor."""
        return {name: (i, off) for i, shard in enumerate(self.shards) for name, off in shard.offsets.items()}

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what the index's ``metadata.total_size`` records)."""
        return sum(s.nbytes for shard in self.shards for s in shard.specs)


def plan_output(
    specs: Sequence[TensorSpec],
    path: str | os.PathLike,
    *,
    shard_size: int | str | None = None,
    groups: Sequence[int] | None = None,
    metadata: dict | None = None,
) -> OutputPlan:
    """Lays tensors out in files: one file when ``path`` ends in ``.safetensors``, else a folder of
    ``model-0000i-of-0000n.safetensors`` shards cut at ``shard_size`` bytes (a tensor larger than
    that gets a shard of its own), or grouped as ``groups`` says (a shard number per tensor, e.g.
    the layout of an input), or one shard."""
    path = os.fspath(path)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate tensor names: {dup[:10]}")
    if "__metadata__" in names:
        raise ValueError("a tensor cannot be named '__metadata__': safetensors reserves that key for the metadata")
    single = path.endswith(".safetensors")
    buckets: list[list[TensorSpec]] = []
    if single:
        buckets = [list(specs)]
    elif shard_size is not None:
        limit = parse_size(shard_size)
        current: list[TensorSpec] = []
        used = 0
        for s in specs:
            if current and used + s.nbytes > limit:
                buckets.append(current)
                current, used = [], 0
            current.append(s)
            used += s.nbytes
        buckets.append(current)
    elif groups is not None:
        index: dict[int, int] = {}
        for s, g in zip(specs, groups):
            if g not in index:
                index[g] = len(buckets)
                buckets.append([])
            buckets[index[g]].append(s)
    else:
        buckets = [list(specs)]
    n = len(buckets)
    shards = []
    for i, bucket in enumerate(buckets):
        filename = os.path.basename(path) if single else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header = build_header(((s.name, s.dtype, s.shape, s.nbytes) for s in bucket), metadata)
        offsets, off = {}, len(header)
        for s in bucket:
            offsets[s.name] = off
            off += s.nbytes
        shards.append(ShardPlan(filename, bucket, header, offsets))
    return OutputPlan(path, single, shards, metadata)


class AtomicOutput:
    """Creates the files of an :class:`OutputPlan` under a temporary name, and renames them into
    place on :meth:`commit` (or on leaving a ``with`` block without an exception). On an exception,
    or :meth:`abort`, the temporary files are removed and the target is left as it was.

    ``fds[i]`` is the open file of ``plan.shards[i]``, its header written and its size set.
    """

    def __init__(self, plan: OutputPlan, *, overwrite: bool = False, fsync: bool = False):
        self.plan = plan
        self.overwrite = overwrite
        self.fsync = fsync
        self.fds: list[int] = []
        self.target = os.path.abspath(plan.path)
        self._tmp: str | None = None
        self._done = False

    def __enter__(self) -> AtomicOutput:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def open(self) -> None:
        target = self.target
        if os.path.lexists(target) and not self.overwrite:
            raise OutputExistsError(f"{self.plan.path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{self._token}")
        try:
            if self.plan.single:
                paths = [self._tmp]
            else:
                os.mkdir(self._tmp)
                paths = [os.path.join(self._tmp, s.filename) for s in self.plan.shards]
            for p, shard in zip(paths, self.plan.shards):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                self.fds.append(fd)
                os.pwrite(fd, shard.header, 0)
                os.ftruncate(fd, shard.size)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> str:
        """Flushes (with fsync when asked), writes the index, and renames into place. Returns the path."""
        if self._done:
            return self.plan.path
        try:
            for fd in self.fds:
                if self.fsync:
                    os.fsync(fd)
            self._close()
            if not self.plan.single:
                index = {
                    "metadata": {"total_size": self.plan.total_size},
                    "weight_map": {s.name: shard.filename for shard in self.plan.shards for s in shard.specs},
                }
                index_path = os.path.join(self._tmp, INDEX_NAME)
                with open(index_path, "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                if self.fsync:
                    _fsync_dir(self._tmp)
            self._install()
            if self.fsync:
                _fsync_dir(os.path.dirname(self.target))
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.plan.path

    def _install(self) -> None:
        target, tmp = self.target, self._tmp
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif self.plan.single and not os.path.isdir(target):
            os.replace(tmp, target)  # atomic; inputs still mapped keep the old inode
        else:
            aside = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.old-{self._token}")
            os.rename(target, aside)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside, target)
                raise
            _remove(aside)
        self._tmp = None

    def abort(self) -> None:
        """Closes and removes everything written so far; the target is untouched."""
        self._close()
        if self._tmp is not None:
            _remove(self._tmp)
            self._tmp = None
        self._done = True

    def _close(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.pop())
            except OSError:
                pass


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    path: str | os.PathLike,
    *,
    shard_size: int | str | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    fsync: bool = False,
) -> str:
    """Writes tensors as safetensors, atomically.

    Args:
        tensors: ``{name: tensor}`` (torch tensors or numpy arrays), an iterable of ``(name,
            tensor)`` pairs, or a :class:`~fastsoup.Checkpoint` (to copy or reshard one).
        path: a path ending in ``.safetensors`` for one file; anything else is a folder of
            ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
        shard_size: largest shard in bytes (int or ``"5GB"``) for a folder; one shard if None.
        metadata: the header's ``__metadata__`` (default ``{"format": "pt"}``).
        overwrite: replace an existing ``path`` (only once the new one is complete).
        fsync: flush the data to disk before the rename (durable across a power loss; slower).

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.

    Example:
        >>> fastsoup.save({"w": torch.zeros(3)}, "soup.safetensors")  # doctest: +SKIP
    """
    from .checkpoint import Checkpoint, _array_meta, _host_buffer

    if isinstance(tensors, Checkpoint):
        ckpt = tensors
        items = [(name, ref) for name, ref in ckpt.items()]
        specs = [TensorSpec(name, ref.dtype, ref.shape, ref.nbytes) for name, ref in items]
        if metadata is None:
            metadata = ckpt.metadata

        def buffer(value):
            addr, _, keep = ckpt.buffer(value)
            return addr, keep

    else:
        items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
        specs = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError("save: tensors must be a mapping of name -> tensor or (name, tensor) pairs")
            dtype, shape, nbytes = _array_meta(item[1])
            specs.append(TensorSpec(item[0], dtype, shape, nbytes))
        buffer = _host_buffer
    from .._dtypes import info

    for s in specs:
        if info(s.dtype).st == "?":
            raise FastsoupError(f"save: tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store")
    plan = plan_output(specs, path, shard_size=shard_size, metadata=metadata if metadata is not None else {"format": "pt"})
    locations = plan.locations()
    with AtomicOutput(plan, overwrite=overwrite, fsync=fsync) as out:
        for (name, value), spec in zip(items, specs):
            if spec.nbytes == 0:
                continue
            shard, offset = locations[name]
            addr, keep = buffer(value)
            where = plan.path if plan.single else os.path.join(plan.path, plan.shards[shard].filename)
            _core.pwrite(out.fds[shard], offset, addr, spec.nbytes, where)
            del keep
    return os.fspath(path)
