"""The ``fastsoup greedy`` report (every ingredient, uniform and greedy soup, logit ensembles, on the
held-out set and each eval set) and the ``fastsoup plot`` figure."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from ._errors import ArgumentError, FastsoupError, OutputExistsError, UnsafeOutputError
from ._errors import MatplotlibMissing  # noqa: F401  (re-exported: the demo and callers catch it here)
from ._plotting import HINT as MATPLOTLIB_HINT  # noqa: F401  (re-exported)
from ._plotting import figure_class
from ._plotting import label as _short
from .distributed import comm as _comm
from .io import _tempfiles

# The user's functions loaded by load_callable: code object -> (what it is, its spec), so that an error
# raised inside one is reported naming it (fastsoup.cli).
_LOADED: dict = {}


def load_callable(spec: str, what: str = "function") -> Callable[[], Any]:
    """``"pkg.mod:func"`` or ``"path/to/file.py:func"`` -> the function. ``what`` says what it is for
    (``"model factory"``, ``"held-out loader"``...): an exception raised inside it names it so in the
    CLI's error line (:func:`loaded_as`)."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise ArgumentError(f"{spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:make_model")
    if module.endswith(".py"):
        if not os.path.isfile(module):
            raise ArgumentError(f"{spec!r}: no file {module}")
        mod_name = "_fastsoup_user_" + os.path.splitext(os.path.basename(module))[0]
        loader_spec = importlib.util.spec_from_file_location(mod_name, module)
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = mod
        loader_spec.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise FastsoupError(f"{spec!r}: cannot import {module} ({e})") from None
    func = getattr(mod, name, None)
    if not callable(func):
        raise ArgumentError(f"{spec!r}: {module} has no function {name!r}")
    code = getattr(func.__init__ if isinstance(func, type) else func, "__code__", None)  # a class: its __init__
    if code is not None:
        _LOADED[code] = (what, spec)
    return func


def loaded_as(code: Any) -> tuple[str, str] | None:
    """``(what, spec)`` of the function :func:`load_callable` loaded with this code object, else None."""
    return _LOADED.get(code)


@dataclass
class Report:
    rows: list[dict]  # {"name", "kind", <data set>: score, ...}
    sets: list[str]
    out: str
    results_path: str
    seconds: float
    greedy: Any = None
    ensemble: Any = None
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        """The rows as a text table, accuracies in %; ingredient paths relative to their common folder.
        Then the greedy search (:meth:`steps`) and its counts."""
        names = _display_names([r["name"] for r in self.rows], [r["kind"] == "individual" for r in self.rows])
        width = max(len(n) for n in names)
        kw = max(len(r["kind"]) for r in self.rows)
        head = f"{'model':<{width}}  {'kind':<{kw}}" + "".join(f"  {s:>10}" for s in self.sets)
        lines = [head, "-" * len(head)]
        for r, name in zip(self.rows, names):
            lines.append(f"{name:<{width}}  {r['kind']:<{kw}}" + "".join(f"  {_fmt(r.get(s)):>10}" for s in self.sets))
        g = self.greedy
        lines += ["", self.steps(), ""]
        lines.append(
            f"greedy soup: {len(g.indices)} of {len(g.individual_scores)} ingredients "
            f"({'>' if g.strict else '>='} rule); {g.stats.evaluations} evaluations, {g.stats.cached} from the cache, "
            f"{g.stats.batches_saved} batches skipped by early rejection"
        )
        return "\n".join(lines)

    def steps(self, most: int = 12) -> str:
        """The greedy search as a person reads it: each checkpoint kept, in the order tried (its rank by
        held-out score), with the soup's held-out score once it is in; then the rejected ones, by name
        (the first ``most``; every step's score is in the soup's JSON sidecar, "history")."""
        g = self.greedy
        names = _display_names(g.names, [True] * len(g.names))
        rule = "kept if it improves the soup's score" if g.strict else "kept unless it lowers the soup's score"
        lines = [f"greedy search: the checkpoints kept, numbered in the order tried (best held-out first), with "
                 f"the soup's held-out {g.metric} after each ({rule}):"]
        width = max(len(names[h["index"]]) for h in g.history)
        rejected = []
        for h in g.history:
            if not h["accepted"]:
                rejected.append(names[h["index"]])
                continue
            why = "  (the best individual: the start)" if h["step"] == 0 else ""
            lines.append(f"  {h['step'] + 1:>3}. {names[h['index']]:<{width}}  {_fmt(h['score']):>6}{why}")
        if rejected:
            shown = ", ".join(rejected[:most]) + (f", ... ({len(rejected) - most} more)" if len(rejected) > most else "")
            lines.append(f"  rejected {len(rejected)}, in the order tried: {shown}")
        return "\n".join(lines)


def _display_names(names: Sequence[str], paths: Sequence[bool]) -> list[str]:
    """Names for the tables: checkpoint paths (where ``paths``) relative to their common folder."""
    files = [n for n, p in zip(names, paths) if p and not n.startswith("<")]
    if len(files) < 2:
        return list(names)
    common = os.path.commonpath([os.path.abspath(n) for n in files])
    return [os.path.relpath(os.path.abspath(n), common) if p and not n.startswith("<") else n
            for n, p in zip(names, paths)]


def _fmt(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def greedy_report(
    inputs: Sequence[str],
    *,
    model: str,
    heldout: str | None,
    evals: dict[str, str],
    out: str,
    **options: Any,
) -> Report:
    """``fastsoup greedy``: loads ``MOD:FUNC`` specs of the model factory and data loaders, then :func:`run_report`.
    ``heldout=None``: the held-out set stored in the cache (``cache_dir``) by an earlier run."""
    if os.path.exists(out) and not options.get("overwrite", False):
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it")
    if heldout is None and options.get("cache_dir") is None:
        raise ArgumentError("give --heldout MOD:LOADER, or --cache DIR of an earlier run (which stored the held-out set)")
    net = load_callable(model, "model factory")()
    data = load_callable(heldout, "held-out loader")() if heldout is not None else None
    eval_data = {name: load_callable(spec, f"eval loader {name!r}")() for name, spec in evals.items()}
    return run_report(inputs, net, data, eval_data, out=out, **options)


def run_report(
    inputs: Sequence[Any],
    model: Any,
    heldout: Any,
    evals: dict[str, Any],
    *,
    out: str,
    cache_dir: str | None = None,
    strict: bool = False,
    eval_device: str | None = None,
    results: str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    config_from: Any = None,
) -> Report:
    """Runs the greedy search and scores every recipe (each ingredient, uniform and greedy soup, uniform
    and greedy logit ensembles) on the held-out set and every eval set; writes the greedy soup to
    ``out`` and the rows to ``results`` (JSONL), merged into the rows a run wrote there before: a row
    of the same model (or soup of the same checkpoints) keeps its scores on the data sets this run
    does not score, rows of other models are kept (:func:`_merge_rows`). ``verify``: how the cache fingerprints the
    ingredients (``"sample"`` or ``"full"``, see :func:`~fastsoup.greedy_soup`); ``config_from``: the
    side files of a folder ``out`` (see :func:`~fastsoup.average`)."""
    from .recipes.ensemble import ensemble_logits, run_greedy_ensemble
    from .recipes.greedy import run_greedy
    from .search.evaluation import score_logits
    from .search.search import Search

    start = time.perf_counter()
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it")
    if results is None:
        results = os.path.join(cache_dir if cache_dir else os.path.dirname(os.path.abspath(out)), "results.jsonl")
    _check_results(results)  # before any work: the rows never replace a file of the user's
    s = Search(inputs, model, heldout, cache_dir=cache_dir, eval_device=eval_device, progress=progress, evals=evals,
               verify=verify, key_map=key_map, strip_prefix=strip_prefix)
    g = run_greedy(s, strict=strict)
    e = run_greedy_ensemble(s, strict=strict)
    sets = list(s.data)
    n = len(s.ckpts)

    def scores(logits_by_set: dict) -> dict:
        return {d: score_logits(logits_by_set[d], s.data[d].labels, s.metric) for d in sets}

    def row(name: str, kind: str, members: list[int], values: dict, individual: bool = False) -> dict:
        # "fingerprint": what the scores are of (the model, the checkpoints in their order), so that a
        # later run merges its scores into this row only when it scored the same thing (_merge_rows).
        fp = _row_fingerprint(s.model_fp, kind, [s.fps[i] for i in members])
        return {"name": name, "kind": kind, **({} if individual else {"members": members}), "fingerprint": fp,
                **scores(values)}

    everyone = list(range(n))
    rows = [row(s.names[i], "individual", [i], {d: s.individual_logits(d)[i] for d in sets}, individual=True)
            for i in everyone]
    rows.append(row("uniform soup", "uniform_soup", everyone, s.soup_logits(everyone, sets)))
    rows.append(row("greedy soup", "greedy_soup", g.indices, s.soup_logits(g.indices, sets)))
    rows.append(row("uniform ensemble", "uniform_ensemble", everyone,
                    {d: ensemble_logits(s.individual_logits(d)) for d in sets}))
    rows.append(row("greedy ensemble", "greedy_ensemble", e.indices,
                    {d: ensemble_logits([s.individual_logits(d)[i] for i in e.indices]) for d in sets}))
    path = g.save(out, overwrite=overwrite, progress=progress, config_from=config_from)
    _comm.rank0(_write_rows, results, rows, share=False)  # rank 0 under torch.distributed
    return Report(rows, sets, path, results, time.perf_counter() - start, greedy=g, ensemble=e)


def _check_results(results: str) -> None:
    """An existing ``results`` may be replaced only when it holds rows fastsoup wrote (JSON objects
    with a "name" and a "kind", one per line); anything else is the user's file and is kept."""
    if not os.path.lexists(results):
        return
    try:
        with open(results, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        ours = os.path.isfile(results) and all(isinstance(r, dict) and "name" in r and "kind" in r for r in rows)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        ours = False
    if not ours:
        raise UnsafeOutputError(f"{results} exists and fastsoup did not write it: the results would replace it; move "
                                "it away or give another path (--results PATH)")


def _row_fingerprint(model_fp: str, kind: str, checkpoint_fps: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps([model_fp, kind, list(checkpoint_fps)]).encode())
    return h.hexdigest()[:24]


# The fields of a results row that are not scores; every other field holding a number is a data set's score.
_ROW_FIELDS = ("name", "kind", "members", "fingerprint")


def row_sets(rows: Sequence[dict]) -> list[str]:
    """The data sets scored in ``rows`` (a results.jsonl's), in the order they first appear."""
    sets: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in _ROW_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool):
                sets.setdefault(k, None)
    return list(sets)


def read_results(results: str) -> list[dict]:
    """The rows of a results.jsonl (``fastsoup greedy``, ``fastsoup demo``)."""
    try:
        with open(results, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FastsoupError(f"cannot read {results}: {e}") from None
    if not all(isinstance(r, dict) and "name" in r and "kind" in r for r in rows):
        raise FastsoupError(f"{results}: not a results file of fastsoup (each line a JSON object with a name and a kind)")
    return rows


def _merge_rows(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """The rows of a results file after a run: the run's rows (in its order), each merged with the earlier
    row of the same model (kind and name) when that row scored the same thing (same fingerprint: model,
    checkpoints, and for a soup or ensemble its members), keeping that row's scores on the data sets the
    run did not score; an earlier row of another thing (say the greedy soup of other ingredients) is
    replaced. Then the earlier rows of models the run did not score, as they were."""
    keys = {(r["kind"], r["name"]) for r in new}
    earlier = {(r.get("kind"), r.get("name")): r for r in old}
    rows = []
    for r in new:
        o = earlier.get((r["kind"], r["name"]))
        if o is not None and o.get("fingerprint") is not None and o.get("fingerprint") == r.get("fingerprint"):
            kept = {k: v for k, v in o.items() if k not in r and k in row_sets([o])}
            r = {**r, **kept}
        rows.append(r)
    rows.extend(r for r in old if (r.get("kind"), r.get("name")) not in keys)
    return rows


def _write_rows(results: str, rows: list[dict], merge: bool = True) -> None:
    """Writes ``rows`` to ``results``; ``merge``: into the rows already there (:func:`_merge_rows`),
    else replacing them. A file that is not fastsoup's was refused before (:func:`_check_results`)."""
    if merge and os.path.isfile(results):
        rows = _merge_rows(read_results(results), rows)
    _tempfiles.reap(os.path.dirname(os.path.abspath(results)), os.path.basename(results))  # killed runs' leftovers
    with _tempfiles.replacing(results, text=True) as f:  # whole or not at all; removed when interrupted
        for r in rows:
            f.write(json.dumps(r) + "\n")



# How each kind of row is drawn: marker, colour, size, legend label (in the order they are drawn: the
# greedy soup on top).
_MARKS = {
    "individual": ("o", "tab:gray", 28, "fine-tuned models"),
    "uniform_ensemble": ("s", "tab:green", 60, "uniform ensemble"),
    "greedy_ensemble": ("D", "tab:purple", 52, "greedy ensemble"),
    "learned_soup": ("P", "tab:orange", 80, "learned soup"),
    "learned_soup_layerwise": ("X", "tab:brown", 70, "learned soup (layer-wise)"),
    "uniform_soup": ("o", "tab:blue", 70, "uniform soup"),
    "greedy_soup": ("*", "tab:red", 260, "greedy soup"),
}
_OTHER_MARK = ("v", "black", 50, None)  # a kind fastsoup does not know: its name as the label
_SET_NAMES = {"heldout": "held-out"}


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, imported on first use (no pyplot: no global state, no GUI backend)."""
    Figure = figure_class("the figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return Figure, FigureCanvasAgg


def _zoom(individual: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """An axis' limits (in %): around the individual models' bulk, so that a collapsed fine-tune (or a
    soup it ruined) does not squeeze the rest into a corner. Far outliers, beyond 3 interquartile
    ranges of the individual models (at least 1 point) from their quartiles, are left out of the
    range (the figure marks them at its edge); with fewer than 4 individual models nothing is."""
    lo, hi = float("-inf"), float("inf")
    if len(individual) >= 4:
        import statistics

        q1, _, q3 = statistics.quantiles(individual, n=4, method="inclusive")
        iqr = max(q3 - q1, 1.0)
        lo, hi = q1 - 3 * iqr, q3 + 3 * iqr
    inside = [v for v in values if lo <= v <= hi] or list(values)
    a, b = min(inside), max(inside)
    span = max(b - a, 2.0)
    below = any(v < a for v in values)
    above = any(v > b for v in values)
    centre = (a + b) / 2
    a, b = centre - span / 2, centre + span / 2
    return a - (0.16 if below else 0.07) * span, b + (0.16 if above else 0.07) * span


def results_figure(rows: Sequence[dict], *, x: str = "heldout", y: str | Sequence[str] | None = None,
                   title: str | None = None, subtitle: str | None = None, set_names: dict[str, str] | None = None):
    """The paper-style figure of results rows (a results.jsonl's): one panel per data set of ``y``
    (default: every set but ``x``), ``x``'s accuracy on the x axis. Each individual model is a grey
    point, each soup and ensemble a marker with its name beside it; the best individual model on
    ``x`` is named, with a dashed line at its ``x`` score. The axes are zoomed on the bulk of the
    individual models (:func:`_zoom`): a point outside is drawn at the edge, named, with its scores.
    ``title``: the figure's (default: how many models); ``subtitle``: a line under it; ``set_names``:
    how to call a data set in the axis labels (default: its name; "held-out").
    Returns the :class:`matplotlib.figure.Figure` (no pyplot); the points drawn, per panel, are in
    ``fig.fastsoup_points`` (``[{"name", "kind", "x", "y", "off_scale", "label"}]``), for tests."""
    Figure, FigureCanvasAgg = _matplotlib()
    sets = row_sets(rows)
    if not rows:
        raise FastsoupError("no results to draw")
    if x not in sets:
        raise ArgumentError(f"the results have no data set {x!r} (they have {', '.join(sets)})")
    ys = [s for s in sets if s != x] if y is None else [y] if isinstance(y, str) else list(y)
    if not ys:
        raise ArgumentError(f"the results have only {x!r}: run fastsoup greedy with --eval NAME=... for a y axis")
    for s in ys:
        if s not in sets:
            raise ArgumentError(f"the results have no data set {s!r} (they have {', '.join(sets)})")
    names = {**_SET_NAMES, **(set_names or {})}

    def label(s: str) -> str:
        return names.get(s, s)

    individual = [r for r in rows if r["kind"] == "individual"]
    ranked = [r for r in individual if isinstance(r.get(x), (int, float))]
    best = max(ranked, key=lambda r: r[x]) if ranked else None
    panels, missing = [], {}
    for s in ys:
        drawn = [r for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(s), (int, float))]
        if len(drawn) < len(rows):
            missing[s] = [r["name"] for r in rows if r not in drawn]
        if not drawn:
            raise ArgumentError(f"the results have no row with both {x!r} and {s!r} scores")
        ind = [r for r in drawn if r["kind"] == "individual"]
        xlim = _zoom([100 * r[x] for r in ind], [100 * r[x] for r in drawn])
        ylim = _zoom([100 * r[s] for r in ind], [100 * r[s] for r in drawn])
        off = any(not (xlim[0] <= 100 * r[x] <= xlim[1] and ylim[0] <= 100 * r[s] <= ylim[1]) for r in drawn)
        panels.append((s, drawn, xlim, ylim, off))
    notes = [subtitle] if subtitle else []
    if any(p[4] for p in panels):
        notes.append("axes zoomed on the fine-tuned models; a point off the scale is drawn at the edge, with an "
                     "arrow, its name and its scores (x, y)")

    ncols = min(len(ys), 3)
    nrows = -(-len(ys) // ncols)
    top = 0.62 + 0.2 * len(notes)  # inches above the axes: title, notes, the panels' titles
    width, height = 4.9 * ncols + 0.3, 4.3 * nrows + top + 0.6
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, top=1 - top / height, bottom=1.15 / height,
                        wspace=0.25, hspace=0.35)
    fig.suptitle(title or f"{len(individual)} fine-tuned models, their soups and ensembles", fontsize=12,
                 y=1 - 0.1 / height, va="top")
    for k, line in enumerate(notes):
        fig.text(0.5, 1 - (0.42 + 0.2 * k) / height, line, ha="center", va="top", fontsize=8, color="0.3")
    axes = [fig.add_subplot(nrows, ncols, k + 1) for k in range(len(ys))]
    fig.fastsoup_points = []
    legend: dict[str, Any] = {}
    for ax, (s, drawn, xlim, ylim, _) in zip(axes, panels):
        points = _draw_panel(ax, drawn, x, s, xlim, ylim, best, legend)
        ax.set_xlabel(f"{label(x)} accuracy (%)")
        ax.set_ylabel(f"{label(s)} accuracy (%)")
        ax.set_title(f"{label(s)} vs {label(x)}", fontsize=10)
        fig.fastsoup_points.append(points)
    handles = list(legend.values())
    fig.legend(handles, list(legend), loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    renderer = fig.canvas.get_renderer()
    for ax, points in zip(axes, fig.fastsoup_points):
        _place_labels(ax, points, renderer)
    for s, left_out in missing.items():
        from .io._sidefiles import note

        note(f"not in the {s!r} panel (no {s!r} score: scored by a run without --eval {s}=...): "
             + ", ".join(_short(n) for n in left_out))
    return fig


def _draw_panel(ax, rows, x, y, xlim, ylim, best, legend) -> list[dict]:
    """Draws one panel's points, an off-scale one at the edge (spread along it when several would sit
    on one spot); returns them, with their labels (placed by :func:`_place_labels`)."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    to_px, scale = ax.transData, ax.figure.dpi / 72.0
    points, spots = [], []
    for kind in [*_MARKS, *sorted({r["kind"] for r in rows} - set(_MARKS))]:
        marker, colour, size, what = _MARKS.get(kind, _OTHER_MARK)
        for r in rows:
            if r["kind"] != kind:
                continue
            vx, vy = 100 * r[x], 100 * r[y]
            at = min(max(vx, xlim[0]), xlim[1]), min(max(vy, ylim[0]), ylim[1])
            off = at != (vx, vy)
            name = _short(r["name"]) if kind == "individual" else r["name"]
            if off:
                d = to_px.transform(at)
                while any(abs(d[0] - q[0]) < 9 * scale and abs(d[1] - q[1]) < 9 * scale for q in spots):
                    d = (d[0], d[1] + 11 * scale) if at[0] != vx else (d[0] + 11 * scale, d[1])
                spots.append(d)
                at = tuple(float(v) for v in to_px.inverted().transform(d))
                arrow = {(-1, 0): "\u2190", (1, 0): "\u2192", (0, -1): "\u2193", (0, 1): "\u2191", (-1, -1): "\u2199",
                         (1, -1): "\u2198", (-1, 1): "\u2196", (1, 1): "\u2197"}[
                    (int(vx > xlim[1]) - int(vx < xlim[0]), int(vy > ylim[1]) - int(vy < ylim[0]))]
                text = f"{arrow} {name}: {vx:.1f}, {vy:.1f}"
            elif kind != "individual":
                text = name
            elif r is best:
                text = f"best individual ({name})"
            else:
                text = None
            edge = "none" if kind == "individual" else "black"
            ax.scatter([at[0]], [at[1]], marker=marker, c=colour, s=size, edgecolors="black" if r is best else edge,
                       linewidths=1.0 if r is best else 0.5,
                       alpha=0.5 if off else 1.0, clip_on=False, zorder=4 if kind == "greedy_soup" else 3)
            if (what or name) not in legend:
                legend[what or name] = ax.scatter([], [], marker=marker, c=colour, s=min(size, 120), edgecolors=edge,
                                                  linewidths=0.5)
            points.append({"name": r["name"], "kind": kind, "x": vx, "y": vy, "at": at, "off_scale": off,
                           "label": text, "size": size, "best": r is best})
    if best is not None and any(p["best"] and not p["off_scale"] for p in points):
        line = ax.axvline(100 * best[x], ls="--", lw=0.8, c="tab:gray", zorder=1)
        legend.setdefault(f"best individual's {_SET_NAMES.get(x, x)} score", line)
    return points


def _place_labels(ax, points: list[dict], renderer) -> None:
    """Writes each point's label (if it has one) at the first of a few positions around it, nearest
    first, where it overlaps no other label and no marker and stays inside the axes (else the one
    that overlaps least); a leader line from the farther positions."""
    to_px, scale = ax.transData, ax.figure.dpi / 72.0

    def box(p):
        (cx, cy), r = to_px.transform(p["at"]), max(3.0, (p["size"] ** 0.5) / 2) * scale
        return (cx - r, cy - r, cx + r, cy + r)

    markers = [box(p) for p in points]
    frame = ax.get_window_extent(renderer)
    placed: list = []
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    order = sorted((p for p in points if p["label"]),
                   key=lambda p: (p["kind"] != "greedy_soup", not p["best"], p["off_scale"]))
    for p in order:
        own = box(p)
        choice = None
        for radius in (6, 14, 26, 40, 56):
            for dx, dy in directions:
                offset = (dx * radius, dy * radius * 0.7)
                style = {"ha": "left" if dx > 0 else "right" if dx < 0 else "center",
                         "va": "bottom" if dy > 0 else "top" if dy < 0 else "center"}
                ann = ax.annotate(p["label"], p["at"], xytext=offset, textcoords="offset points", fontsize=7.5,
                                  zorder=6, **style)
                bb = ann.get_window_extent(renderer)
                ann.remove()
                rect = (bb.x0, bb.y0, bb.x1, bb.y1)
                cost = sum(_overlap(rect, m) for m in markers if m != own) + sum(_overlap(rect, q) for q in placed)
                if not (frame.x0 <= rect[0] and rect[2] <= frame.x1 and frame.y0 <= rect[1] and rect[3] <= frame.y1):
                    cost += 1e9
                if choice is None or cost < choice[0]:
                    choice = (cost, offset, style, rect, radius)
                if cost == 0:
                    break
            if choice[0] == 0:
                break
        _, offset, style, rect, radius = choice
        leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkA": 0, "shrinkB": 3}} \
            if radius >= 26 else {}
        p["text"] = ax.annotate(p["label"], p["at"], xytext=offset, textcoords="offset points", fontsize=7.5, zorder=6,
                                **style, **leader)
        placed.append(rect)


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def plot_results(results: str, out: str, *, x: str = "heldout", y: str | Sequence[str] | None = None,
                 title: str | None = None, subtitle: str | None = None,
                 set_names: dict[str, str] | None = None) -> str:
    """Draws the paper-style figure (PNG) of a results.jsonl written by ``fastsoup greedy`` or ``fastsoup
    demo``: see :func:`results_figure`. Returns ``out``."""
    _matplotlib()  # before reading: the missing library is the first thing to say
    rows = read_results(results)
    if not rows:
        raise FastsoupError(f"{results} has no results")
    try:
        fig = results_figure(rows, x=x, y=y, title=title, subtitle=subtitle, set_names=set_names)
    except ArgumentError as e:
        raise ArgumentError(str(e).replace("the results have", f"{results} has", 1)) from None
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
