"""Side-by-side timing of the same merge with two (or more) source trees of fastsoup, interleaved.

    python -m benchmarks.compare_builds --tree before=/tmp/fs-before --tree after=. \\
        [--config vit-l14] [--k 8] [--dtype fp16] [--runs 7] [--data DIR] [--json FILE]

Each tree must have its native core built in place (``python setup.py build_ext --inplace``). A run
is bench_merge's ``fastsoup_api`` contender: warm the page cache (``cat`` of the inputs, not timed),
then a fresh process, with ``PYTHONPATH`` and the working directory set to the tree, times
``fastsoup.average(paths, out=...)`` inside itself (interpreter start and imports excluded). Rounds
alternate the trees, and the order flips every round, so drift in the machine's load hits every
tree alike. Prints the median, the minimum and every run per tree, and, after timing, how many ulps
apart the trees' outputs are (max over all tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

from .bench_merge import max_ulp_diff, nbytes, remove, warm

_CHILD = r"""
import json, sys, time
import fastsoup
paths, out = sys.argv[1:-1], sys.argv[-1]
t0 = time.perf_counter()
fastsoup.average(paths, out=out, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "fastsoup": fastsoup.__file__, "isa": fastsoup._core.isa()}))
"""


def run_once(tree: str, paths: list[str], out: str) -> dict:
    remove(out)
    warm(paths)
    env = dict(os.environ, PYTHONPATH=tree)
    r = subprocess.run([sys.executable, "-c", _CHILD, *paths, out], capture_output=True, text=True, cwd=tree, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: {r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if not os.path.realpath(res["fastsoup"]).startswith(os.path.realpath(tree) + os.sep):
        raise RuntimeError(f"{tree}: imported fastsoup from {res['fastsoup']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (give two or more)")
    ap.add_argument("--config", default="vit-l14")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--data", default="/tmp/fastsoup-bench")
    ap.add_argument("--shard-size", default="250MB")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from .checkpoints import CONFIGS, make_zoo

    trees = [t.split("=", 1) for t in args.tree]
    trees = [(name, os.path.abspath(path)) for name, path in trees]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    cfg = CONFIGS[args.config]
    paths = make_zoo(os.path.join(args.data, f"{args.config}-sharded"), args.config, args.k, dtype, "sharded",
                     shard_size=args.shard_size)[: args.k]
    in_bytes = nbytes(paths)
    print(f"# {cfg.name} {args.dtype}, K={args.k} ({in_bytes / 1e9:.2f} GB of input), hot page cache, "
          f"{args.runs} interleaved rounds; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    raw = {name: [] for name, _ in trees}
    outs = {name: os.path.join(args.data, f"compare-{name}.safetensors") for name, _ in trees}
    for r in range(args.runs):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            res = run_once(path, paths, outs[name])
            raw[name].append(res["seconds"])
            print(f"round {r + 1} {name}: {res['seconds']:.3f} s ({res['isa']})", flush=True)
    results = {"config": cfg.name, "dtype": args.dtype, "k": args.k, "input_bytes": in_bytes, "runs": args.runs,
               "load_average_end": os.getloadavg(), "trees": {}}
    base = statistics.median(raw[trees[0][0]])
    print()
    print("| tree | median s | min s | GB/s of input (median) | vs first | runs (s) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, path in trees:
        med = statistics.median(raw[name])
        results["trees"][name] = {"path": path, "median_seconds": med, "min_seconds": min(raw[name]),
                                  "seconds": raw[name]}
        print(f"| {name} | {med:.3f} | {min(raw[name]):.3f} | {in_bytes / med / 1e9:.2f} | {med / base - 1:+.1%} | "
              + ", ".join(f"{t:.3f}" for t in raw[name]) + " |")
    first = trees[0][0]
    for name, _ in trees[1:]:
        d = max_ulp_diff(outs[first], outs[name])
        results["trees"][name]["max_ulp_vs_" + first] = d
        print(f"outputs {name} vs {first}: max difference {d} ulp")
    for o in outs.values():
        remove(o)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
