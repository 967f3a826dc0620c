"""Side-by-side timing of two (or more) source trees of fastsoup, interleaved: the hot merge, or the
cached-logit greedy search.

    python -m benchmarks.compare_builds --tree before=/tmp/fs-before --tree after=. \\
        [--config vit-l14] [--k 8] [--dtype fp16] [--runs 7] [--data DIR] [--out-dir DIR] [--idle-wait S] \\
        [--json FILE]
    python -m benchmarks.compare_builds --bench greedy --tree before=/tmp/fs-before --tree after=. \\
        [--pipeline jpeg|memory] [--quick] [--n N] [--heldout N] [--reorder R] [--workdir DIR] [--runs 7] \\
        [--idle-wait S] [--json FILE]
    (python benchmarks/compare_builds.py ... works the same)

Each tree must have its native core built in place (``python setup.py build_ext --inplace``). Every
run is a fresh process with ``PYTHONPATH`` and the working directory set to the tree, so it imports
that tree's fastsoup (checked), while the benchmark code is this tree's (harness.run_module): the
same contender code, through fastsoup's public API, for every tree. Rounds alternate the trees, and
the order flips every round, so drift in the machine's load hits every tree alike.
--idle-wait S: before each run, wait up to S seconds for a one-second sample in which the CPUs are
at least 85 % idle (the same rule for every tree; on a shared machine other work comes and goes).

--bench merge (default): bench_merge's ``fastsoup_api`` contender: warm the page cache (``cat`` of
the inputs, not timed), then the process times ``fastsoup.average(paths, out=...)`` inside itself
(interpreter start and imports excluded), wall clock and the process's CPU time (all its threads;
less sensitive to other work on the machine). Prints the median, the minimum and every run per
tree, and, after timing, how many ulps apart the trees' outputs are (max over all tensors). The
output goes to --out-dir (default: the data folder); /dev/shm keeps the disk's writeback of earlier
runs' outputs out of the timings.

--bench greedy: bench_greedy's setting (N fine-tunes of a small ViT, 4,096 held-out images through
the --pipeline; made once with this tree's code and kept in --workdir) and its fastsoup contender:
``fastsoup.greedy_soup(paths, model, loader, strict=True, cache_dir=<fresh>)`` (the "first run" whose
medians RESULTS.md reports), the same call again (rerun) and ``heldout=None`` (rerun from the stored
held-out set), in that order in one process per tree and round (benchmarks.greedy.child). Prints the
median, minimum and IQR of each per tree, the ratio of the medians to the first tree's, and whether
every run of every tree made the same decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

if __package__ in (None, ""):  # run as a script: python benchmarks/compare_builds.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (git_info, machine, nbytes, remove, run_module, summarize, wait_idle,  # noqa: E402
                                warm, write_json)
from benchmarks.merge import max_ulp_diff  # noqa: E402

GREEDY_RUNS = {"first": "first run (fresh cache)", "rerun": "rerun (same call)",
               "stored": "rerun from the stored set (heldout=None)"}


def idle_then(idle_wait: float):
    """Waits for an idle second (up to idle_wait seconds); None when not asked, else whether one came."""
    return wait_idle(idle_wait) if idle_wait > 0 else None


def header(what: str, trees, runs: int) -> str:
    m = machine()
    commits = ", ".join(f"{name} {git_info(path).get('git_commit', '?')}"
                        + (" (uncommitted changes)" if git_info(path).get("git_dirty_package_files") else "")
                        for name, path in trees)
    return (f"# {what}, {runs} interleaved rounds; {m['cpu']}, {m['nproc']} CPUs, load average "
            f"{os.getloadavg()[0]:.2f}; trees: {commits}")


# ---------------------------------------------------------------------------------------------------
# The merge


def run_merge(tree: str, paths: list, out: str, idle_wait: float = 0.0, timeout: float | None = None) -> dict:
    remove(out)
    warm(paths)
    idle = idle_then(idle_wait)
    res = run_module("benchmarks._contenders", ["fastsoup_api", out, *paths], tree=tree, timeout=timeout)
    res["idle_before"] = idle
    return res


def compare_merge(args, trees) -> dict:
    import torch

    from benchmarks.checkpoints import CONFIGS, make_zoo

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    cfg = CONFIGS[args.config]
    paths = make_zoo(os.path.join(args.data, f"{args.config}-sharded"), args.config, args.k, dtype, "sharded",
                     shard_size=args.shard_size)[: args.k]
    in_bytes = nbytes(paths)
    print(header(f"{cfg.name} {args.dtype}, K={args.k} ({in_bytes / 1e9:.2f} GB of input), hot page cache", trees,
                 args.runs), flush=True)
    raw = {name: [] for name, _ in trees}
    cpu = {name: [] for name, _ in trees}
    not_idle = 0
    outs = {name: os.path.join(args.out_dir or args.data, f"compare-{name}.safetensors") for name, _ in trees}
    for r in range(args.runs):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            res = run_merge(path, paths, outs[name], args.idle_wait, args.timeout)
            raw[name].append(res["seconds"])
            cpu[name].append(res["cpu_seconds"])
            not_idle += res["idle_before"] is False
            print(f"round {r + 1} {name}: {res['seconds']:.3f} s, CPU {res['cpu_seconds']:.3f} s ({res['isa']}"
                  f"{', machine not idle' if res['idle_before'] is False else ''})", flush=True)
    results = {"bench": "merge", "config": cfg.name, "dtype": args.dtype, "k": args.k, "input_bytes": in_bytes,
               "runs": args.runs, "out_dir": args.out_dir or args.data, "idle_wait": args.idle_wait,
               "runs_not_idle": not_idle, "load_average_end": os.getloadavg(), "trees": {}}
    first = trees[0][0]
    base, base_cpu = summarize(raw[first])["median"], summarize(cpu[first])["median"]
    print()
    print("| tree | median s | min s | GB/s of input (median) | vs first | CPU s (median) | CPU vs first | runs (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, path in trees:
        s, c = summarize(raw[name]), summarize(cpu[name])
        results["trees"][name] = {"path": path, "median_seconds": s["median"], "min_seconds": s["min"],
                                  "iqr_seconds": s["iqr"], "seconds": raw[name], "median_cpu_seconds": c["median"],
                                  "cpu_seconds": cpu[name]}
        print(f"| {name} | {s['median']:.3f} | {s['min']:.3f} | {in_bytes / s['median'] / 1e9:.2f} | "
              f"{s['median'] / base - 1:+.1%} | {c['median']:.3f} | {c['median'] / base_cpu - 1:+.1%} | "
              + ", ".join(f"{t:.3f}" for t in raw[name]) + " |")
    if args.idle_wait > 0:
        print(f"{not_idle} of {len(trees) * args.runs} runs started without an idle second within {args.idle_wait:g} s")
    for name, _ in trees[1:]:
        d = max_ulp_diff(outs[first], outs[name])
        results["trees"][name]["max_ulp_vs_" + first] = d
        print(f"outputs {name} vs {first}: max difference {d} ulp")
    for o in outs.values():
        remove(o)
    return results


# ---------------------------------------------------------------------------------------------------
# The greedy search


def prepare_greedy(args):
    """bench_greedy's data and ingredients in --workdir (reused when the config matches)."""
    from benchmarks.greedy.data import make_config, make_data
    from benchmarks.greedy.model import make_ingredients

    cfg = make_config(args.quick, n=args.n, heldout=args.heldout, quiet_wait=0.0, max_redo=0)
    os.makedirs(os.path.join(args.workdir, "checkpoints"), exist_ok=True)
    data = make_data(cfg, args.pipeline, args.workdir)
    print(f"data: {cfg.heldout} held-out images, {data.what} ({data.seconds:.1f} s)", flush=True)
    make_ingredients(cfg, os.path.join(args.workdir, "checkpoints"), data.xtr, data.ytr, data.xte, data.yte, False,
                     lambda s="": print(s, flush=True), args.pipeline)
    return cfg


def compare_greedy(args, trees) -> dict:
    cfg = prepare_greedy(args)
    print(header(f"greedy soup, N = {cfg.n}, {cfg.heldout} held-out images ({args.pipeline} pipeline, batches of "
                 f"{cfg.batch_size}), fastsoup.greedy_soup(strict=True) first run / rerun / rerun from the stored set",
                 trees, args.runs), flush=True)
    child_args = [args.workdir, json.dumps(asdict(cfg)), args.pipeline] + ([args.reorder] if args.reorder else [])
    raw = {name: {k: [] for k in GREEDY_RUNS} for name, _ in trees}
    decisions = set()
    not_idle = 0
    for r in range(args.runs):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            idle = idle_then(args.idle_wait)
            res = run_module("benchmarks.greedy.child", child_args, tree=path, timeout=args.timeout)
            not_idle += idle is False
            for k, run in res["runs"].items():
                raw[name][k].append(run)
                decisions.add((tuple(run["indices"]), run["score"]))
            f, re_, st = (res["runs"][k] for k in GREEDY_RUNS)
            print(f"round {r + 1} {name}: first {f['seconds']:.3f} s (CPU {f['cpu_seconds']:.2f} s, "
                  f"{f['batches_evaluated']} candidate batches), rerun {re_['seconds']:.3f} s, stored {st['seconds']:.3f} s; "
                  f"other processes {f['foreign_cpu_seconds']:.1f} CPU-s during the first run ({res['isa']}"
                  f"{', machine not idle' if idle is False else ''})", flush=True)
    results = {"bench": "greedy", "config": asdict(cfg), "pipeline": args.pipeline, "reorder": args.reorder,
               "runs": args.runs, "idle_wait": args.idle_wait, "runs_not_idle": not_idle,
               "load_average_end": os.getloadavg(), "trees": {}}
    first = trees[0][0]
    print()
    print("| tree | run | median s | min s | IQR s | vs first tree | CPU s (median) | runs (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, path in trees:
        results["trees"][name] = {"path": path}
        for k, label in GREEDY_RUNS.items():
            secs = [x["seconds"] for x in raw[name][k]]
            s = summarize(secs)
            c = summarize([x["cpu_seconds"] for x in raw[name][k]])
            base = summarize([x["seconds"] for x in raw[first][k]])["median"]
            results["trees"][name][k] = {"median_seconds": s["median"], "min_seconds": s["min"], "iqr_seconds": s["iqr"],
                                         "median_cpu_seconds": c["median"], "ratio_to_first": s["median"] / base,
                                         "runs": raw[name][k]}
            print(f"| {name} | {label} | {s['median']:.3f} | {s['min']:.3f} | {s['iqr']:.3f} | "
                  f"{s['median'] / base - 1:+.1%} | {c['median']:.2f} | " + ", ".join(f"{t:.3f}" for t in secs) + " |")
    print()
    for name, _ in trees[1:]:
        print(f"{name} / {first}, medians: " + "; ".join(
            f"{label} {results['trees'][name][k]['median_seconds']:.3f} / {results['trees'][first][k]['median_seconds']:.3f}"
            f" s = {results['trees'][name][k]['ratio_to_first']:.3f}" for k, label in GREEDY_RUNS.items()))
    if args.idle_wait > 0:
        print(f"{not_idle} of {len(trees) * args.runs} runs started without an idle second within {args.idle_wait:g} s")
    results["same_decisions"] = len(decisions) == 1
    if len(decisions) == 1:
        kept, score = next(iter(decisions))
        print(f"decisions: same in every run of every tree (kept {list(kept)}, score {score:.6f})")
    else:
        print(f"DECISIONS DIFFER between runs (kept, score): {sorted(decisions)}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (give two or more)")
    ap.add_argument("--bench", choices=("merge", "greedy"), default="merge", help="what to time (default: the merge)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--idle-wait", type=float, default=0.0, help="seconds to wait for idle CPUs before each run")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take (default 1800)")
    ap.add_argument("--json")
    m = ap.add_argument_group("--bench merge")
    m.add_argument("--config", default="vit-l14")
    m.add_argument("--k", type=int, default=8)
    m.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    m.add_argument("--data", default="/tmp/fastsoup-bench")
    m.add_argument("--shard-size", default="250MB")
    m.add_argument("--out-dir", help="where the outputs are written (default: --data)")
    g = ap.add_argument_group("--bench greedy")
    g.add_argument("--pipeline", choices=("jpeg", "memory"), default="jpeg", help="held-out pipeline (bench_greedy's)")
    g.add_argument("--quick", action="store_true", help="bench_greedy --quick's tiny sizes")
    g.add_argument("--n", type=int, help="ingredients (default 16; 4 with --quick)")
    g.add_argument("--heldout", type=int, help="held-out images (default 4096)")
    g.add_argument("--reorder", choices=("examples", "batches", "none"), help="greedy_soup's reorder= (default: not "
                   "passed, each build's default)")
    g.add_argument("--workdir", default="/tmp/fastsoup-compare-greedy", help="data and ingredients (kept, reused)")
    args = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree]
    if any(len(t) != 2 for t in trees):
        ap.error("--tree takes NAME=PATH")
    trees = [(name, os.path.abspath(path)) for name, path in trees]
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    results = compare_merge(args, trees) if args.bench == "merge" else compare_greedy(args, trees)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
