"""Merge methods beyond the soup: their declarations (``spec``), per-tensor parameters as mergekit
users write them (``params``), the mergekit config reader (``config``), and the specs the native
kernels implement bit for bit: DARE's counter-based random numbers (``rng``) and the exact
bounded-memory top-k selection of TIES and breadcrumbs (``select``).

Nothing here imports torch; ``config`` imports PyYAML when it reads YAML.
"""

from .config import MergeConfig, MergeConfigError, ModelEntry, parse_config, read_config
from .spec import METHODS, MethodSpec, ParamSpec

__all__ = ["METHODS", "MergeConfig", "MergeConfigError", "MethodSpec", "ModelEntry", "ParamSpec",
           "parse_config", "read_config"]
