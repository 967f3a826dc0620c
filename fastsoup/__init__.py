"""fastsoup: fast, memory-bounded model soups.

Averages the weights of many fine-tuned checkpoints (Wortsman et al., ICML 2022) by streaming them
from memory-mapped files through fused native kernels. ``import fastsoup`` and merges of safetensors
files never import torch; torch is imported where tensors are.
"""

from . import engine as _engine
from ._errors import (
    ArgumentError,
    ArgumentTypeError,
    CacheMismatchError,
    CheckpointError,
    DataError,
    DistributedError,
    FastsoupError,
    InputChangedError,
    InterruptedAfterInstall,
    MatplotlibMissing,
    MergeConfigError,
    OutputExistsError,
    StateDictChoiceWarning,
    UnsafeOutputError,
)
from ._native import _core
from ._version import __version__
from .diagnostics import inspect_checkpoint, similarity
from .distributed import output as _distributed_output
from .engine import average, dare, merge, merge_config, model_stock, slerp, task_arithmetic, ties, weighted_sum
from .io import (
    Checkpoint,
    KeyedPath,
    TensorRef,
    check_compatible,
    open_checkpoint,
    save,
)
from .recipes import RECIPES, uniform_soup, weighted_soup
from .recipes.interpolate import interpolate, wise_ft_sweep
from .soup import Soup

_engine.use_collective(_distributed_output.Collective())  # torch.distributed as a plug-in: collective merges

_LAZY = {  # these import torch: resolved on first use
    "greedy_soup": "fastsoup.recipes.greedy",
    "greedy_ensemble": "fastsoup.recipes.ensemble",
    "GreedyResult": "fastsoup.recipes.greedy",
    "EnsembleResult": "fastsoup.recipes.ensemble",
    "learned_soup": "fastsoup.recipes.learned",
    "LearnedResult": "fastsoup.recipes.learned",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsoup' has no attribute {name!r}")


def native_info() -> dict:
    """What the native core is doing on this machine.

    Returns:
        ``{"version", "isa" (CPU instruction set in use), "supported_isas", "threads" (default CPU
        threads), "cuda_compiled" (this build has the CUDA engine), "cuda_available" (and a GPU is
        visible), "cuda_devices"}``.
    """
    return {
        "version": _core.__version__,
        "isa": _core.isa(),
        "supported_isas": list(_core.supported_isas()),
        "threads": _core.default_threads(),
        "cuda_compiled": bool(_core.cuda_compiled),
        "cuda_available": bool(_core.cuda_compiled) and _core.cuda_device_count() > 0,
        "cuda_devices": _core.cuda_device_count(),
    }


__all__ = [
    "RECIPES",
    "ArgumentError",
    "ArgumentTypeError",
    "CacheMismatchError",
    "Checkpoint",
    "CheckpointError",
    "DataError",
    "DistributedError",
    "EnsembleResult",
    "FastsoupError",
    "GreedyResult",
    "InputChangedError",
    "InterruptedAfterInstall",
    "KeyedPath",
    "LearnedResult",
    "MergeConfigError",
    "OutputExistsError",
    "Soup",
    "MatplotlibMissing",
    "StateDictChoiceWarning",
    "TensorRef",
    "UnsafeOutputError",
    "__version__",
    "average",
    "check_compatible",
    "dare",
    "greedy_ensemble",
    "greedy_soup",
    "inspect_checkpoint",
    "interpolate",
    "learned_soup",
    "merge",
    "merge_config",
    "model_stock",
    "native_info",
    "open_checkpoint",
    "save",
    "similarity",
    "slerp",
    "task_arithmetic",
    "ties",
    "uniform_soup",
    "weighted_soup",
    "weighted_sum",
    "wise_ft_sweep",
]
