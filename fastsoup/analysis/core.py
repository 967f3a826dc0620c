"""The analyses of the model-soups paper over one prepared :class:`~fastsoup.search.Search`.

Every analysis evaluates many soups of the same checkpoints on the same held-out set. Here the set
goes through its data pipeline once (:func:`~fastsoup.search.prepare`), each point's soup is written
into the model's parameters in place, and logits are cached (in memory, and on disk with
``cache_dir``), so a point costs one model pass over the prepared tensors plus the mixing:

- weighted points (``landscape``, ``interpolate``): :meth:`~fastsoup.search.Search.mixed_logits`,
  one fused pass over the K checkpoints (float64 sum, rounded once: bit for bit
  :func:`~fastsoup.weighted_sum` of the same weights);
- uniform soups (``pairs``, ``ensemble_vs_soup``, ``count``): :meth:`~fastsoup.search.Search.soup_logits`,
  the float32 running sum the greedy search forms, with the same cache entries;
- ensembles: the mean of the members' cached logits (:func:`~fastsoup.recipes.ensemble.ensemble_logits`),
  no evaluation;
- the greedy soups of ``count``: one run of the greedy recipe (:func:`~fastsoup.recipes.greedy.run_greedy`),
  whose prefixes are the greedy soups of the first n ingredients.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import ArgumentError, ArgumentTypeError, OutputExistsError, UnsafeOutputError
from ..diagnostics import similarity
from ..io import _tempfiles
from ..io.checkpoint import with_key
from ..recipes.ensemble import ensemble_logits
from ..recipes.greedy import run_greedy
from ..recipes.interpolate import sweep_logits
from ..search.evaluation import progress_bar, score_logits
from ..search.search import Search

ANALYSES = ("landscape", "interpolate", "pairs", "ensemble_vs_soup", "count")
DEFAULT_STEPS = 21  # grid points per axis of a landscape, and alphas of an interpolation
DEFAULT_SPAN = (-0.5, 1.5)  # the landscape's coordinate range on both axes (A at 0, B and C at 1)


@dataclass
class AnalysisResult:
    """The outcome of one analysis.

    Attributes:
        analysis: ``"landscape"``, ``"interpolate"``, ``"pairs"``, ``"ensemble_vs_soup"`` or ``"count"``.
        rows: one dict per point (JSON-serializable, non-finite numbers as None (a diverged model's
            loss or angle); self-describing: each has ``"analysis"`` and
            ``"kind"``, its coordinates, ``"accuracy"`` and ``"loss"`` on the held-out set, the names of
            the checkpoints it mixes, and ``"evals"`` (``{set: {"accuracy", "loss"}}``) when eval sets
            were given); an analysis with a summary (a correlation) ends with a ``"kind": "summary"`` row.
        names: the checkpoints the analysis involves.
        info: what the plot needs beyond the rows (the landscape's checkpoints in the plane, ...).
        stats: ``points``, ``evaluated`` (points whose soup was formed and evaluated, not cached),
            ``evaluations`` (model passes over a whole data set), ``cached``, ``seconds`` (the analysis's
            loop), ``seconds_per_soup`` (``seconds / evaluated``; None when nothing was evaluated),
            ``form_seconds``, ``eval_seconds``.
    """

    analysis: str
    rows: list[dict]
    names: list[str]
    info: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = [_json_safe(r) for r in self.rows]

    @property
    def points(self) -> list[dict]:
        """The rows but the summary."""
        return [r for r in self.rows if r.get("kind") != "summary"]

    @property
    def summary(self) -> dict | None:
        """The summary row (``pairs``: the correlation of angle and gain; ``ensemble_vs_soup``: of the
        gains), else None."""
        return next((r for r in self.rows if r.get("kind") == "summary"), None)

    def write_jsonl(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Writes the rows, one JSON object per line, whole or not at all. An existing ``path`` is
        replaced only with ``overwrite`` (else :class:`~fastsoup.OutputExistsError`); never a folder."""
        import json

        path = os.fspath(path)
        check_output(path, overwrite)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        _tempfiles.reap(folder, os.path.basename(path))  # a killed run's temporary file
        with _tempfiles.replacing(path, text=True) as f:
            for r in self.rows:
                f.write(json.dumps(r, allow_nan=False) + "\n")
        return path

    def plot(self, png: str | os.PathLike, *, overwrite: bool = True) -> str:
        """Writes the analysis's figure as a PNG (needs matplotlib: a
        :class:`~fastsoup.MatplotlibMissing`, a ``FastsoupError``, naming the pip command when it is
        missing). Returns the path."""
        from .plots import plot

        png = os.fspath(png)
        check_output(png, overwrite)
        return plot(self, png)


def check_output(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise UnsafeOutputError(f"{path} is a folder: give a file name for the output")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists: pass overwrite=True (CLI: --overwrite) to replace it")


class Analyzer:
    """Checkpoints opened once, a held-out set (and eval sets) prepared once, and the analyses on them.

    Args:
        checkpoints: the fine-tunes (paths, state dicts, modules), fine-tuned from one init; analyses
            name them by index, by the path given, or by its file name.
        model: an ``nn.Module`` whose state dict matches them; its parameters are overwritten.
        heldout: ``(inputs, labels)`` batches (iterated once), or None with ``cache_dir`` to take the set
            an earlier search stored there.
        base: the pretrained init (or zero-shot model) the fine-tunes start from: the origin of the task
            vectors of :meth:`pairs`, and a checkpoint like the others (``"base"``) for
            :meth:`landscape` and :meth:`interpolate` (the WiSE-FT curve).
        evals: other data sets, ``{name: batches}``, scored at every point too.
        cache_dir: the logit cache (shared with :func:`~fastsoup.greedy_soup`'s): a rerun evaluates nothing.
        eval_device, merge_device, verify, key, key_map, strip_prefix: as :func:`~fastsoup.greedy_soup`.
        progress: progress bars (default: on a terminal).
    """

    def __init__(self, checkpoints: Sequence[Any], model: torch.nn.Module, heldout: Iterable | None, *,
                 base: Any = None, evals: dict[str, Iterable] | None = None, cache_dir: str | os.PathLike | None = None,
                 eval_device: Any = None, merge_device: Any = None, progress: bool | None = None,
                 verify: str = "sample", key: str | None = None, key_map: Any = None, strip_prefix: str | None = None):
        if isinstance(checkpoints, (str, os.PathLike)):
            raise ArgumentTypeError("checkpoints must be a list of checkpoints, not one path")
        srcs = list(checkpoints)
        if not srcs:
            raise ArgumentError("no checkpoints: give at least one")
        self.k = len(srcs)  # the fine-tunes are 0 .. k-1; the base, when given, is k
        self.search = Search(with_key(srcs + ([base] if base is not None else []), key), model, heldout,
                             cache_dir=cache_dir, eval_device=eval_device, merge_device=merge_device, progress=progress,
                             evals=evals, verify=verify, key_map=key_map, strip_prefix=strip_prefix)
        self.base = self.k if base is not None else None
        self.names = list(self.search.names)
        if self.base is not None and not isinstance(base, (str, os.PathLike)):
            self.names[self.base] = "<base>"
        self.sets = list(self.search.data)
        self.progress = progress

    # --- the analyses -------------------------------------------------------------------------------

    def landscape(self, a: Any = 0, b: Any = 1, c: Any = 2, *, steps: int = DEFAULT_STEPS,
                  span: tuple[float, float] = DEFAULT_SPAN) -> AnalysisResult:
        """Held-out accuracy and loss on the plane through three checkpoints (the paper's Fig. 2).

        The point ``(x, y)`` is ``A + x (B - A) + y (C - A)``, the soup with weights
        ``(1 - x - y, x, y)``, on a ``steps`` x ``steps`` grid over ``span`` on both axes: A is
        ``(0, 0)``, B ``(1, 0)``, C ``(0, 1)``, grid points whenever ``span`` and ``steps`` put
        0 and 1 on the grid (the default, -0.5 .. 1.5 in 21 steps of 0.1, does; ``span=(0, 1)``
        makes them three of the grid's corners). Each row also has ``(u, v)``, the point's
        coordinates in an orthonormal basis of the plane (u along B - A; distances in parameter
        space), which the figure uses. With ``base``, the paper's plane is ``landscape("base", i, j)``.
        """
        ia, ib, ic = (self._index(r) for r in (a, b, c))
        if len({ia, ib, ic}) < 3:
            raise ArgumentError("landscape: give three different checkpoints A, B, C")
        xs = _grid(steps, span)
        s = self.search
        g = similarity([s.ckpts[ib], s.ckpts[ic]], base=s.ckpts[ia]).gram  # <B-A, C-A> and the norms
        nb = math.sqrt(max(g[0][0], 0.0))
        if nb == 0.0:
            raise ArgumentError(f"landscape: {self.names[ia]} and {self.names[ib]} are the same point (B - A is zero): "
                                "give three different checkpoints")
        proj = g[0][1] / nb
        height = math.sqrt(max(g[1][1] - proj * proj, 0.0))
        if height <= 1e-12 * max(nb, math.sqrt(max(g[1][1], 0.0))):
            raise ArgumentError("landscape: the three checkpoints lie on one line (C - A is parallel to B - A): no "
                                "plane through them; use interpolate for the line")
        names = [self.names[i] for i in (ia, ib, ic)]
        rows = []
        with self._loop("landscape", len(xs) ** 2) as loop:
            for y in xs:
                for x in xs:
                    weights = [_clean(1.0 - x - y), x, y]
                    logits = loop.mixed([ia, ib, ic], weights)
                    rows.append({"analysis": "landscape", "kind": "point", "x": x, "y": y,
                                 "u": x * nb + y * proj, "v": y * height, "weights": weights, "names": names,
                                 **self._scores(logits)})
        marks = [{"name": n, "label": label, "x": x, "y": y, "u": x * nb + y * proj, "v": y * height}
                 for n, label, (x, y) in zip(names, "ABC", ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)))]
        info = {"steps": len(xs), "span": [xs[0], xs[-1]], "checkpoints": marks,
                "basis": {"norm_b_minus_a": nb, "c_along_b": proj, "c_across_b": height}}
        return AnalysisResult("landscape", rows, names, info, loop.stats)

    def interpolate(self, a: Any = 0, b: Any = 1, *, alphas: Sequence[float] | None = None,
                    steps: int = DEFAULT_STEPS) -> AnalysisResult:
        """Accuracy and loss along ``(1 - alpha) A + alpha B`` (``alphas``, default ``steps`` points
        from 0 to 1; values outside [0, 1] extrapolate). With B the zero-shot or base model
        (``interpolate(i, "base")``) this is the WiSE-FT curve. The points are those of
        :func:`~fastsoup.wise_ft_sweep` (:func:`~fastsoup.recipes.interpolate.sweep_logits`)."""
        ia, ib = self._index(a), self._index(b)
        if ia == ib:
            raise ArgumentError("interpolate: give two different checkpoints A and B")
        alphas = _grid(steps, (0.0, 1.0)) if alphas is None else [_clean(float(v)) for v in alphas]
        if not alphas:
            raise ArgumentError("interpolate: alphas is empty")
        names = [self.names[ia], self.names[ib]]
        rows = []
        with self._loop("interpolate", len(alphas)) as loop:
            points = sweep_logits(self.search, ia, ib, alphas, self.sets)
            for alpha in alphas:
                logits = loop.count_of(lambda: next(points))
                rows.append({"analysis": "interpolate", "kind": "point", "alpha": alpha,
                             "weights": [_clean(1.0 - alpha), alpha], "names": names, **self._scores(logits)})
        return AnalysisResult("interpolate", rows, names, {}, loop.stats)

    def pairs(self, members: Sequence[Any] | None = None) -> AnalysisResult:
        """For every pair of fine-tunes: the angle between their task vectors ``theta - base``
        (:func:`~fastsoup.similarity`) and the accuracy gain of their 2-soup over the mean of the two
        models' accuracies (the paper's Fig. 3); the summary row has the Pearson correlation
        coefficient of angle and gain. Needs ``base``."""
        if self.base is None:
            raise ArgumentError("pairs: the angles are between task vectors (theta - base): give base= (CLI: --base), "
                                "the pretrained init the fine-tunes start from")
        idx = self._members(members)
        s = self.search
        sim = similarity([s.ckpts[i] for i in idx], base=s.ckpts[self.base])
        angles, cosine = sim.angles, sim.cosine
        rows = []
        with self._loop("pairs", len(idx) * (len(idx) - 1) // 2) as loop:
            for p, q, i, j in _pairs(idx):
                soup = loop.soup([i, j])
                one, two = self._accuracy_of(i), self._accuracy_of(j)
                scores = self._scores(soup)
                rows.append({"analysis": "pairs", "kind": "pair", "indices": [i, j],
                             "names": [self.names[i], self.names[j]], "base": self.names[self.base],
                             "angle": angles[p][q], "cosine": cosine[p][q], **scores,
                             "individual_accuracy": [one, two], "mean_individual_accuracy": (one + two) / 2,
                             "gain": scores["accuracy"] - (one + two) / 2})
        r = _pearson([x["angle"] for x in rows], [x["gain"] for x in rows])
        rows.append({"analysis": "pairs", "kind": "summary", "pairs": len(rows), "x": "angle", "y": "gain",
                     "pearson_r": r})
        return AnalysisResult("pairs", rows, [self.names[i] for i in idx], {"pearson_r": r}, loop.stats)

    def ensemble_vs_soup(self, members: Sequence[Any] | None = None) -> AnalysisResult:
        """For every pair of fine-tunes: their 2-soup against their 2-ensemble (the mean of their
        logits, from the cached ones: no evaluation), both as accuracies and as gains over the mean
        of the two models (the paper's Fig. 4); the summary row has the Pearson correlation of the
        two gains and how often the soup is at least as accurate as the ensemble."""
        idx = self._members(members)
        if len(idx) < 2:
            raise ArgumentError("ensemble_vs_soup: give at least two fine-tunes")
        rows = []
        with self._loop("ensemble vs soup", len(idx) * (len(idx) - 1) // 2) as loop:
            for _, _, i, j in _pairs(idx):
                soup = self._scores(loop.soup([i, j]))
                ens = self._scores({d: ensemble_logits([self.search.individual_logits(d)[k] for k in (i, j)])
                                    for d in self.sets})
                one, two = self._accuracy_of(i), self._accuracy_of(j)
                mean = (one + two) / 2
                rows.append({"analysis": "ensemble_vs_soup", "kind": "pair", "indices": [i, j],
                             "names": [self.names[i], self.names[j]],
                             "soup_accuracy": soup["accuracy"], "soup_loss": soup["loss"],
                             "ensemble_accuracy": ens["accuracy"], "ensemble_loss": ens["loss"],
                             "individual_accuracy": [one, two], "mean_individual_accuracy": mean,
                             "soup_gain": soup["accuracy"] - mean, "ensemble_gain": ens["accuracy"] - mean,
                             **({"evals": {d: {"soup": soup["evals"][d], "ensemble": ens["evals"][d]}
                                           for d in soup["evals"]}} if "evals" in soup else {})})
        r = _pearson([x["ensemble_gain"] for x in rows], [x["soup_gain"] for x in rows])
        wins = sum(x["soup_accuracy"] >= x["ensemble_accuracy"] for x in rows)
        rows.append({"analysis": "ensemble_vs_soup", "kind": "summary", "pairs": len(rows), "x": "ensemble_gain",
                     "y": "soup_gain", "pearson_r": r, "soup_at_least_ensemble": wins})
        return AnalysisResult("ensemble_vs_soup", rows, [self.names[i] for i in idx], {"pearson_r": r}, loop.stats)

    def count(self, members: Sequence[Any] | None = None, *, strict: bool = False) -> AnalysisResult:
        """Greedy and uniform soup accuracy against the number of ingredients n, the fine-tunes taken
        in held-out order (best first; ties: the order given): the uniform soup of the first n, and
        the greedy soup of the first n (one run of the greedy recipe, ``strict`` as in
        :func:`~fastsoup.greedy_soup`: its state after n candidates). Rows of kind ``"uniform"`` and
        ``"greedy"`` for each n, with their members."""
        idx = self._members(members)
        s = self.search
        scores = {i: self._accuracy_of(i) for i in idx}
        ranking = sorted(idx, key=lambda i: -scores[i])  # stable: ties keep the order given
        before = s.stats.evaluations
        g = run_greedy(s, strict=strict, order=ranking)
        greedy_evaluations = s.stats.evaluations - before
        rows, kept = [], []
        with self._loop("count", len(ranking)) as loop:
            for n, step in enumerate(g.history, 1):
                if step["accepted"]:
                    kept.append(step["index"])
                added = ranking[n - 1]
                for kind, members_n in (("uniform", ranking[:n]), ("greedy", list(kept))):
                    rows.append({"analysis": "count", "kind": kind, "n": n, "members": members_n,
                                 "names": [self.names[i] for i in members_n], "added": self.names[added],
                                 "added_accuracy": scores[added], **self._scores(loop.soup(members_n))})
        stats = loop.stats
        stats["greedy_evaluations"] = greedy_evaluations  # the greedy run's, before the loop (not in its seconds)
        return AnalysisResult("count", rows, [self.names[i] for i in ranking],
                              {"order": ranking, "strict": bool(strict)}, stats)

    # --- helpers ------------------------------------------------------------------------------------

    def _index(self, ref: Any) -> int:
        """A checkpoint by index, ``"base"``, the path given or its file name."""
        n = len(self.search.ckpts)
        if isinstance(ref, bool):
            raise ArgumentTypeError(f"a checkpoint is an index, a name or 'base', got {ref!r}")
        if isinstance(ref, int):
            if not 0 <= ref < n:
                raise ArgumentError(f"checkpoint index {ref} is out of range: there are {n} (0 .. {n - 1})")
            return ref
        if isinstance(ref, (str, os.PathLike)):
            name = os.fspath(ref)
            if name == "base":
                if self.base is None:
                    raise ArgumentError("'base' names the base checkpoint: give base=")
                return self.base
            found = [i for i, x in enumerate(self.names) if x == name]
            if not found:
                found = [i for i, x in enumerate(self.names) if os.path.basename(x.rstrip("/")) == name]
            if len(found) == 1:
                return found[0]
            if found:
                raise ArgumentError(f"{name!r} names several checkpoints ({found}): give an index")
            raise ArgumentError(f"no checkpoint {name!r}: give an index (0 .. {n - 1}), 'base', or one of "
                                f"{', '.join(self.names)}")
        raise ArgumentTypeError(f"a checkpoint is an index, a name or 'base', got {type(ref).__name__}")

    def _members(self, members: Sequence[Any] | None) -> list[int]:
        if members is None:
            return list(range(self.k))
        idx = [self._index(m) for m in members]
        if len(set(idx)) != len(idx):
            raise ArgumentError(f"members lists a checkpoint twice: {idx}")
        if self.base is not None and self.base in idx:
            raise ArgumentError("members: the base is not a fine-tune")
        return idx

    def _accuracy_of(self, i: int) -> float:
        return score_logits(self.search.individual_logits()[i], self.search.heldout.labels)

    def _scores(self, logits: dict) -> dict:
        """``accuracy`` and ``loss`` on the held-out set, and ``evals`` for the other sets."""
        out = {d: {"accuracy": score_logits(logits[d], self.search.data[d].labels),
                   "loss": _loss(logits[d], self.search.data[d].labels)} for d in self.sets}
        row = dict(out["heldout"])
        if len(self.sets) > 1:
            row["evals"] = {d: v for d, v in out.items() if d != "heldout"}
        return row

    def _loop(self, what: str, total: int) -> _Loop:
        return _Loop(self, what, total)


class _Loop:
    """One analysis's loop over its soups: a progress bar, and the time and evaluations it took."""

    def __init__(self, an: Analyzer, what: str, total: int):
        self.an, self.what, self.total = an, what, total

    def __enter__(self) -> _Loop:
        s = self.an.search
        s.individual_logits()  # the ingredients first (cached), outside the analysis's clock
        self.bar = progress_bar(self.an.progress, self.total, self.what, unit="soup")
        self.before = (s.stats.evaluations, s.stats.cached, s.stats.form_seconds, s.stats.eval_seconds)
        self.evaluated = self.points = 0
        self.start = time.perf_counter()
        return self

    def mixed(self, members: list[int], weights: list[float]) -> dict:
        return self.count_of(lambda: self.an.search.mixed_logits(members, weights, self.an.sets))

    def soup(self, members: list[int]) -> dict:
        return self.count_of(lambda: self.an.search.soup_logits(members, self.an.sets))

    def count_of(self, fn) -> dict:
        before = self.an.search.stats.evaluations
        out = fn()
        self.points += 1
        self.evaluated += self.an.search.stats.evaluations > before
        if self.bar is not None:
            self.bar.update(1)
        return out

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        s = self.an.search.stats
        ev, cached, form, evs = self.before
        self.stats = {"points": self.points, "evaluated": self.evaluated, "evaluations": s.evaluations - ev,
                      "cached": s.cached - cached, "seconds": self.seconds,
                      "seconds_per_soup": self.seconds / self.evaluated if self.evaluated else None,
                      "form_seconds": s.form_seconds - form, "eval_seconds": s.eval_seconds - evs}


def _json_safe(v: Any) -> Any:
    """``v`` with every NaN or infinity (in dicts and lists) replaced by None: strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _grid(steps: Any, span: Sequence[float]) -> list[float]:
    """``steps`` evenly spaced values from ``span[0]`` to ``span[1]``, rounded to 12 decimals (so
    0 and 1 are exact when they fall on the grid)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ArgumentError(f"steps must be an integer >= 2, got {steps!r}")
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ArgumentError(f"span must be two numbers (lo, hi), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ArgumentError(f"span must be two finite numbers lo < hi, got {span!r}")
    return [_clean(round(lo + (hi - lo) * i / (steps - 1), 12)) for i in range(steps)]


def _clean(v: float) -> float:
    """Rounding noise off a coordinate or weight (1 - 0.7 - 0.3 is 0, not 5.6e-17); -0.0 as 0.0."""
    v = round(v, 12)
    return v + 0.0


def _pairs(idx: list[int]):
    for p in range(len(idx)):
        for q in range(p + 1, len(idx)):
            yield p, q, idx[p], idx[q]


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean cross-entropy of ``logits`` (N x C) against class labels, in float64; None when the
    logits are not class scores for these labels."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0] or labels.is_floating_point():
        return None
    lab = labels.to(torch.int64)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= logits.shape[1]):
        return None
    return float(torch.nn.functional.cross_entropy(logits.double(), lab))


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The Pearson correlation coefficient; None for fewer than 3 points or a constant variable."""
    pts = [(x, y) for x, y in zip(xs, ys) if x == x and y == y]
    if len(pts) < 3:
        return None
    mx = math.fsum(x for x, _ in pts) / len(pts)
    my = math.fsum(y for _, y in pts) / len(pts)
    sxy = math.fsum((x - mx) * (y - my) for x, y in pts)
    sxx = math.fsum((x - mx) ** 2 for x, _ in pts)
    syy = math.fsum((y - my) ** 2 for _, y in pts)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


__all__ = ["ANALYSES", "DEFAULT_SPAN", "DEFAULT_STEPS", "AnalysisResult", "Analyzer"]
