"""Opening input files safely, and their identity: regular files only (never a FIFO or device), through
the native guarded mapping, with the identity (``fstat`` of the descriptor read through) kept so a
file changed under a merge is caught (:class:`FileWatch`)."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from .._errors import CheckpointError, InputChangedError
from .._native import _core


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


def _changed(was: tuple, now: tuple) -> bool:
    """Whether the inode's data may have changed between two identities. The change time also moves
    when a link is added or removed (the path replaced by a rename: the inode, which is what was
    read, keeps its data), so it counts only while the link count stayed the same; then a rewrite
    that restored the modification time (``cp -p``, ``rsync -t``) is still caught."""
    if was[:4] != now[:4]:
        return True
    return was[4] != now[4] and was[5] == now[5]


class FileWatch:
    """One input file as it was opened: its identity (from ``fstat`` of the descriptor it was opened
    with, kept open) and the fault counter of its mapping (``faults``: a native MappedFile or
    FaultGuard). :meth:`check` raises if the file was changed or a read of it faulted since.

    Identity is (device, inode, size, mtime_ns, ctime_ns, links) of the inode that was opened:
    rewriting the file in place (``cp``, ``torch.save``, ``open(..., "wb")``) changes it; replacing it
    by a rename does not, and needs no check, since the old inode, which is what was read, keeps its
    data (see :func:`_changed`).
    """

    def __init__(self, path: str, fd: int, faults_of: Any = None, owner: Any = None):
        self.path = path
        self._fd = fd
        self._faults_of = faults_of
        self._owner = owner  # keeps the descriptor (or mapping) open
        self.identity = _identity(os.fstat(fd))
        self._faults = self._fault_count()

    def _fault_count(self) -> int:
        return int(self._faults_of.faults) if self._faults_of is not None else 0

    def renamed(self, path: str) -> None:
        """After fastsoup itself renamed the file to ``path`` (a rename moves the change time): takes
        its identity anew. Check it just before the rename."""
        self.path = path
        self.identity = _identity(os.fstat(self._fd))

    def check(self, during: str = "the merge") -> None:
        if self._fault_count() != self._faults:
            raise InputChangedError(
                f"{self.path} changed during {during}: it was truncated while being read (or a read failed with an I/O "
                "error); nothing computed from it was kept"
            )
        try:
            now = _identity(os.fstat(self._fd))
        except OSError as e:
            raise InputChangedError(f"{self.path}: cannot check it after reading ({e.strerror})") from None
        if _changed(self.identity, now):
            was, new = self.identity, now
            what = (f"its size went from {was[2]} to {new[2]} bytes" if was[2] != new[2]
                    else "it was rewritten in place (same size, new modification time)")
            raise InputChangedError(
                f"{self.path} changed during {during}: {what}; nothing computed from it was kept. Do not modify "
                "checkpoints while fastsoup reads them (write new ones under new names)"
            )


class _OpenFile:
    """A descriptor kept open for a file's identity (torch files, whose mapping torch makes)."""

    def __init__(self, path: str):
        self.fd = _open_regular(path)

    def __del__(self):
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_regular(path: str) -> None:
    """Refuses anything but a regular file (following symlinks) before it is opened: opening a FIFO
    would wait for a writer, and a device never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or folder") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file: it is {_kind(st.st_mode)}; give a checkpoint file")


def _retrying(open_once, path: str):
    """Calls ``open_once()``, again after EINTR (a signal: Python's handlers run in between, so
    Ctrl-C goes through), and once more after raising the open-files limit on EMFILE."""
    raised = False
    while True:
        try:
            return open_once()
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            if e.errno == errno.EMFILE and not raised:
                raised = True
                if _raise_nofile_limit():
                    continue
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def _raise_nofile_limit() -> bool:
    """Raises the soft limit of open files to the hard one (every mapped input keeps a descriptor)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
            return True
    except (ImportError, OSError, ValueError):
        pass
    return False


def _open_regular(path: str) -> int:
    def once():
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CheckpointError(f"{path}: not a regular file: it is {_kind(st.st_mode)}; give a checkpoint file")
        return fd

    return _retrying(once, path)


def map_file(path: str, writable: bool = False):
    """The native mapping of a regular file (no FIFO, device or folder), guarded against truncation."""
    return _retrying(lambda: _core.MappedFile(path, writable), path)


__all__ = ["FileWatch", "map_file"]
