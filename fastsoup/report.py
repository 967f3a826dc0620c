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


def plot_results(results: str, out: str, *, x: str = "heldout", y: str | None = None) -> str:
    """Draws the paper-style scatter (PNG) from a results.jsonl written by ``fastsoup greedy``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FastsoupError("fastsoup plot needs matplotlib: pip install matplotlib") from None
    rows = read_results(results)
    if not rows:
        raise FastsoupError(f"{results} has no results")
    sets = row_sets(rows)
    if x not in sets:
        raise ArgumentError(f"{results} has no data set {x!r} (it has {', '.join(sets)})")
    if y is None:
        others = [s for s in sets if s != x]
        if not others:
            raise ArgumentError(f"{results} has only {x!r}: run fastsoup greedy with --eval NAME=... for a y axis")
        y = others[0]
    if y not in sets:
        raise ArgumentError(f"{results} has no data set {y!r} (it has {', '.join(sets)})")
    rows = [r for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    fig, ax = plt.subplots(figsize=(6, 5))
    ind = [r for r in rows if r["kind"] == "individual"]
    ax.scatter([100 * r[x] for r in ind], [100 * r[y] for r in ind], c="tab:gray", s=30, label="individual models")
    marks = {"uniform_soup": ("o", "tab:blue", "uniform soup"), "greedy_soup": ("*", "tab:red", "greedy soup"),
             "uniform_ensemble": ("s", "tab:green", "uniform ensemble"),
             "learned_soup": ("P", "tab:orange", "learned soup"),
             "learned_soup_layerwise": ("X", "tab:brown", "learned soup (layer-wise)"),
             "greedy_ensemble": ("D", "tab:purple", "greedy ensemble")}
    for kind in ("uniform_ensemble", "greedy_ensemble", "learned_soup", "learned_soup_layerwise", "uniform_soup",
                 "greedy_soup"):  # greedy soup drawn on top
        m, c, label = marks[kind]
        for r in rows:
            if r["kind"] == kind:
                ax.scatter([100 * r[x]], [100 * r[y]], marker=m, c=c, s=220 if m == "*" else 70, label=label,
                           edgecolors="black", linewidths=0.5, zorder=5 if kind == "greedy_soup" else 3)
    ax.set_xlabel(f"{x} accuracy (%)")
    ax.set_ylabel(f"{y} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out
