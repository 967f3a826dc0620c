"""Checkpoint I/O: readers for every source, and the atomic sharded safetensors writer."""

from .checkpoint import Checkpoint, KeyedPath, TensorRef, check_compatible, open_checkpoint
from .writer import AtomicOutput, OutputPlan, TensorSpec, parse_size, plan_output, save

__all__ = [
    "AtomicOutput",
    "Checkpoint",
    "KeyedPath",
    "OutputPlan",
    "TensorRef",
    "TensorSpec",
    "check_compatible",
    "open_checkpoint",
    "parse_size",
    "plan_output",
    "save",
]
