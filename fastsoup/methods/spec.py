"""The merge methods beyond the soup, declared: name, paper, parameters (global or per model, with
mergekit's defaults), and what inputs they take. The config reader checks a config against these;
the engine (a later step) runs them. ``fastsoup._reference`` holds each method's plain-torch oracle.

Defaults are mergekit's (``mergekit/merge_methods/registry.py``, ``generalized_task_arithmetic.py``,
HEAD a6e4028), so that a mergekit config means the same here: ``normalize`` is on for ``ties`` and
``linear`` only, ``rescale`` on for the DARE methods only, ``density`` 1 and ``gamma`` 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["METHODS", "REQUIRED", "MethodSpec", "ParamSpec"]


class _Required:
    """The default of a parameter a config must give."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``kind``: "number" (any finite number), "fraction" (in [0, 1]) or "bool".
    ``scope``: "model" (per model: in a model's ``parameters`` or, for every model, in the global
    ones) or "global" (the global ``parameters`` only)."""
    name: str
    kind: str
    scope: str
    default: Any
    doc: str


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: ``base`` is "required" or "none"; ``models`` counts the inputs other than the
    base (``max_models`` None: no limit). For slerp the base is one of its two models."""
    name: str
    title: str
    paper: str
    params: tuple[ParamSpec, ...]
    base: str
    min_models: int
    max_models: int | None = None

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


_WEIGHT = ParamSpec("weight", "number", "model", REQUIRED, "the model's weight w_k (may be negative)")
_DENSITY = ParamSpec("density", "fraction", "model", 1.0, "fraction of each task vector's entries kept")
_GAMMA = ParamSpec("gamma", "fraction", "model", 0.01, "fraction of the largest entries dropped (breadcrumbs)")
_LAMBDA = ParamSpec("lambda", "number", "global", 1.0, "scale of the merged task vector")
_INT8 = ParamSpec("int8_mask", "bool", "global", False,
                  "mergekit's mask storage type; no effect on the result (fastsoup computes in float64)")


def _normalize(default: bool) -> ParamSpec:
    """mergekit's ``normalize`` with the method's default."""
    return ParamSpec("normalize", "bool", "global", default,
                     "divide by the sum of the weights (TIES methods: of the agreeing models' weights)")


def _rescale(default: bool) -> ParamSpec:
    """mergekit's ``rescale`` with the method's default."""
    return ParamSpec("rescale", "bool", "global", default,
                     "rescale the sparsified task vector to its L1 norm before sparsification (mergekit's rescale)")


def _gta(name: str, title: str, paper: str, extra: tuple, normalize: bool, rescale: bool | None) -> MethodSpec:
    """A task-vector method (mergekit's generalized task arithmetic): weight, its extra per-model
    parameters, lambda, normalize, int8_mask and (unless None) rescale."""
    params = (_WEIGHT, *extra, _LAMBDA, _normalize(normalize), _INT8)
    if rescale is not None:
        params += (_rescale(rescale),)
    return MethodSpec(name, title, paper, params, "required", 1)


METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("linear", "Linear (weighted average)", "Wortsman et al. 2022, Model soups, arXiv:2203.05482",
               (_WEIGHT, _normalize(True)), "none", 1),
    _gta("task_arithmetic", "Task arithmetic", "Ilharco et al. 2023, Editing models with task arithmetic, "
         "arXiv:2212.04089", (), False, None),
    _gta("ties", "TIES", "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708", (_DENSITY,), True, False),
    _gta("dare_linear", "DARE (linear)", "Yu et al. 2024, Language models are Super Mario, arXiv:2311.03099",
         (_DENSITY,), False, True),
    _gta("dare_ties", "DARE with TIES", "Yu et al. 2024, Language models are Super Mario, arXiv:2311.03099",
         (_DENSITY,), False, True),
    _gta("breadcrumbs", "Model breadcrumbs", "Davari and Belilovsky 2024, Model breadcrumbs, arXiv:2312.06795",
         (_DENSITY, _GAMMA), False, False),
    _gta("breadcrumbs_ties", "Model breadcrumbs with TIES", "Davari and Belilovsky 2024, arXiv:2312.06795",
         (_DENSITY, _GAMMA), False, False),
    MethodSpec("slerp", "SLERP", "Shoemake 1985, Animating rotation with quaternion curves",
               (ParamSpec("t", "number", "global", REQUIRED, "interpolation position: 0 the base, 1 the other"),),
               "required", 1, 1),
    MethodSpec("model_stock", "Model Stock", "Jang et al. 2024, Model Stock, ECCV, arXiv:2403.19522",
               (ParamSpec("filter_wise", "bool", "global", False,
                          "mergekit's per-row variant; only false (per tensor) is supported"),),
               "required", 2),
]}
