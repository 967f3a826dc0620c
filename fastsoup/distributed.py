"""fastsoup on ``torch.distributed`` (launched by ``torchrun``): sharded merges and data-parallel
held-out evaluation for the soup searches.

Under an initialized process group of two or more ranks, these calls are *collective* (every rank
calls them, with the same arguments, as with ``torch.distributed.checkpoint``):

- ``average`` / ``weighted_sum`` / ``Soup.save`` / ``GreedyResult.save`` with ``out=`` a sharded
  folder: the output shards are balanced by bytes across the ranks; each rank reads only its shards'
  part of every input and writes its shards into one temporary folder beside ``out`` that all ranks
  share; after every rank is done, rank 0 writes the index and renames the folder into place. The
  files are byte-for-byte those of one process. A ``.safetensors`` (single-file) output is written
  by rank 0 alone (the others wait); ``out=None`` computes the whole state dict on every rank (no
  communication).
- ``greedy_soup`` / ``learned_soup`` (and ``fastsoup greedy|learned``): the held-out batches are split
  across ranks, the per-batch correct counts and the logits are exchanged so every rank takes the
  same decisions; only rank 0 reads and writes the cache directory (the other ranks get its answers
  by broadcast).

A rank that fails makes every rank raise (the failing rank its own exception, the others a
:class:`DistributedError` naming it), and a failed merge leaves nothing at ``out``. To call one of
these on a single rank (``if rank == 0: result.save(...)``), wrap it in :func:`local`.

Nothing here imports torch unless ``torch.distributed`` is already in use: ``import fastsoup`` and
single-process merges stay torch-free. All of fastsoup's collectives move CPU objects through a gloo
group (the default group when it has gloo; else one fastsoup creates once), so they work the same
under ``gloo`` and ``nccl``.

Environment: ``FASTSOUP_DIST_BACKEND`` (backend the CLI initializes under torchrun; default gloo),
``FASTSOUP_DIST_TIMEOUT`` (seconds a collective may wait for the other ranks in the groups fastsoup
creates; default 7200), ``FASTSOUP_DIST_JOIN_TIMEOUT`` (seconds a merge waits for every rank to join
it before naming the missing ones; default 600).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

from ._errors import FastsoupError, OutputExistsError
from .io import _tempfiles
from .io.writer import AtomicOutput, replaceable

BACKEND_ENV = "FASTSOUP_DIST_BACKEND"
TIMEOUT_ENV = "FASTSOUP_DIST_TIMEOUT"
JOIN_TIMEOUT_ENV = "FASTSOUP_DIST_JOIN_TIMEOUT"
DEFAULT_TIMEOUT = 7200.0
DEFAULT_JOIN_TIMEOUT = 600.0
MARKER = ".fastsoup-job"  # written by rank 0 into the shared temporary folder; every rank must see it
VISIBLE_TRIES = 20  # a network filesystem may show another node's files a moment late
VISIBLE_WAIT = 0.25  # seconds between tries
DISTRIBUTED_COMMANDS = ("average", "greedy", "learned")


class DistributedError(FastsoupError):
    """Another rank failed (``rank`` and ``error_type`` say which and how), or the ranks disagree."""

    def __init__(self, message: str, *, rank: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.error_type = error_type


_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("fastsoup_distributed_local", default=False)
_JOB: contextvars.ContextVar[Any] = contextvars.ContextVar("fastsoup_distributed_job", default=None)
_COMMS: list = []  # [(default group object, Comm)]: one control group per default group
_CLI_STARTED = False
_CLI_STDOUT: list = []  # stdout of a rank > 0 while the CLI runs (replaced by /dev/null)


# --------------------------------------------------------------------------------------------------
# Where are we?


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
        raise FastsoupError(f"{env}={os.environ[env]!r}: expected a number of seconds") from None
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


# --------------------------------------------------------------------------------------------------
# The command line under torchrun


def cli_begin(args) -> None:
    """``fastsoup average|greedy|learned`` launched by torchrun: joins the process group (backend
    ``FASTSOUP_DIST_BACKEND``, default gloo), puts ``--device cuda`` on this rank's GPU
    (``cuda:LOCAL_RANK``), splits the CPU threads between the ranks of a node, and shows progress
    bars on rank 0 only."""
    global _CLI_STARTED
    if not launched() or getattr(args, "command", None) not in DISTRIBUTED_COMMANDS:
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if getattr(args, "device", None) == "cuda":
        args.device = f"cuda:{local_rank}"
    if getattr(args, "threads", "absent") is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        args.threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if os.environ.get("RANK", "0") != "0":  # rank 0 prints the report and the progress; the others only errors
        if hasattr(args, "no_progress"):
            args.no_progress = True
        _CLI_STDOUT.append(sys.stdout)
        sys.stdout = open(os.devnull, "w")
    if not dist.is_available():
        raise FastsoupError("launched by torchrun, but this build of torch has no torch.distributed")
    if dist.is_initialized():
        return
    backend = os.environ.get(BACKEND_ENV, "gloo")
    if "nccl" in backend:
        import torch

        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=_timeout(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    _CLI_STARTED = True


def cli_end() -> None:
    """Leaves the process group :func:`cli_begin` joined."""
    global _CLI_STARTED
    while _CLI_STDOUT:
        sys.stdout.close()
        sys.stdout = _CLI_STDOUT.pop()
    if _CLI_STARTED:
        _CLI_STARTED = False
        import torch.distributed as dist

        if dist.is_initialized():
            # Every rank done with its last collective before any rank tears the group down: a rank
            # leaving while the other still has gloo work in flight was seen to abort a process
            # at exit ("terminate called without an active exception").
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
        _COMMS.clear()


# --------------------------------------------------------------------------------------------------
# Sharded merges


def assign(sizes: list[int], world: int) -> list[int]:
    """The rank of every shard: largest first, each to the rank with the fewest bytes so far (ties: the
    lower shard index, the lower rank), so every rank computes the same assignment."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


@contextlib.contextmanager
def merge_job(out: Any, *, overwrite: bool, what: str = "fastsoup.average"):
    """Makes the merge in the block collective when a process group is in use and ``out`` is a path
    (see the module's docstring); otherwise does nothing. The engine asks :func:`output` for its
    writer inside the block."""
    comm = current() if out is not None else None
    if comm is None or _JOB.get() is not None:
        yield
        return
    job = _MergeJob(comm, os.fspath(out), overwrite, what)
    job.setup()
    token = _JOB.set(job)
    try:
        yield
    except BaseException as e:
        _JOB.reset(token)
        job.finish(e)
        raise
    _JOB.reset(token)
    job.finish(None)


def output(plan, names: list, dests: list, weights=None, *, overwrite: bool, fsync: bool, protect=(), extras=None):
    """The engine's writer for ``plan``: ``(writer, names, dests)``. One process: an
    :class:`~fastsoup.io.writer.AtomicOutput` and every tensor. In a collective merge: this rank's
    writer (its shards only) and the tensors of its shards. ``protect``: the input files (an
    overwrite never removes a folder holding one); ``extras``: files written with a folder output."""
    job = _JOB.get()
    if job is None or job.writer is not None:
        return AtomicOutput(plan, overwrite=overwrite, fsync=fsync, protect=protect, extras=extras), names, dests
    return job.start(plan, names, dests, weights, fsync, protect, extras)


class _MergeJob:
    def __init__(self, comm: Comm, out: str, overwrite: bool, what: str):
        self.comm = comm
        self.out = out
        self.target = os.path.abspath(out)
        self.single = out.endswith(".safetensors")
        self.overwrite = overwrite
        self.what = what
        self.token = ""
        self.tmp = ""
        self._lock = -1  # rank 0: the flock that marks the shared temporary folder as in use
        self.writer: _RankOutput | None = None
        self.ready: bool | None = None  # None: not exchanged yet; else whether every rank was ready

    def setup(self) -> None:
        """Every rank joins; rank 0 checks the target and makes the shared temporary folder; its name
        (or rank 0's error) reaches every rank."""
        comm = self.comm
        comm.join(self.what)

        def make() -> list:
            if os.path.lexists(self.target):
                if not self.overwrite:
                    raise OutputExistsError(f"{self.out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
                replaceable(self.target, single=self.single)  # again with the inputs, at the install
            parent = os.path.dirname(self.target)
            os.makedirs(parent, exist_ok=True)
            _tempfiles.reap(parent)
            token = secrets.token_hex(4)
            tmp = _tempfiles.temp_path(self.target, token=token)
            if not self.single:
                os.mkdir(tmp)
                self._lock = _tempfiles.hold(tmp)
                with open(os.path.join(tmp, MARKER), "w") as f:
                    f.write(token + "\n")
            return [token, tmp]

        self.token, self.tmp = comm.on_rank0(make)

    def start(self, plan, names, dests, weights, fsync, protect=(), extras=None):
        """In the engine, once the plan is known: checks that every rank got as far with the same
        plan, then gives this rank its shards."""
        error = None
        digest = None
        mine: set = set()
        try:
            if self.overwrite and os.path.lexists(self.target):  # before any work: a folder holding an input
                replaceable(self.target, single=self.single, protect=protect)
            owners = assign([s.size for s in plan.shards], 1 if self.single else self.comm.world)
            mine = {i for i, r in enumerate(owners) if r == self.comm.rank}
            h = hashlib.blake2b(digest_size=16)
            for shard in plan.shards:
                h.update(shard.filename.encode() + b"\0" + shard.header)
            h.update(json.dumps([float(w) for w in weights] if weights is not None else None).encode())
            digest = h.hexdigest()
            if not self.single and self.comm.rank != 0:
                _wait_visible(os.path.join(self.tmp, MARKER), self.comm.rank, self.out)
        except BaseException as e:  # noqa: BLE001
            error = e
        self.ready = False
        digests = self.comm.check(error, digest)
        if len(set(digests)) > 1:
            raise DistributedError(
                f"{self.what}: the ranks planned different outputs (other inputs, weights, dtype or shard size): "
                "every rank must call it with the same arguments"
            )
        self.ready = True
        busy = 1 if self.single else min(len(plan.shards), self.comm.world)
        if self.comm.rank == 0 and busy < self.comm.world:
            import warnings

            why = ("a single .safetensors output is written by rank 0 alone: give a folder to split the work"
                   if self.single else f"the output has {len(plan.shards)} shard(s): pass a smaller shard_size "
                   "(CLI: --shard-size) to cut more")
            warnings.warn(f"{self.what}: only {busy} of {self.comm.world} ranks have output to write; {why}",
                          stacklevel=2)
        self.writer = _RankOutput(plan, self, sorted(mine), fsync, protect, extras)
        keep = [(n, d) for n, d in zip(names, dests) if d[0] in mine]
        return self.writer, [n for n, _ in keep], [d for _, d in keep]

    def finish(self, error: BaseException | None) -> None:
        """After the block: every rank's outcome is exchanged; if all succeeded rank 0 installs the
        output; else the temporary files are removed. Raises on the ranks that did not fail themselves
        when any rank failed (the caller re-raises ``error`` on the others)."""
        comm = self.comm
        if self.ready is None:  # failed (or finished) before the engine reached its writer
            if error is None:
                error = DistributedError(f"{self.what}: internal error: the merge did not reach the distributed writer")
            self.ready = False
            try:
                comm.check(error, None)
            except BaseException:
                pass
        if not self.ready:
            self._cleanup()
            if error is None:
                raise DistributedError(f"{self.what}: internal error: a rank was not ready")
            return
        try:
            comm.check(error)
        except BaseException:
            self._cleanup()
            if error is None:
                raise
            return

        def install() -> None:
            self.writer.install()

        try:
            comm.on_rank0(install, share=False)
        except BaseException:
            self._cleanup()
            raise
        _tempfiles.release(self._lock)
        self._lock = -1

    def _cleanup(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        if self.comm.rank == 0 and self.tmp:
            _tempfiles.remove(self.tmp)
        _tempfiles.release(self._lock)
        self._lock = -1


def _wait_visible(path: str, rank: int, out: str) -> None:
    for _ in range(VISIBLE_TRIES):
        if os.path.exists(path):
            return
        time.sleep(VISIBLE_WAIT)
    raise FastsoupError(
        f"rank {rank} cannot see {path}, which rank 0 created: the output {out} must be on a filesystem that "
        "every rank shares (e.g. NFS, Lustre, GPFS), with the same path on every node"
    )


class _RankOutput(AtomicOutput):
    """One rank's share of a collective output: its shards, written into the shared temporary
    folder (``fds[i]`` is -1 for the shards of other ranks). :meth:`commit` finishes this rank's
    part; rank 0's :meth:`install` then writes the index and renames the folder into place."""

    def __init__(self, plan, job: _MergeJob, mine: list[int], fsync: bool, protect=(), extras=None):
        super().__init__(plan, overwrite=job.overwrite, fsync=fsync, protect=protect, extras=extras)
        self._job = job
        self._mine = mine
        self._tmp = job.tmp
        self._token = job.token
        self._paths: list[str] = []
        self._shared = True

    def _shard_path(self, i: int) -> str:
        return self._tmp if self.plan.single else os.path.join(self._tmp, self.plan.shards[i].filename)

    def open(self) -> None:
        self.fds = [-1] * len(self.plan.shards)
        try:
            for i in self._mine:
                p = self._shard_path(i)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                self.fds[i] = fd
                self._paths.append(p)
                os.pwrite(fd, self.plan.shards[i].header, 0)
                os.ftruncate(fd, self.plan.shards[i].size)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> str:
        try:
            for fd in self.fds:
                if fd >= 0 and self.fsync:
                    os.fsync(fd)
            self._close_files()
        except BaseException:
            self.abort()
            raise
        return self.plan.path

    def abort(self) -> None:
        if not self._shared:
            super().abort()
            return
        self._close_files()
        for p in self._paths:
            _tempfiles.remove(p)
        self._paths = []

    def install(self) -> str:
        """Rank 0, once every rank committed: checks that every shard is there, complete, then
        the index and the rename of :class:`AtomicOutput`."""
        for i, shard in enumerate(self.plan.shards):
            p = self._shard_path(i)
            for _ in range(VISIBLE_TRIES):
                try:
                    if os.stat(p).st_size == shard.size:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(VISIBLE_WAIT)
            else:
                raise FastsoupError(
                    f"{p}: shard {i + 1} of {len(self.plan.shards)} is missing or incomplete as rank 0 sees it; "
                    f"the output {self.plan.path} must be on a filesystem that every rank shares"
                )
        if not self.plan.single:
            os.unlink(os.path.join(self._tmp, MARKER))
        self._paths = []
        self._shared = False  # from here on, a failure removes the whole temporary folder
        return AtomicOutput.commit(self)


# --------------------------------------------------------------------------------------------------
# Held-out data split across ranks


@dataclass
class Split:
    """How a :class:`~fastsoup.search.heldout.HeldOut` is split: this rank holds ``parts`` (global
    batch index, global row offset, rows) of the batches whose sizes are ``sizes``.

    ``mode``: "batches" (batch i on rank i % world: whole batches, as one process evaluates them) or
    "rows" (every batch cut into ``world`` row ranges: the learned soup's steps are over whole batches)."""

    comm: Comm
    mode: str
    parts: list
    sizes: list

    @property
    def rounds(self) -> int:
        """Steps in which every rank evaluates at most one part."""
        n = len(self.sizes)
        return -(-n // self.comm.world) if self.mode == "batches" else n


def take_part(comm: Comm, mode: str, index: int, offset: int, x: Any, y: Any):
    """This rank's part of held-out batch ``index`` (its first row is row ``offset`` of the set):
    ``(inputs, labels, (index, global offset, rows))``, or None."""
    n = int(y.shape[0])
    if mode == "batches":
        return (x, y, (index, offset, n)) if index % comm.world == comm.rank else None
    if mode != "rows":
        raise ValueError(f"split must be 'batches' or 'rows', got {mode!r}")
    lo, hi = n * comm.rank // comm.world, n * (comm.rank + 1) // comm.world
    return _rows(x, n, lo, hi), y[lo:hi], (index, offset + lo, hi - lo)


def _rows(x: Any, n: int, lo: int, hi: int):
    if hasattr(x, "shape") and len(getattr(x, "shape", ())) > 0 and x.shape[0] == n:
        return x[lo:hi]
    if isinstance(x, dict):
        return {k: _rows(v, n, lo, hi) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, n, lo, hi) for v in x)
    return x


def agree_split(comm: Comm, mode: str, parts: list, sizes: list, fingerprint: str, name: str) -> Split:
    """Checks that every rank read the same data set (fastsoup splits it: give every rank all of it),
    and returns this rank's :class:`Split`."""
    seen = comm.check(None, fingerprint)
    if len(set(seen)) > 1:
        raise DistributedError(
            f"{name}: the ranks read different data (fingerprints {sorted(set(seen))}): give every rank the whole "
            "held-out set, in the same order; fastsoup splits it across the ranks itself (no DistributedSampler)"
        )
    return Split(comm, mode, parts, sizes)


def evaluate(model, data, metric, *, need: int | None, progress: Any):
    """:func:`fastsoup.search.heldout.evaluate` over a split data set (collective): every rank runs its
    parts; with early rejection the per-batch correct counts are exchanged after every round and
    every rank stops at the batch where one process would have stopped; the logits of a complete
    evaluation are gathered in the set's order. Same result, on every rank, as one process."""
    import torch

    from .search.heldout import Evaluation, correct_count, model_logits, score_logits

    sp: Split = data.split
    comm = sp.comm
    accuracy = metric == "accuracy"
    sync = accuracy and need is not None
    total, nb = data.size, len(sp.sizes)
    outs: list = []
    error: BaseException | None = None
    rows_in = [0] * nb
    correct_in = [0] * nb
    next_b = cum_correct = cum_seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for r in range(sp.rounds):
                info = []
                if error is None and r < len(data.batches):
                    try:
                        x, y = data.batches[r]
                        b, off, rows = sp.parts[r]
                        logits = model_logits(model, x, y, data.name)
                        outs.append((off, logits.detach().float().cpu()))
                        info.append((b, rows, int((logits.argmax(dim=-1) == y).sum()) if accuracy else 0))
                        if progress is not None:
                            progress.update(1)
                    except Exception as e:  # noqa: BLE001 - reported to every rank below
                        error = e
                if not sync:
                    if error is not None:
                        break
                    continue
                for part in comm.check(error, info):
                    for b, rows, c in part:
                        rows_in[b] += rows
                        correct_in[b] += c
                while next_b < nb and rows_in[next_b] == sp.sizes[next_b]:
                    cum_correct += correct_in[next_b]
                    cum_seen += sp.sizes[next_b]
                    next_b += 1
                    if cum_seen < total and cum_correct + (total - cum_seen) < need:
                        return Evaluation(None, None, None, next_b, False)
    finally:
        model.train(was_training)
    gathered = comm.check(error, outs)
    pieces = sorted(((off, r, j), t) for r, part in enumerate(gathered) for j, (off, t) in enumerate(part))
    logits = torch.cat([t for _, t in pieces])
    return Evaluation(logits, score_logits(logits, data.labels, metric),
                      correct_count(logits, data.labels) if accuracy else None, nb, True)


# --------------------------------------------------------------------------------------------------
# The search cache on rank 0


def open_cache(factory, *args: Any):
    """``factory(*args)`` (a :class:`~fastsoup.search.cache.LogitCache`) in one process; under a
    process group a stand-in whose every call runs on rank 0 and whose answers every rank gets."""
    comm = current()
    if comm is None:
        return factory(*args)
    return _Rank0Cache(comm, comm.on_rank0(factory, *args, share=False))


class _Rank0Cache:
    """A LogitCache that only rank 0 touches (no file races, no reliance on every node seeing the
    same files); the other ranks get its answers by broadcast."""

    def __init__(self, comm: Comm, inner: Any):
        self.comm = comm
        self._inner = inner
        self.root = comm.broadcast(inner.root if comm.rank == 0 else None)
        self.journal = _Rank0Journal(self)

    def get(self, k: str):
        return self.comm.on_rank0(lambda: self._inner.get(k))

    def put(self, k: str, logits) -> None:
        self.comm.on_rank0(lambda: self._inner.put(k, logits), share=False)

    def check(self, what: str, fingerprint: str, *, describe: str) -> None:
        self.comm.on_rank0(lambda: self._inner.check(what, fingerprint, describe=describe), share=False)


class _Rank0Journal:
    def __init__(self, cache: _Rank0Cache):
        self._cache = cache

    @property
    def path(self) -> str:
        return os.path.join(self._cache.root, "journal.jsonl")

    def records(self) -> list:
        return self._cache.comm.on_rank0(lambda: list(self._cache._inner.journal.records()))

    def append(self, record: dict) -> None:
        self._cache.comm.on_rank0(lambda: self._cache._inner.journal.append(record), share=False)


__all__ = ["Comm", "DistributedError", "Split", "current", "is_main_process", "launched", "local", "rank0"]
