"""Side-by-side timing of the same merge with two (or more) source trees of fastsoup, interleaved.

    python -m benchmarks.compare_builds --tree before=/tmp/fs-before --tree after=. \\
        [--config vit-l14] [--k 8] [--dtype fp16] [--runs 7] [--data DIR] [--out-dir DIR] [--idle-wait S] \\
        [--json FILE]

Each tree must have its native core built in place (``python setup.py build_ext --inplace``). A run
is bench_merge's ``fastsoup_api`` contender: warm the page cache (``cat`` of the inputs, not timed),
then a fresh process, with ``PYTHONPATH`` and the working directory set to the tree, times
``fastsoup.average(paths, out=...)`` inside itself (interpreter start and imports excluded), wall
clock and the process's CPU time (all its threads; less sensitive to other work on the machine). Rounds
alternate the trees, and the order flips every round, so drift in the machine's load hits every
tree alike. Prints the median, the minimum and every run per tree, and, after timing, how many ulps
apart the trees' outputs are (max over all tensors). The output goes to --out-dir (default: the data
folder); /dev/shm keeps the disk's writeback of earlier runs' outputs out of the timings.
--idle-wait S: before each run, wait up to S seconds for a one-second sample in which the CPUs are
at least 85 % idle (the same rule for every tree; on a shared machine other work comes and goes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from .bench_merge import max_ulp_diff, nbytes, remove, warm

_CHILD = r"""
import json, sys, time
import fastsoup
paths, out = sys.argv[1:-1], sys.argv[-1]
t0, c0 = time.perf_counter(), time.process_time()
fastsoup.average(paths, out=out, progress=False)
t1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"seconds": t1 - t0, "cpu_seconds": c1 - c0, "fastsoup": fastsoup.__file__, "isa": fastsoup._core.isa()}))
"""


def cpu_idle_fraction(interval: float = 1.0) -> float:
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    i0, t0 = sample()
    time.sleep(interval)
    i1, t1 = sample()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_idle(limit: float) -> bool:
    end = time.time() + limit
    while time.time() < end:
        if cpu_idle_fraction() >= 0.85:
            return True
    return False


def run_once(tree: str, paths: list[str], out: str, idle_wait: float = 0.0) -> dict:
    remove(out)
    warm(paths)
    idle = wait_idle(idle_wait) if idle_wait > 0 else None
    env = dict(os.environ, PYTHONPATH=tree)
    r = subprocess.run([sys.executable, "-c", _CHILD, *paths, out], capture_output=True, text=True, cwd=tree, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: {r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if not os.path.realpath(res["fastsoup"]).startswith(os.path.realpath(tree) + os.sep):
        raise RuntimeError(f"{tree}: imported fastsoup from {res['fastsoup']}")
    res["idle_before"] = idle
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
    ap.add_argument("--out-dir", help="where the outputs are written (default: --data)")
    ap.add_argument("--idle-wait", type=float, default=0.0, help="seconds to wait for idle CPUs before each run")
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
    cpu = {name: [] for name, _ in trees}
    not_idle = 0
    outs = {name: os.path.join(args.out_dir or args.data, f"compare-{name}.safetensors") for name, _ in trees}
    for r in range(args.runs):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            res = run_once(path, paths, outs[name], args.idle_wait)
            raw[name].append(res["seconds"])
            cpu[name].append(res["cpu_seconds"])
            not_idle += res["idle_before"] is False
            print(f"round {r + 1} {name}: {res['seconds']:.3f} s, CPU {res['cpu_seconds']:.3f} s ({res['isa']}"
                  f"{', machine not idle' if res['idle_before'] is False else ''})", flush=True)
    results = {"config": cfg.name, "dtype": args.dtype, "k": args.k, "input_bytes": in_bytes, "runs": args.runs,
               "out_dir": args.out_dir or args.data, "idle_wait": args.idle_wait, "runs_not_idle": not_idle,
               "load_average_end": os.getloadavg(), "trees": {}}
    base = statistics.median(raw[trees[0][0]])
    print()
    base_cpu = statistics.median(cpu[trees[0][0]])
    print("| tree | median s | min s | GB/s of input (median) | vs first | CPU s (median) | CPU vs first | runs (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, path in trees:
        med, cmed = statistics.median(raw[name]), statistics.median(cpu[name])
        results["trees"][name] = {"path": path, "median_seconds": med, "min_seconds": min(raw[name]),
                                  "seconds": raw[name], "median_cpu_seconds": cmed, "cpu_seconds": cpu[name]}
        print(f"| {name} | {med:.3f} | {min(raw[name]):.3f} | {in_bytes / med / 1e9:.2f} | {med / base - 1:+.1%} | "
              f"{cmed:.3f} | {cmed / base_cpu - 1:+.1%} | " + ", ".join(f"{t:.3f}" for t in raw[name]) + " |")
    if args.idle_wait > 0:
        print(f"{not_idle} of {len(trees) * args.runs} runs started without an idle second within {args.idle_wait:g} s")
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
