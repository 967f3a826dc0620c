"""The safetensors writer: one file or a sharded folder, streamed, written atomically.

The header of every shard is computed up front from the tensors' names, dtypes and shapes, so data
can be written in order as it is produced (the merge engine computes it chunk by chunk into reused
buffers that a native writer thread ``pwrite``\\ s). Everything goes to a temporary name beside the
target and is renamed into place at the end: on any error nothing is left at the target.
"""

from __future__ import annotations

import decimal
import errno
import json
import os
import re
import secrets
import signal
import stat
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._errors import (
    ArgumentError,
    ArgumentTypeError,
    FastsoupError,
    InterruptedAfterInstall,
    OutputExistsError,
    UnsafeOutputError,
)
from .._native import _core
from . import _tempfiles
from ._safetensors import build_header

INDEX_NAME = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # an output path ending so is one torch state-dict file
DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes; as transformers' save_pretrained

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ArgumentError(f"cannot read size {size!r}: use bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB")
        value = int(decimal.Decimal(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ArgumentError(f"size {size!r} must be positive")
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
    """Where every output tensor goes: ``path`` is one .safetensors file or a folder (of shards and
    their index, or of one named file with no index: ``index`` False)."""

    path: str
    single: bool
    shards: list[ShardPlan]
    metadata: dict | None
    index: bool = True  # a folder output: write model.safetensors.index.json

    def locations(self) -> dict[str, tuple[int, int]]:
        """name -> (shard index, absolute byte offset in that shard's file) of every tensor."""
        return {name: (i, off) for i, shard in enumerate(self.shards) for name, off in shard.offsets.items()}

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what the index's ``metadata.total_size`` records)."""
        return sum(s.nbytes for shard in self.shards for s in shard.specs)


def is_file_output(path: str | os.PathLike) -> bool:
    """Whether an output path names one file (``.safetensors``, or a torch file: ``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``) rather than a folder."""
    path = os.fspath(path)
    return path.endswith(".safetensors") or is_torch_output(path)


def is_torch_output(path: str | os.PathLike) -> bool:
    """Whether an output path names a torch state-dict file (``torch.save``)."""
    return os.fspath(path).endswith(TORCH_SUFFIXES)


def plan_output(
    specs: Sequence[TensorSpec],
    path: str | os.PathLike,
    *,
    shard_size: int | str | None = None,
    groups: Sequence[int] | None = None,
    metadata: dict | None = None,
    weights_name: str | None = None,
) -> OutputPlan:
    """Lays tensors out in files: one file when ``path`` ends in ``.safetensors``, else a folder of
    ``model-0000i-of-0000n.safetensors`` shards cut at ``shard_size`` bytes (a tensor larger than
    that gets a shard of its own), or grouped as ``groups`` says (a shard number per tensor, e.g.
    the layout of an input), or one shard, with ``model.safetensors.index.json``.

    ``weights_name`` (a folder output, e.g. ``"model.safetensors"``): the name of the one file when
    the layout has one shard, written without an index, as transformers' ``save_pretrained`` does."""
    path = os.fspath(path)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ArgumentError(f"duplicate tensor names: {dup[:10]}")
    if "__metadata__" in names:
        raise ArgumentError("a tensor cannot be named '__metadata__': safetensors reserves that key for the metadata")
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
    named = not single and weights_name is not None and n == 1
    if named and (os.path.basename(weights_name) != weights_name or not weights_name.endswith(".safetensors")):
        raise ArgumentError(f"weights_name {weights_name!r} is not a plain .safetensors file name")
    shards = []
    for i, bucket in enumerate(buckets):
        if single or named:
            filename = os.path.basename(path) if single else weights_name
        else:
            filename = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header = build_header(((s.name, s.dtype, s.shape, s.nbytes) for s in bucket), metadata)
        offsets, off = {}, len(header)
        for s in bucket:
            offsets[s.name] = off
            off += s.nbytes
        shards.append(ShardPlan(filename, bucket, header, offsets))
    return OutputPlan(path, single, shards, metadata, index=not single and not named)


MANIFEST_NAME = ".fastsoup.json"  # in every output folder: the files fastsoup wrote there, and their sizes
MANIFEST_FORMAT = "fastsoup-output-1"
# What a folder written before the manifest existed may hold and still be replaced: shards, the
# index and the search's sidecar.
_LEGACY_NAMES = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|soup\.json)$")


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def replaceable(target: str, *, single: bool, protect: Sequence[str] = ()) -> None:
    """Checks that an existing ``target`` may be replaced by an output (``overwrite=True``).

    A file (or a symlink, which is replaced itself, never what it points to) may be replaced. A
    folder only when it holds nothing but what fastsoup writes: the files its manifest lists, with
    the sizes they were written with (a folder from before the manifest: shards, index and sidecar
    only). Never a folder that holds one of ``protect`` (the inputs), nor the current folder or one
    of its ancestors.

    Raises:
        UnsafeOutputError: with a one-line reason; nothing is changed.
    """
    target = os.path.abspath(target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return  # a file, a symlink: replaced by an atomic rename
    real = os.path.realpath(target)
    cwd = os.path.realpath(os.getcwd())
    if _within(cwd, real):
        what = "the current folder" if cwd == real else f"an ancestor of the current folder ({cwd})"
        raise UnsafeOutputError(f"{target} is {what}: refusing to replace it; give another output path")
    for p in protect:
        rp = os.path.realpath(p)
        if _within(rp, real):
            raise UnsafeOutputError(
                f"{target} holds the input {p}: refusing to replace it (the soup would delete its own ingredients); "
                "give another output path"
            )
    reason = _foreign_entry(target)
    if reason is not None:
        raise UnsafeOutputError(
            f"{target} holds {reason}: refusing to replace it (--overwrite replaces only a file, or a folder of "
            "what fastsoup wrote); move it away or give another output path"
        )


def _manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), dict):
        return None
    files = m["files"]
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in files.items()):
        return None
    return files


def _foreign_entry(folder: str) -> str | None:
    """Why ``folder`` is not only fastsoup's output (a phrase), or None when it is."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        return f"entries that cannot be listed ({e.strerror})"
    files = _manifest(folder)
    for name in sorted(names):
        if name == MANIFEST_NAME:
            continue
        try:
            st = os.lstat(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            return f"{name!r}, which is not a file fastsoup wrote"
        if files is not None:
            if name not in files:
                return f"{name!r}, which fastsoup did not write"
            if files[name] != st.st_size:
                return f"{name!r}, which was changed after fastsoup wrote it ({st.st_size} bytes, written {files[name]})"
        elif not _LEGACY_NAMES.match(name):
            return f"{name!r}, which fastsoup did not write"
    return None


class _Deferred:
    """Holds back SIGINT, SIGTERM and SIGHUP for a few lines that must not be cut in two (the install
    renames): they are recorded and delivered once the block ends. Main thread only (signals reach
    Python there); elsewhere a no-op."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __enter__(self):
        self._old = {}
        self._got = []
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, lambda s, f: self._got.append(s))
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        for sig in self._got:
            os.kill(os.getpid(), sig)  # delivered now, with the handler that was in place
        return False


class SharedTemp(NamedTuple):
    """The temporary location of an output that several writers fill (see :class:`AtomicOutput`):
    its path (a folder, or the file of a single-file output) and the token in its name."""

    path: str
    token: str


class AtomicOutput:
    """Creates the files of an :class:`OutputPlan` under a temporary name, and installs them at the
    target on :meth:`commit` (or on leaving a ``with`` block without an exception). On an exception,
    or :meth:`abort`, the temporary files are removed and the target is left as it was.

    The rules (DESIGN.md, safety):

    - Temporary names are ``.NAME.tmp-PID-TOKEN`` beside the target, locked while written; a later
      run to the same target removes those of processes that are gone (``kill -9``, power loss).
    - Without ``overwrite`` the install is exclusive (``renameat2(RENAME_NOREPLACE)``): a target that
      appeared while the files were written is never replaced; the output is discarded with an
      error instead.
    - With ``overwrite`` only a file, or a folder holding nothing but what fastsoup wrote there (its
      manifest lists it), is replaced (:func:`replaceable`), never one that holds an input
      (``protect``), nor the current folder or an ancestor of it. A folder is swapped in atomically
      (``RENAME_EXCHANGE``) and the old one is then removed file by file, by name.
    - Folder outputs carry a manifest (``.fastsoup.json``) of the files written, and may carry
      ``extras`` (name -> bytes: a sidecar, side files), written before the install.

    ``fds[i]`` is the open file of ``plan.shards[i]``, its header written and its size set;
    ``names[i]`` its final path (for messages).

    A part of an output that several writers make together (the ranks of a collective merge):
    ``shared`` names the temporary folder that its owner created (and checked the target for), and
    ``shards`` the shards this writer creates there (``fds`` is -1 for the others). Then
    :meth:`commit` finishes this part only (flush, close), :meth:`abort` removes this part only, and
    the owner's writer, once every part is committed, calls :meth:`install` (index, extras, manifest,
    and the rename of a plain :meth:`commit`).
    """

    def __init__(self, plan: OutputPlan, *, overwrite: bool = False, fsync: bool = False,
                 protect: Sequence[str] = (), extras: Mapping[str, bytes] | None = None,
                 shared: SharedTemp | None = None, shards: Sequence[int] | None = None):
        self.plan = plan
        self.shared = shared
        self.shards = list(range(len(plan.shards))) if shards is None else [int(i) for i in shards]
        if shared is None and shards is not None:
            raise ValueError("shards= is for a part of a shared output (shared=)")
        self.overwrite = overwrite
        self.fsync = fsync
        self.protect = list(protect)
        self.extras = dict(extras or {})
        if self.extras and plan.single:
            raise ValueError("extra files need a folder output")
        taken = {INDEX_NAME, MANIFEST_NAME, *(s.filename for s in plan.shards)}
        for name in self.extras:
            if os.path.basename(name) != name or name in taken or name.startswith("."):
                raise ValueError(f"extra file name {name!r} is not a plain file name of its own")
        self.fds: list[int] = []
        self.target = os.path.abspath(plan.path)
        self.names = [self.target if plan.single else os.path.join(plan.path, s.filename) for s in plan.shards]
        self._tmp: str | None = None
        self._lock = -1
        self._token = ""
        self._done = False
        self._paths: list[str] = []  # a part's files (shared): what abort() removes

    def __enter__(self) -> AtomicOutput:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def check(self) -> None:
        """The target's checks, without creating anything: refuses an existing target without
        ``overwrite``, and one :func:`replaceable` refuses with it."""
        if os.path.lexists(self.target):
            if not self.overwrite:
                raise OutputExistsError(f"{self.plan.path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
            replaceable(self.target, single=self.plan.single, protect=self.protect)

    def open(self) -> None:
        if self.shared is not None:
            self._open_part()
            return
        target = self.target
        parent = os.path.dirname(target)
        self.check()
        os.makedirs(parent, exist_ok=True)
        _tempfiles.reap(parent)  # what killed runs left beside it
        self._token = secrets.token_hex(4)
        self._tmp = _tempfiles.temp_path(target, token=self._token)
        try:
            if self.plan.single:
                paths = [self._tmp]
            else:
                os.mkdir(self._tmp)
                self._lock = _tempfiles.hold(self._tmp)
                paths = [os.path.join(self._tmp, s.filename) for s in self.plan.shards]
            for p, name, shard in zip(paths, self.names, self.plan.shards):
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                self.fds.append(fd)
                if self.plan.single:
                    _tempfiles.lock(fd)  # "being written", for the reaper
                _named(name, os.pwrite, fd, shard.header, 0)
                _named(name, os.ftruncate, fd, shard.size)
        except BaseException:
            self.abort()
            raise

    def _open_part(self) -> None:
        self._tmp, self._token = self.shared.path, self.shared.token
        self.fds = [-1] * len(self.plan.shards)
        try:
            for i in self.shards:
                p = self._tmp if self.plan.single else os.path.join(self._tmp, self.plan.shards[i].filename)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                self.fds[i] = fd
                self._paths.append(p)
                _named(self.names[i], os.pwrite, fd, self.plan.shards[i].header, 0)
                _named(self.names[i], os.ftruncate, fd, self.plan.shards[i].size)
        except BaseException:
            self.abort()
            raise

    def install(self) -> str:
        """A part of a shared output (the owner's, once every part is committed): adopts the shared
        temporary folder and installs it as :meth:`commit` installs its own."""
        if self.shared is None:
            raise ValueError("install() is for the owner of a shared output; use commit()")
        self.shared = None  # from here on, a failure removes the whole temporary folder
        self._paths = []
        self._done = False
        return self.commit()

    def commit(self) -> str:
        """Flushes (with fsync when asked), writes the index, extras and manifest, and installs the
        output at the target. Returns the path. (A part of a shared output: flushes and closes it.)"""
        if self._done:
            return self.plan.path
        if self.shared is not None:
            try:
                for fd, name in zip(self.fds, self.names):
                    if fd >= 0 and self.fsync:
                        _named(name, os.fsync, fd)
                self._close_files()
            except BaseException:
                self.abort()
                raise
            self._done = True
            return self.plan.path
        try:
            for fd, name in zip(self.fds, self.names):
                if self.fsync:
                    _named(name, os.fsync, fd)
            self._close_files()
            if not self.plan.single:
                files = {shard.filename: shard.size for shard in self.plan.shards}
                if self.plan.index:
                    index = {
                        "metadata": {"total_size": self.plan.total_size},
                        "weight_map": {s.name: shard.filename for shard in self.plan.shards for s in shard.specs},
                    }
                    self._write_in_tmp(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
                    files[INDEX_NAME] = os.path.getsize(os.path.join(self._tmp, INDEX_NAME))
                for name, data in self.extras.items():
                    self._write_in_tmp(name, data)
                    files[name] = len(data)
                manifest = {"format": MANIFEST_FORMAT, "files": files}
                self._write_in_tmp(MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
                if self.fsync:
                    _fsync_dir(self._tmp)
            self._install()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.plan.path

    def _write_in_tmp(self, name: str, data: bytes) -> None:
        path = os.path.join(self._tmp, name)
        shown = os.path.join(self.plan.path, name)
        with _named(shown, open, path, "xb") as f:
            _named(shown, f.write, data)
            if self.fsync:
                f.flush()
                _named(shown, os.fsync, f.fileno())

    def _install(self) -> None:
        """The last step: the temporary output takes the target's name (see the class docstring)."""
        target, tmp = self.target, self._tmp
        parent = os.path.dirname(target)
        old = None
        installed = False
        try:
            with _Deferred():  # the renames below are not to be cut in two by Ctrl-C or SIGTERM
                if not self.overwrite or not os.path.lexists(target):
                    _rename_exclusive(tmp, target, self.plan.path, self.overwrite)
                else:
                    replaceable(target, single=self.plan.single, protect=self.protect)  # again: it may have changed
                    old = _tempfiles.temp_path(target, "old", token=self._token)
                    is_dir = os.path.isdir(target) and not os.path.islink(target)
                    if self.plan.single and not is_dir:
                        os.replace(tmp, target)  # atomic; inputs still mapped keep the old inode
                        old = None
                    else:
                        _swap_in(tmp, target, old)
                installed = True
                self._tmp = None
                _tempfiles.release(self._lock)
                self._lock = -1
                if self.fsync:
                    _fsync_dir(parent)
            # A signal held back above is delivered on leaving the block: the output is installed.
            if old is not None:
                _remove_replaced(old, self.plan.path)
        except KeyboardInterrupt as e:
            if not installed or isinstance(e, InterruptedAfterInstall):
                raise
            left = (f"; what is left of the replaced one is at {old}, which the next run beside it removes"
                    if old is not None and os.path.lexists(old) else "")
            raise InterruptedAfterInstall(
                f"interrupted after {self.plan.path} was installed: it holds the new output, complete{left}") from e

    def abort(self) -> None:
        """Closes and removes everything written so far; the target is untouched."""
        self._close_files()
        if self.shared is not None:  # this part only: the owner removes the shared folder
            for p in self._paths:
                _tempfiles.remove(p)
            self._paths = []
            self._done = True
            return
        if self._tmp is not None:
            _tempfiles.remove(self._tmp)
            self._tmp = None
        _tempfiles.release(self._lock)
        self._lock = -1
        self._done = True

    def _close_files(self) -> None:
        while self.fds:
            fd = self.fds.pop()
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


class TorchOutput(AtomicOutput):
    """An :class:`AtomicOutput` of one torch state-dict file (``NAME.pt``, ``.pth``, ``.bin``,
    ``.ckpt``), with the same rules: checked and created under a temporary name by :meth:`open`
    (before the work), filled by :meth:`write` (``torch.save``), installed by :meth:`commit`.
    Imports torch only in :meth:`write`."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = False,
                 protect: Sequence[str] = ()):
        path = os.fspath(path)
        plan = OutputPlan(path, True, [ShardPlan(os.path.basename(path), [])], None, index=False)
        super().__init__(plan, overwrite=overwrite, fsync=fsync, protect=protect)

    def write(self, tensors: Mapping[str, Any]) -> None:
        """``torch.save`` of ``tensors`` (name -> torch tensor or numpy array) into the temporary file."""
        from .. import _torch

        _named(self.names[0], _torch.save_state_dict, tensors, self.fds[0])


def save_torch(tensors: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = False,
               protect: Sequence[str] = ()) -> str:
    """Writes a state dict as one torch file that ``torch.load(path, weights_only=True)`` reads,
    atomically (:class:`TorchOutput`). Returns ``path``."""
    with TorchOutput(path, overwrite=overwrite, fsync=fsync, protect=protect) as out:
        out.write(tensors)
    return os.fspath(path)


def _named(path: str, fn, *args):
    """Calls ``fn(*args)``; an OSError without a file name gets ``path`` (the output being written)."""
    try:
        return fn(*args)
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, f"cannot write: {e.strerror}", path) from None
        raise


def _rename_exclusive(tmp: str, target: str, shown: str, overwrite: bool) -> None:
    """rename(tmp, target) that never replaces an existing target."""
    try:
        _core.rename_noreplace(tmp, target)
        return
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        _rename_exclusive_fallback(tmp, target)
        return
    why = ("it appeared while the output was being written (another process created it)" if not overwrite
           else "it appeared at the last moment")
    raise OutputExistsError(f"{shown} exists: {why}; nothing was replaced and this output was discarded. Pass "
                            "overwrite=True (CLI: --overwrite) to replace it")


def _rename_exclusive_fallback(tmp: str, target: str) -> None:
    """Where RENAME_NOREPLACE is not supported: link + unlink for a file (atomic); a folder is renamed
    after a last check (rename replaces only an empty folder)."""
    if os.path.isdir(tmp):
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", target)
        os.rename(tmp, target)
    else:
        os.link(tmp, target)  # EEXIST if it exists
        os.unlink(tmp)


def _swap_in(tmp: str, target: str, old: str) -> None:
    """Puts ``tmp`` at ``target`` and what was there at ``old``, atomically where the filesystem can
    exchange two names (RENAME_EXCHANGE), else with two renames."""
    try:
        _core.rename_exchange(tmp, target)  # now: target = new, tmp = old
        os.rename(tmp, old)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise


def _remove_replaced(old: str, shown: str) -> None:
    """Removes the output that was replaced (now at ``old``): a file, or a folder file by file by the
    names fastsoup wrote (then the empty folder). Anything else found there stays, with a warning.
    Interrupted, it stops and says so: the new output is installed; the next run reaps the rest."""
    try:
        if not (os.path.isdir(old) and not os.path.islink(old)):
            os.unlink(old)
            return
        reason = _foreign_entry(old)
        if reason is not None:  # a file appeared in the old folder after the last check: keep it all
            warnings.warn(f"the replaced {shown} (now {old}) holds {reason}; it was kept: remove it yourself",
                          stacklevel=3)
            return
        for name in os.listdir(old):
            if name != MANIFEST_NAME:
                os.unlink(os.path.join(old, name))
        try:
            os.unlink(os.path.join(old, MANIFEST_NAME))
        except FileNotFoundError:
            pass
        os.rmdir(old)
    except KeyboardInterrupt as e:
        raise InterruptedAfterInstall(
            f"interrupted after {shown} was installed: {shown} holds the new output, complete; what is left of the "
            f"replaced one is at {old}, which the next run beside it removes"
        ) from e
    except OSError as e:
        warnings.warn(f"could not remove the replaced {shown} (now {old}): {e}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# Sidecars: the JSON record a recipe writes with its soup

SIDECAR_NAME = "soup.json"  # inside a folder output
SIDECAR_RECIPES = ("greedy_soup", "learned_soup", "learned_soup_layerwise")


def sidecar_path(out: str | os.PathLike) -> str:
    """``NAME.json`` next to a ``NAME.safetensors`` (or torch ``NAME.pt``) file, ``soup.json`` inside a folder."""
    out = os.fspath(out)
    if is_file_output(out):
        return os.path.splitext(out)[0] + ".json"
    return os.path.join(out, SIDECAR_NAME)


def _is_sidecar(path: str) -> bool:
    """Whether ``path`` holds a sidecar fastsoup wrote (a JSON object naming one of its recipes)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("recipe") in SIDECAR_RECIPES


def with_sidecar(out: str | os.PathLike, record: dict, write, *, overwrite: bool, rank0=None) -> str:
    """Writes a soup and its sidecar record as one output. ``write(extras)`` writes the soup (a
    folder output gets ``extras = {"soup.json": ...}``, written inside it before its install; a file
    output gets None) and returns its path.

    For a ``NAME.safetensors`` (or torch ``NAME.pt``) output the sidecar is ``NAME.json`` beside it: refused before any work
    when a file of that name exists that fastsoup did not write (or without ``overwrite``), and
    written whole (temporary name, rename) after the soup is installed; ``rank0(fn)``, when given,
    runs that write (on rank 0 alone under torch.distributed).
    """
    data = (json.dumps(record, indent=1) + "\n").encode()
    out = os.fspath(out)
    if not is_file_output(out):
        return write({SIDECAR_NAME: data})
    side = sidecar_path(out)
    if os.path.lexists(side):
        if not (os.path.isfile(side) and not os.path.islink(side) and _is_sidecar(side)):
            raise UnsafeOutputError(f"{side} exists and fastsoup did not write it: the soup's record would replace it; "
                                    "move it away or give another output path")
        if not overwrite:
            raise OutputExistsError(f"{side} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path = write(None)

    def write_side() -> None:
        with _tempfiles.replacing(side) as f:
            f.write(data)

    (rank0 or (lambda fn: fn()))(write_side)
    return path


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
    _extras: Mapping[str, bytes] | None = None,
) -> str:
    """Writes tensors as safetensors, atomically.

    Args:
        tensors: ``{name: tensor}`` (torch tensors or numpy arrays), an iterable of ``(name,
            tensor)`` pairs, or a :class:`~fastsoup.Checkpoint` (to copy or reshard one).
        path: a path ending in ``.safetensors`` for one file; ``.pt``, ``.pth``, ``.bin`` or
            ``.ckpt`` for one torch file (``torch.save`` of the state dict; ``metadata`` and
            ``shard_size`` do not apply); anything else is a folder of
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
    from .checkpoint import Checkpoint, array_meta, host_buffer

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
        if isinstance(tensors, Mapping):  # tied weights (one tensor, two names): written once, first name
            from .checkpoint import memory_refs, tied

            try:
                kept, _ = tied(memory_refs(tensors, "save"))
            except FastsoupError:
                kept = None
            if kept is not None and len(kept) < len(items):
                items = [(n, t) for n, t in items if n in kept]
        specs = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ArgumentTypeError("save: tensors must be a mapping of name -> tensor or (name, tensor) pairs")
            dtype, shape, nbytes = array_meta(item[1], "save", item[0])
            specs.append(TensorSpec(item[0], dtype, shape, nbytes))
        buffer = host_buffer
    if is_torch_output(path):
        if _extras:
            raise ArgumentError("extra files need a folder output")
        if isinstance(tensors, Checkpoint):
            values = {name: tensors.tensor(name) for name, _ in items}
            tensors.verify("the save")
        else:
            values = dict(items)
        return save_torch(values, path, overwrite=overwrite, fsync=fsync,
                          protect=list(tensors.files) if isinstance(tensors, Checkpoint) else [])
    from .._dtypes import info

    for s in specs:
        if info(s.dtype).st == "?":
            raise ArgumentError(f"save: tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store")
    plan = plan_output(specs, path, shard_size=shard_size, metadata=metadata if metadata is not None else {"format": "pt"})
    locations = plan.locations()
    source = tensors if isinstance(tensors, Checkpoint) else None
    protect = list(source.files) if source is not None else []
    with AtomicOutput(plan, overwrite=overwrite, fsync=fsync, protect=protect, extras=_extras) as out:
        for (name, value), spec in zip(items, specs):
            if spec.nbytes == 0:
                continue
            shard, offset = locations[name]
            addr, keep = buffer(value)
            try:
                _core.pwrite(out.fds[shard], offset, addr, spec.nbytes, out.names[shard])
            except OSError as e:
                if source is not None and e.errno == errno.EFAULT:  # a mapped source truncated under the write
                    source.verify("the save")
                raise
            del keep
        if source is not None:
            source.verify("the save")  # before the install: a source rewritten meanwhile gives no output
    return os.fspath(path)
