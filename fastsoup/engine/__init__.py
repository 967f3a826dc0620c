"""The merge engine: plans a weighted combination of K checkpoints and drives the native executor.

Plan: validate the ingredients (:func:`~fastsoup.check_compatible`), lay the output out (memory, or
the shards of the writer), and turn every output tensor into a *segment*: its destination and the
K input addresses (file mappings or in-memory tensors). Consecutive tensors that sit back to back
in every input and in the output are fused into one segment, so checkpoints written alike (as
safetensors writes them) need one kernel stream per shard, not one per tensor. The native executor
then streams the segments in steps of bounded size: prefetch ahead, fused one-pass kernel, release
what was read, and a writer thread for file output.

Modules: :mod:`~fastsoup.engine.device` (where it computes), :mod:`~fastsoup.engine.plan` (the
native plan: :class:`Segments`), :mod:`~fastsoup.engine.driver` (one merge, :func:`run`, into an
:class:`OutputSink`; the :class:`Collective` plug-in), :mod:`~fastsoup.engine.linear` (``average``,
``weighted_sum``), :mod:`~fastsoup.engine.methods` (``merge``: task arithmetic, SLERP, Model Stock,
mergekit configs).
"""

from __future__ import annotations

from .device import CPU, Device, resolve_device
from .driver import (
           Collective,
           MergeSpec,
           OutputSink,
           collective,
           progress_summary,
           run,
           use_collective,
           verify_inputs,
)
from .linear import average, check_weights, normalization, weighted_sum
from .methods import dare, merge, merge_config, model_stock, slerp, task_arithmetic, ties
from .plan import Segments, source

__all__ = ["CPU", "Collective", "Device", "MergeSpec", "OutputSink", "Segments", "average", "check_weights", "collective",
           "merge", "merge_config", "model_stock", "normalization", "progress_summary", "resolve_device", "run",
           "slerp", "source", "task_arithmetic", "ties", "dare", "use_collective", "verify_inputs", "weighted_sum"]
