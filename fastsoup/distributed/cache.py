"""The search cache under a process group: only rank 0 touches the files (no races, no reliance on every
node seeing the same files); the other ranks get its answers by broadcast."""

from __future__ import annotations

import os
from typing import Any

from ..search.cache import Cache, Journal
from .comm import Comm, current


def open_cache(factory, *args: Any) -> Cache:
    """``factory(*args)`` (a :class:`~fastsoup.search.cache.LogitCache`) in one process; under a
    process group a :class:`Rank0Cache` of the one rank 0 opens."""
    comm = current()
    if comm is None:
        return factory(*args)
    return Rank0Cache(comm, comm.on_rank0(factory, *args, share=False))


class Rank0Cache(Cache):
    """A :class:`~fastsoup.search.cache.Cache` that only rank 0 touches; every call is collective and
    every rank gets rank 0's answer."""

    def __init__(self, comm: Comm, inner: Cache | None):
        self.comm = comm
        self._inner = inner  # rank 0's cache (None on the other ranks)
        self.root = comm.broadcast(inner.root if comm.rank == 0 else None)
        self.journal = Rank0Journal(comm, inner.journal if comm.rank == 0 else None,
                                    os.path.join(self.root, "journal.jsonl"))

    def get(self, k: str):
        return self.comm.on_rank0(lambda: self._inner.get(k))

    def put(self, k: str, logits) -> None:
        self.comm.on_rank0(lambda: self._inner.put(k, logits), share=False)

    def check(self, what: str, fingerprint: str, *, describe: str) -> None:
        self.comm.on_rank0(lambda: self._inner.check(what, fingerprint, describe=describe), share=False)

    def data_prefix(self, name: str) -> str:
        return os.path.join(self.root, "data", name)  # as LogitCache names it (the searches store no data here)


class Rank0Journal:
    """Rank 0's :class:`~fastsoup.search.cache.Journal`, every call collective."""

    def __init__(self, comm: Comm, inner: Journal | None, path: str):
        self.comm = comm
        self._inner = inner
        self.path = path

    def records(self) -> list:
        return self.comm.on_rank0(lambda: list(self._inner.records()))

    def append(self, record: dict) -> None:
        self.comm.on_rank0(lambda: self._inner.append(record), share=False)


__all__ = ["Rank0Cache", "Rank0Journal", "open_cache"]
