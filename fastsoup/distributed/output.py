"""Collective merges: the output of ``average``/``weighted_sum``/``Soup.save`` split across the ranks.

The engine's :class:`~fastsoup.engine.Collective` plug-in (installed by ``fastsoup/__init__.py``): under
a process group of two or more ranks, a merge into a folder balances the output shards across the
ranks (:func:`assign`); each rank writes its shards into one temporary folder that all share, and
rank 0 installs it once every rank is done. See :mod:`fastsoup.distributed`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import secrets
import time
from typing import Any

from .._errors import FastsoupError, OutputExistsError
from ..io import _tempfiles
from ..io.writer import AtomicOutput, SharedTemp, replaceable
from .comm import Comm, DistributedError, current

MARKER = ".fastsoup-job"  # written by rank 0 into the shared temporary folder; every rank must see it
VISIBLE_TRIES = 20  # a network filesystem may show another node's files a moment late
VISIBLE_WAIT = 0.25  # seconds between tries

_JOB: contextvars.ContextVar[Any] = contextvars.ContextVar("fastsoup_distributed_job", default=None)


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
    """The engine's writer for ``plan`` in a collective merge: ``(writer, names, dests)``, this rank's
    writer (its shards only) and the tensors of its shards; None outside one (the engine then makes
    its own :class:`~fastsoup.io.writer.AtomicOutput`). ``protect``: the input files (an overwrite
    never removes a folder holding one); ``extras``: files written with a folder output."""
    job = _JOB.get()
    if job is None or job.writer is not None:
        return None
    return job.start(plan, names, dests, weights, fsync, protect, extras)


class Collective:
    """The engine's :class:`~fastsoup.engine.Collective` plug-in: merges under a process group."""

    def job(self, out: Any, *, overwrite: bool, what: str):
        return merge_job(out, overwrite=overwrite, what=what)

    def output(self, plan, names, dests, weights, *, overwrite, fsync, protect=(), extras=None):
        return output(plan, names, dests, weights, overwrite=overwrite, fsync=fsync, protect=protect, extras=extras)

    def rank0(self, fn):
        comm = current()
        return fn() if comm is None else comm.on_rank0(fn)


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
        self.writer: AtomicOutput | None = None
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
        self.writer = AtomicOutput(plan, overwrite=self.overwrite, fsync=fsync, protect=protect, extras=extras,
                                   shared=SharedTemp(self.tmp, self.token), shards=sorted(mine))
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
            self._install()

        try:
            comm.on_rank0(install, share=False)
        except BaseException:
            self._cleanup()
            raise
        _tempfiles.release(self._lock)
        self._lock = -1

    def _install(self) -> None:
        """Rank 0, once every rank committed its part: checks that every shard is there, complete, then
        the writer writes the index, extras and manifest and renames the folder into place."""
        plan = self.writer.plan
        for i, shard in enumerate(plan.shards):
            p = self.tmp if plan.single else os.path.join(self.tmp, shard.filename)
            for _ in range(VISIBLE_TRIES):
                try:
                    if os.stat(p).st_size == shard.size:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(VISIBLE_WAIT)
            else:
                raise FastsoupError(
                    f"{p}: shard {i + 1} of {len(plan.shards)} is missing or incomplete as rank 0 sees it; "
                    f"the output {plan.path} must be on a filesystem that every rank shares"
                )
        if not plan.single:
            os.unlink(os.path.join(self.tmp, MARKER))
        self.writer.install()  # rank 0's writer adopts the shared folder: index, manifest, rename

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


__all__ = ["Collective", "assign", "merge_job", "output"]
