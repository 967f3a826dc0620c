"""The ``fastsoup`` command line.

    fastsoup average IN [IN ...] -o OUT [--weights W ...] [--dtype {fp16,bf16,fp32}]
                     [--shard-size 5GB] [--threads N] [--no-progress] [--overwrite] [--fsync]
    fastsoup greedy CKPT [CKPT ...] --model MOD:FACTORY --heldout MOD:LOADER [--eval NAME=MOD:LOADER ...]
                    -o OUT [--cache DIR] [--strict] [--device DEV] [--results PATH] [--overwrite]
    fastsoup plot RESULTS.jsonl -o FIG.png [--x heldout] [--y NAME]
    fastsoup demo [--out DIR] [--models N] [--seed S]
    fastsoup info

Errors are one line on stderr (no traceback) and a non-zero exit code; nothing is left at OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsoup", description="Fast, memory-bounded model soups.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("average", help="average checkpoints (uniform or weighted) into one",
                       description="Average checkpoints: sum_k w_k * theta_k / sum_k w_k, streamed from disk.")
    a.add_argument("inputs", nargs="+", metavar="IN",
                   help=".safetensors files, sharded folders or index files, .pt/.bin files")
    a.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output: a path ending in .safetensors for one file, else a sharded folder")
    a.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per input (default: uniform)")
    a.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: as the first input)")
    a.add_argument("--shard-size", metavar="SIZE", help="largest output shard, e.g. 5GB (default: as the first input)")
    a.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a.add_argument("--fsync", action="store_true", help="flush OUT to disk before it appears (durable, slower)")

    g = sub.add_parser(
        "greedy", help="greedy soup (paper's Recipe 1) with cached logits, plus uniform soup and ensembles",
        description="Greedy soup: rank the checkpoints by held-out accuracy, add each to the soup if the held-out "
                    "accuracy does not drop (--strict: if it improves). Prints a table of every ingredient, the uniform "
                    "and greedy soups and the logit ensembles on the held-out set and each --eval set.")
    g.add_argument("inputs", nargs="+", metavar="CKPT", help="checkpoints fine-tuned from one init")
    g.add_argument("--model", required=True, metavar="MOD:FACTORY",
                   help="a function returning the nn.Module, e.g. mypkg.models:make_model (or path/file.py:make_model)")
    g.add_argument("--heldout", required=True, metavar="MOD:LOADER",
                   help="a function returning the held-out (inputs, labels) batches, e.g. a DataLoader")
    g.add_argument("--eval", action="append", default=[], metavar="NAME=MOD:LOADER",
                   help="another data set to report (repeatable), e.g. shift=mypkg.data:ood_loader")
    g.add_argument("-o", "--out", required=True, metavar="OUT", help="where to write the greedy soup (safetensors)")
    g.add_argument("--cache", metavar="DIR", help="logit cache and journal: reruns evaluate nothing, a killed run resumes")
    g.add_argument("--strict", action="store_true", help="keep a candidate only if it improves (the official main.py)")
    g.add_argument("--device", help="evaluation device (default: the model's)")
    g.add_argument("--results", metavar="PATH", help="results JSONL (default: results.jsonl in --cache, else next to OUT)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    pl = sub.add_parser("plot", help="the paper-style figure from a results.jsonl",
                        description="Individual models as points, uniform and greedy soup (and ensembles) marked; "
                                    "x = held-out accuracy, y = another data set's (default: the first eval set).")
    pl.add_argument("results", metavar="RESULTS.jsonl")
    pl.add_argument("-o", "--out", required=True, metavar="FIG.png")
    pl.add_argument("--x", default="heldout", help="data set on the x axis (default: heldout)")
    pl.add_argument("--y", help="data set on the y axis (default: the first other one)")

    d = sub.add_parser("demo", help="the paper's experiment in miniature (real digits data, ~1 minute on 2 cores)",
                       description="Pretrains a small MLP on scikit-learn's bundled digits, fine-tunes N models with a random "
                                   "hyperparameter search, and compares every model, the uniform and greedy soups and the "
                                   "logit ensembles on held-out, test and shifted test data; writes a table, results.jsonl, "
                                   "the greedy soup and a figure. Nothing is downloaded.")
    d.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    d.add_argument("--models", type=int, default=12, metavar="N", help="fine-tunes (default: 12)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split and the search (default: 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("info", help="what the native core uses on this machine")
    return p


def _greedy(args) -> int:
    from .search.report import greedy_report

    evals = {}
    for spec in args.eval:
        name, sep, target = spec.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"--eval {spec!r}: expected NAME=MOD:LOADER")
        if name in evals or name == "heldout":
            raise ValueError(f"--eval {spec!r}: the name {name!r} is already used")
        evals[name] = target
    report = greedy_report(
        args.inputs, model=args.model, heldout=args.heldout, evals=evals, out=args.out, cache_dir=args.cache,
        strict=args.strict, device=args.device, results=args.results, progress=False if args.no_progress else None,
        overwrite=args.overwrite,
    )
    print(report.table())
    print(f"wrote {report.out} and {report.results_path} in {report.seconds:.2f} s", file=sys.stderr)
    return 0


def _plot(args) -> int:
    from .search.report import plot_results

    path = plot_results(args.results, args.out, x=args.x, y=args.y)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _average(args) -> int:
    from .engine import average

    start = time.perf_counter()
    path = average(
        args.inputs,
        args.weights,
        out=args.out,
        dtype=args.dtype,
        threads=args.threads,
        shard_size=args.shard_size,
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
        fsync=args.fsync,
    )
    print(f"wrote {path} from {len(args.inputs)} checkpoints in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from . import FastsoupError, native_info

        if args.command == "info":
            print(json.dumps(native_info(), indent=2))
            return 0
        if args.command == "greedy":
            return _greedy(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(args.out, args.models, args.seed, False if args.no_progress else None)
        return _average(args)
    except KeyboardInterrupt:
        print("fastsoup: interrupted", file=sys.stderr)
        return 130
    except (FastsoupError, OSError, ValueError, TypeError) as e:
        # One line: multi-line messages (lists of problems) are joined.
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fastsoup: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
