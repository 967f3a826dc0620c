"""The ranks of a torch.distributed process group as fastsoup uses them: where are we (:func:`current`,
:func:`local`, :func:`launched`), and :class:`Comm`, fastsoup's own collectives (objects and small CPU
tensors through a gloo group). Imports nothing of fastsoup but its errors, and torch only when
``torch.distributed`` is already in use."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Any

from .._errors import ArgumentError, DistributedError

BACKEND_ENV = "FASTSOUP_DIST_BACKEND"
TIMEOUT_ENV = "FASTSOUP_DIST_TIMEOUT"
JOIN_TIMEOUT_ENV = "FASTSOUP_DIST_JOIN_TIMEOUT"
DEFAULT_TIMEOUT = 7200.0
DEFAULT_JOIN_TIMEOUT = 600.0


_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("fastsoup_distributed_local", default=False)
_COMMS: list = []  # [(default group object, Comm)]: one control group per default group


def launched() -> bool:
    """True when this process was started by ``torchrun`` with two or more ranks (from the
    environment alone: no torch import)."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@contextlib.contextmanager
def local():
    """Runs the block as one process, even under an initialized process group: e.g. ``with
    fastsoup.distributed.local(): result.save(out)`` on rank 0 alone."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def current() -> Comm | None:
    """The process group fastsoup works in, or None: one process, :func:`local`, or
    ``torch.distributed`` not initialized (never imports torch)."""
    if _LOCAL.get():
        return None
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() < 2:
        return None
    world = dist.group.WORLD
    for group, comm in _COMMS:
        if group is world:
            return comm
    comm = Comm(dist)
    _COMMS[:] = [(world, comm)]  # a destroyed default group takes its side group with it
    return comm


def is_main_process() -> bool:
    """True on rank 0 of an initialized process group (or of a torchrun launch), or in one process."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def rank0(fn, *args: Any, share: bool = True, **kwargs: Any):
    """``fn(*args, **kwargs)`` on rank 0 only (collective): its result (``share``) or its error reaches
    every rank. Without a process group: just the call."""
    comm = current()
    if comm is None:
        return fn(*args, **kwargs)
    return comm.on_rank0(fn, *args, share=share, **kwargs)


def _timeout(env: str, default: float):
    import datetime

    try:
        seconds = float(os.environ.get(env, default))
    except ValueError:
        raise ArgumentError(f"{env}={os.environ[env]!r}: expected a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def _status(exc: BaseException) -> tuple[str, str]:
    msg = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return type(exc).__name__, msg or type(exc).__name__


class Comm:
    """The ranks of the default process group, seen through a gloo group for fastsoup's own (CPU,
    small or object) collectives. Every method is collective: all ranks call it in the same order."""

    def __init__(self, dist):
        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        backend = str(dist.get_backend())
        if backend == "gloo":
            self.group = None  # the default group itself
            self.gloo = True
        elif "gloo" in backend:  # e.g. "cpu:gloo,cuda:nccl": CPU tensors go through its gloo part
            self.group = None
            self.gloo = False
        else:  # nccl (or another): a side group for CPU objects, created once by every rank
            self.group = dist.new_group(backend="gloo", timeout=_timeout(TIMEOUT_ENV, DEFAULT_TIMEOUT))
            self.gloo = True

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order."""
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        box = [obj if self.rank == src else None]
        self.dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def sum(self, *tensors):
        """The sums over ranks of CPU tensors (same shapes everywhere), added in rank order in float64
        so that every rank gets the same bits."""
        import torch

        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
        parts = [torch.empty_like(flat) for _ in range(self.world)]
        self.dist.all_gather(parts, flat, group=self.group)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        out, at = [], 0
        for t in tensors:
            out.append(total[at:at + t.numel()].view(t.shape))
            at += t.numel()
        return out

    def check(self, error: BaseException | None, extra: Any = None) -> list:
        """Exchanges every rank's outcome of a local step. If any rank failed, raises on every rank:
        ``error`` itself where it happened, a :class:`DistributedError` naming the first failed rank
        elsewhere. Returns every rank's ``extra``."""
        got = self.all_gather((None if error is None else _status(error), extra))
        raise_failed([s for s, _ in got], error)
        return [e for _, e in got]

    def on_rank0(self, fn, *args: Any, share: bool = True, **kwargs: Any):
        if self.rank == 0:
            error, value = None, None
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - every rank must hear of it
                error = e
            self.broadcast(("err", _status(error)) if error is not None else ("ok", value if share else None))
            if error is not None:
                raise error
            return value
        kind, payload = self.broadcast(None)
        if kind == "err":
            raise DistributedError(f"rank 0 failed: {payload[0]}: {payload[1]}", rank=0, error_type=payload[0])
        return payload

    def join(self, what: str) -> None:
        """Waits for every rank to reach this call; names the ranks that do not come (gloo only)."""
        if not self.gloo:
            return
        try:
            self.dist.monitored_barrier(group=self.group, timeout=_timeout(JOIN_TIMEOUT_ENV, DEFAULT_JOIN_TIMEOUT),
                                        wait_all_ranks=True)
        except RuntimeError as e:
            raise DistributedError(
                f"{what} is collective under torch.distributed (world size {self.world}): every rank must call it, "
                f"with the same arguments; to call it on one rank only, wrap the call in "
                f"`with fastsoup.distributed.local():` ({e})"
            ) from None


def raise_failed(statuses: list, error: BaseException | None) -> None:
    """Raises if any status (None = ok, else (type, message)) says a rank failed: ``error`` on a rank
    that failed itself, a :class:`DistributedError` elsewhere."""
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, (kind, msg) = failed[0]
    more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise DistributedError(f"rank {r} failed{more}: {kind}: {msg}", rank=r, error_type=kind)


def forget() -> None:
    """Drops the side groups made for destroyed process groups (the CLI calls it when it leaves)."""
    _COMMS.clear()

