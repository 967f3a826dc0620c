"""Soup recipes: each is a small declared object (name, paper, parameters, one entry point) in
``RECIPES``, plus the plain function for the common case.

    uniform_soup(ingredients, **average_kwargs)      average() with equal weights
    weighted_soup(ingredients, weights, **kwargs)    average() with weights
    greedy_soup(ingredients, model, heldout, ...)    the paper's Recipe 1, a cached-logit search (recipes.greedy)
    greedy_ensemble(ingredients, model, heldout, ...) the paper's greedy ensemble baseline
    learned_soup(ingredients, model, heldout, ...)   learned coefficients (also layer-wise), O(P) memory
    model_stock(ingredients, base, ...)              Model Stock (the soups paper's follow-up), engine.methods

Recipes that evaluate models import torch when they are first used, not when this module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ArgumentError, ArgumentTypeError
from ..engine import average

PAPER = "Wortsman et al., Model soups, ICML 2022"


@dataclass(frozen=True)
class Recipe:
    """A soup recipe: its name, where it comes from, its parameters and its entry point."""

    name: str
    paper: str
    summary: str
    params: tuple[str, ...]
    target: str  # "module:function", imported on first use

    @property
    def run(self) -> Callable[..., Any]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


def uniform_soup(ingredients: Sequence[Any], **average_kwargs: Any):
    """The uniform soup: every ingredient weighted equally. Arguments, output and errors are those of
    :func:`fastsoup.average` (``out=None`` returns a state dict; a path writes safetensors there).

    Example:
        >>> fastsoup.uniform_soup(paths, out="uniform.safetensors")  # doctest: +SKIP
    """
    if "weights" in average_kwargs:
        raise ArgumentTypeError("uniform_soup takes no weights; use weighted_soup")
    return average(ingredients, **average_kwargs)


def weighted_soup(ingredients: Sequence[Any], weights: Sequence[float], **average_kwargs: Any):
    """``sum_k w_k theta_k / sum_k w_k``: :func:`fastsoup.average` with ``weights``."""
    return average(ingredients, weights, **average_kwargs)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("uniform", PAPER, "average every ingredient with equal weight", ("ingredients", "out", "dtype"),
               "fastsoup.recipes:uniform_soup"),
        Recipe("weighted", PAPER, "average with given weights", ("ingredients", "weights", "out", "dtype"),
               "fastsoup.recipes:weighted_soup"),
        Recipe("greedy", PAPER + ", Recipe 1",
               "rank by held-out score; add each ingredient if the held-out score does not drop",
               ("ingredients", "model", "heldout", "metric", "strict", "cache_dir", "device", "order"),
               "fastsoup.recipes.greedy:greedy_soup"),
        Recipe("learned", PAPER + ", appendix (learned_soup.py)",
               "mixing coefficients learned on held-out data by gradient descent, in O(P) memory",
               ("ingredients", "model", "heldout", "layerwise", "epochs", "steps", "lr", "init", "parametrization"),
               "fastsoup.recipes.learned:learned_soup"),
        Recipe("interpolate", "Wortsman et al., Robust fine-tuning of zero-shot models (WiSE-FT), CVPR 2022",
               "(1 - alpha) * theta_0 + alpha * theta_1, and a sweep over alpha", ("theta_0", "theta_1", "alpha"),
               "fastsoup.recipes.interpolate:interpolate"),
        Recipe("model_stock", "Jang et al., Model Stock: all we need is just a few fine-tuned models, ECCV 2024",
               "per tensor, t * mean of the fine-tunes + (1 - t) * the base, t from their task vectors' mean "
               "cosine (clamped to [0, 1])", ("ingredients", "base", "out", "dtype"),
               "fastsoup.engine.methods:model_stock"),
        Recipe("greedy_ensemble", PAPER + ", appendix baseline",
               "greedy soup's procedure over logit ensembles, from cached logits",
               ("ingredients", "model", "heldout", "metric", "strict", "cache_dir", "device"),
               "fastsoup.recipes.ensemble:greedy_ensemble"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ArgumentError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def __getattr__(name: str):
    # greedy_soup and greedy_ensemble import torch: resolve them on first use.
    lazy = {"greedy_soup": "greedy", "greedy_ensemble": "greedy_ensemble", "learned_soup": "learned"}
    if name in lazy:
        return RECIPES[lazy[name]].run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RECIPES", "Recipe", "get_recipe", "greedy_ensemble", "greedy_soup", "learned_soup", "uniform_soup", "weighted_soup"]
