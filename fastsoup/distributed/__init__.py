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

The plug-in's modules: :mod:`~fastsoup.distributed.comm` (where are we, and the collectives),
:mod:`~fastsoup.distributed.output` (the sharded-output sink of collective merges, plugged into the
engine by ``fastsoup/__init__.py``), :mod:`~fastsoup.distributed.evaluation` (the data-parallel
evaluation strategy of a split held-out set), :mod:`~fastsoup.distributed.cache` (the rank-0 cache)
and :mod:`~fastsoup.distributed.launch` (the command line under torchrun).
"""

from .comm import (
    Comm,
    DistributedError,
    current,
    is_main_process,
    launched,
    local,
    rank0,
)

__all__ = ["Comm", "DistributedError", "current", "is_main_process", "launched", "local", "rank0"]
