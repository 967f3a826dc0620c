"""The model-soups paper's analyses, each a few hundred soups evaluated on one prepared held-out set
(``fastsoup analyze ...`` on the command line):

    landscape(A, B, C, model, heldout, ...)       accuracy and loss on the plane through A, B, C (Fig. 2)
    interpolate(A, B, model, heldout, ...)        along (1 - alpha) A + alpha B (B zero-shot: WiSE-FT)
    pairs(checkpoints, model, heldout, base=...)  angle of task vectors against the 2-soup's gain (Fig. 3)
    ensemble_vs_soup(checkpoints, model, heldout) 2-soup against 2-ensemble for every pair (Fig. 4)
    count(checkpoints, model, heldout)            greedy and uniform soup against the number of ingredients
    overview(checkpoints, model, heldout, out_dir, base=...)  a small landscape and pairs, for the demo

Each returns an :class:`AnalysisResult` (``.rows``, ``.write_jsonl(path)``, ``.plot(png)``); given
``out=`` / ``png=`` it writes them too. To run several analyses on the same data, make one
:class:`Analyzer` (the held-out set is prepared once) and call its methods. The held-out data goes
through its pipeline once, each soup is written into the model in place by one fused pass over its
checkpoints, and ensembles come from the cached logits (see :mod:`fastsoup.analysis.core`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..diagnostics import similarity
from .core import ANALYSES, DEFAULT_SPAN, DEFAULT_STEPS, AnalysisResult, Analyzer
from .plots import available as plotting_available


def _finish(result: AnalysisResult, out: Any, png: Any, overwrite: bool) -> AnalysisResult:
    """Writes the JSONL (``out``), then the figure (``png``), when given."""
    if out is not None:
        result.write_jsonl(out, overwrite=overwrite)
    if png is not None:
        result.plot(png, overwrite=overwrite)
    return result


def landscape(a: Any, b: Any, c: Any, model: Any, heldout: Iterable | None, *, steps: int = DEFAULT_STEPS,
              span: tuple[float, float] = DEFAULT_SPAN, out: str | os.PathLike | None = None,
              png: str | os.PathLike | None = None, overwrite: bool = False, **options: Any) -> AnalysisResult:
    """Held-out accuracy and loss on the plane through checkpoints ``a``, ``b``, ``c`` (the paper's
    Fig. 2): the point ``(x, y)`` is ``a + x (b - a) + y (c - a)``, on a ``steps`` x ``steps`` grid over
    ``span`` (default -0.5 .. 1.5 in steps of 0.1: a, b, c are grid points). ``options``: those of
    :class:`Analyzer` (``evals``, ``cache_dir``, ``eval_device``, ``progress``, ``key``, ...). See
    :meth:`Analyzer.landscape`.

    Example:
        >>> r = fastsoup.analysis.landscape("zero-shot.safetensors", "ft-1/", "ft-2/", model, val_loader)  # doctest: +SKIP
        >>> r.write_jsonl("landscape.jsonl"); r.plot("landscape.png")  # doctest: +SKIP
    """
    an = Analyzer([a, b, c], model, heldout, **options)
    return _finish(an.landscape(0, 1, 2, steps=steps, span=span), out, png, overwrite)


def interpolate(a: Any, b: Any, model: Any, heldout: Iterable | None, *, alphas: Sequence[float] | None = None,
                steps: int = DEFAULT_STEPS, out: str | os.PathLike | None = None, png: str | os.PathLike | None = None,
                overwrite: bool = False, **options: Any) -> AnalysisResult:
    """Accuracy and loss along ``(1 - alpha) a + alpha b`` (default: ``steps`` alphas from 0 to 1); with
    ``b`` a zero-shot or base model, the WiSE-FT curve. See :meth:`Analyzer.interpolate`."""
    an = Analyzer([a, b], model, heldout, **options)
    return _finish(an.interpolate(0, 1, alphas=alphas, steps=steps), out, png, overwrite)


def pairs(checkpoints: Sequence[Any], model: Any, heldout: Iterable | None, *, base: Any,
          out: str | os.PathLike | None = None, png: str | os.PathLike | None = None, overwrite: bool = False,
          **options: Any) -> AnalysisResult:
    """For every pair of fine-tunes, the angle between their task vectors (from ``base``) against the
    gain of their 2-soup over the mean of the two, with the correlation coefficient (the paper's
    Fig. 3). See :meth:`Analyzer.pairs`."""
    an = Analyzer(checkpoints, model, heldout, base=base, **options)
    return _finish(an.pairs(), out, png, overwrite)


def ensemble_vs_soup(checkpoints: Sequence[Any], model: Any, heldout: Iterable | None, *,
                     out: str | os.PathLike | None = None, png: str | os.PathLike | None = None,
                     overwrite: bool = False, **options: Any) -> AnalysisResult:
    """The 2-soup against the 2-ensemble (mean of the logits) for every pair of fine-tunes (the
    paper's Fig. 4). See :meth:`Analyzer.ensemble_vs_soup`."""
    an = Analyzer(checkpoints, model, heldout, **options)
    return _finish(an.ensemble_vs_soup(), out, png, overwrite)


def count(checkpoints: Sequence[Any], model: Any, heldout: Iterable | None, *, strict: bool = False,
          out: str | os.PathLike | None = None, png: str | os.PathLike | None = None, overwrite: bool = False,
          **options: Any) -> AnalysisResult:
    """Greedy and uniform soup accuracy against the number of ingredients, in held-out order. See
    :meth:`Analyzer.count`."""
    an = Analyzer(checkpoints, model, heldout, **options)
    return _finish(an.count(strict=strict), out, png, overwrite)


def overview(checkpoints: Sequence[Any], model: Any, heldout: Iterable | None, out_dir: str | os.PathLike, *,
             base: Any = None, steps: int = 11, within: float | None = 0.05, overwrite: bool = False,
             **options: Any) -> dict[str, AnalysisResult]:
    """A small landscape and the pairs analysis on one prepared held-out set (what the demo runs).

    The good fine-tunes are those within ``within`` (default 0.05: 5 points of accuracy) of the best
    on held-out (None: all). The landscape is the paper's plane through ``base``, the best fine-tune
    and the good one whose task vector is most apart from the best's (the largest angle; without
    ``base``: the three best), on a ``steps`` x ``steps`` grid over -0.5 .. 1.5 (default 11: steps
    of 0.2); ``pairs`` runs over the good fine-tunes, needs ``base`` and is left out without it. Writes
    ``landscape.jsonl`` and ``pairs.jsonl`` into ``out_dir``, and ``landscape.png`` and ``pairs.png``
    when matplotlib is installed. Returns ``{"landscape": ..., "pairs": ...}``.
    """
    an = Analyzer(checkpoints, model, heldout, base=base, **options)
    scores = [an._accuracy_of(i) for i in range(an.k)]
    best = sorted(range(an.k), key=lambda i: -scores[i])
    # The good fine-tunes: within `within` of the best on held-out (a collapsed one would dominate the
    # pairs' correlation, as it does the uniform soup).
    good = [i for i in best if scores[i] >= scores[best[0]] - within] if within is not None else best
    if base is not None and len(good) >= 2:
        # The plane through the base, the best fine-tune and the good one most apart from it (the
        # largest angle between task vectors): two near-parallel fine-tunes would give a sliver.
        ckpts = an.search.ckpts
        angles = similarity([ckpts[i] for i in good], base=ckpts[an.base]).angles[0]
        far = max(range(1, len(good)), key=lambda j: angles[j])
        corners = ["base", good[0], good[far]]
    else:
        corners = (["base"] + best[:2]) if base is not None else best[:3]
    results = {"landscape": an.landscape(*corners, steps=steps)}
    if base is not None and len(good) >= 2:
        results["pairs"] = an.pairs(good)
    plot = plotting_available()
    for name, r in results.items():
        r.write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), overwrite=overwrite)
        if plot:
            r.plot(os.path.join(out_dir, f"{name}.png"), overwrite=overwrite)
    return results


__all__ = ["ANALYSES", "DEFAULT_SPAN", "DEFAULT_STEPS", "AnalysisResult", "Analyzer", "count", "ensemble_vs_soup",
           "interpolate", "landscape", "overview", "pairs", "plotting_available"]
