"""Temporary files beside a target, and the reaping of those a dead process left behind.

Every temporary name fastsoup makes is ``.BASE.KIND-PID-TOKEN[SUFFIX]`` in the target's folder:
``KIND`` is ``tmp`` (being written) or ``old`` (a replaced output being removed), ``PID`` the
writer's process id, ``TOKEN`` 8 random hex digits, ``SUFFIX`` an optional extension (``.bin``).
While a process writes a temporary file or folder it holds an ``flock`` on it (:func:`hold`).

:func:`reap` removes the entries of a folder with such names whose process is gone: the PID is not
alive on this machine *and* nobody holds the lock (so neither a reused PID nor a writer on another
machine of a shared filesystem, where locks are shared, loses its file). Kills that no handler sees
(``kill -9``, the OOM killer, a power loss) leave temporary files; the next run beside them reaps
them.

:func:`replacing` writes a file whole under such a name and renames it over its target (removing it
instead when the block raises, ``KeyboardInterrupt`` included); the callers that write in steps (a
stored held-out set) use :func:`temp_path`, :func:`hold` and :func:`remove` themselves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat

_NAME = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})(?P<suffix>\.[A-Za-z0-9]+)?$")


def temp_path(target: str, kind: str = "tmp", suffix: str = "", token: str | None = None) -> str:
    """A fresh temporary name beside ``target``: ``DIR/.BASE.KIND-PID-TOKEN SUFFIX``."""
    if kind not in ("tmp", "old"):
        raise ValueError(f"kind must be 'tmp' or 'old', got {kind!r}")
    target = os.path.abspath(os.fspath(target))
    token = token or secrets.token_hex(4)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{kind}-{os.getpid()}-{token}{suffix}")


def parse(name: str) -> dict | None:
    """The parts of a temporary name (base, kind, pid, token, suffix), or None if it is not one."""
    m = _NAME.match(name)
    if m is None:
        return None
    d = m.groupdict()
    d["pid"] = int(d["pid"])
    d["suffix"] = d["suffix"] or ""
    return d


def hold(path: str) -> int:
    """Opens ``path`` (a file or a folder) and takes an exclusive ``flock`` on it: the lock says "in
    use" to :func:`reap` for as long as the returned descriptor is open. Returns -1 where the
    filesystem has no locks (reaping then relies on the PID alone)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    if not lock(fd):
        os.close(fd)
        return -1
    return fd


def lock(fd: int) -> bool:
    """Takes the exclusive ``flock`` of :func:`hold` on an open descriptor (e.g. the one a temporary
    file is being written through); False where the filesystem has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def release(fd: int) -> None:
    """Closes a descriptor of :func:`hold` (dropping its lock)."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours counts)."""
    if pid <= 0:
        return True  # not a real writer's id: never reap on its word
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _locked(path: str) -> bool:
    """True when another process holds the lock of :func:`hold` on ``path`` (or it cannot be told)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        # EWOULDBLOCK: held. Filesystems without locks (ENOLCK, EINVAL...): the PID alone decides.
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def stale(folder: str, name: str) -> bool:
    """Whether ``folder/name`` is a temporary entry of a process that is gone."""
    parts = parse(name)
    if parts is None:
        return False
    path = os.path.join(folder, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return False  # fastsoup makes only files and folders
    return not pid_alive(parts["pid"]) and not _locked(path)


def reap(folder: str, base: str | None = None) -> list[str]:
    """Removes the temporary entries of dead processes in ``folder`` (those of ``base`` only, when
    given). Returns the paths removed. Never raises for an entry it cannot remove."""
    folder = os.fspath(folder) or "."
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        parts = parse(name)
        if parts is None or (base is not None and parts["base"] != base):
            continue
        if stale(folder, name):
            path = os.path.join(folder, name)
            remove(path)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


def remove(path: str) -> None:
    """Removes a temporary file or folder of fastsoup's own (missing is fine, errors are ignored)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def replacing(target: str, *, text: bool = False, fsync: bool = False):
    """Writes ``target`` whole or not at all: yields a file (binary, or UTF-8 text with ``text``)
    open on a fresh temporary name beside it, held (:func:`hold`) while the block runs; when the
    block ends, the file is (``fsync``: flushed to disk and) renamed over ``target``. When the block
    raises (``KeyboardInterrupt`` included) the temporary file is removed and nothing changes at
    ``target``; a kill that no handler sees leaves it to :func:`reap`.

    Example:
        >>> with replacing("cache/manifest.json", text=True) as f:  # doctest: +SKIP
        ...     json.dump(manifest, f)
    """
    target = os.fspath(target)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    lock = -1
    try:
        lock = hold(tmp)
        with (open(fd, "w", encoding="utf-8") if text else open(fd, "wb")) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    finally:
        release(lock)


# The stored held-out set of fastsoup before this naming rule: BASE.tmp-PID-HEX.bin / .json.
_LEGACY_STORE = re.compile(r"^(?P<base>[^.][^/]*)\.tmp-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?P<suffix>\.bin|\.json)$")


def reap_legacy_store(folder: str, base: str) -> list[str]:
    """Removes the temporary files of a stored held-out set (``BASE.tmp-PID-HEX.bin``/``.json``) that
    a fastsoup before this naming rule left in ``folder`` and whose process is gone. Only for a
    cache's ``data/`` folder, where nothing else lives. Returns the paths removed."""
    folder = os.fspath(folder) or "."
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _LEGACY_STORE.match(name)
        if m is None or m["base"] != base:
            continue
        path = os.path.join(folder, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        if not pid_alive(int(m["pid"])) and not _locked(path):
            remove(path)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


__all__ = ["hold", "lock", "parse", "pid_alive", "reap", "reap_legacy_store", "release", "remove", "replacing", "stale",
           "temp_path"]
