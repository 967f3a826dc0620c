"""Two builds of fastsoup side by side on the same merge: before/after figures of an engine change.

    python -m benchmarks.bench_builds --before /tmp/fs-base --after . [--config vit-l14] [--k 8]
           [--dtype fp16] [--runs 9] [--json FILE]

Each source tree must have its native core built in place (``python setup.py build_ext --inplace``).
Every run is a fresh process with ``PYTHONPATH`` set to its tree, timing ``fastsoup.average(paths,
out=...)`` inside the process (imports excluded); hot page cache (the inputs are read once with
``cat`` before every run, after the outputs of earlier runs are removed and ``sync`` has written
back what was dirty); the two builds alternate run by run, so load from elsewhere on the
machine lands on both alike. Prints the median, min and spread of each, and the ratio of medians.
The outputs of the two builds are compared bit for bit after timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = """
import json, sys, time
import fastsoup
paths, out = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
fastsoup.average(paths, out=out)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "file": fastsoup.__file__}))
"""


def files_of(paths):
    out = []
    for p in paths:
        out += sorted(os.path.join(p, f) for f in os.listdir(p)) if os.path.isdir(p) else [p]
    return out


def one_run(tree, paths, out, outs):
    for o in outs:  # no output of an earlier run left to write back while this one runs
        shutil.rmtree(o, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    subprocess.run(["cat", *files_of(paths)], stdout=subprocess.DEVNULL, check=True)  # hot page cache
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), out], capture_output=True, text=True,
                       env=env, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if not res["file"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"{tree}: fastsoup was imported from {res['file']}, not from this tree")
    return res["seconds"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="source tree of the baseline build")
    ap.add_argument("--after", default=ROOT, help="source tree of the new build (default: this one)")
    ap.add_argument("--config", default="vit-l14")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--data", default="/tmp/fastsoup-bench-builds")
    ap.add_argument("--shard-size", default="250MB")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args(argv)

    import torch

    from .checkpoints import make_zoo

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    paths = make_zoo(os.path.join(args.data, f"{args.config}-{args.dtype}-sharded"), args.config, args.k, dtype,
                     "sharded", shard_size=args.shard_size)
    in_bytes = sum(os.path.getsize(f) for f in files_of(paths))
    outs = {"before": os.path.join(args.data, "out-before"), "after": os.path.join(args.data, "out-after")}
    trees = {"before": args.before, "after": args.after}
    times = {"before": [], "after": []}
    for i in range(args.runs):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for name in order:
            times[name].append(one_run(trees[name], paths, outs[name], outs.values()))
        print(f"round {i + 1}: before {times['before'][-1]:.3f} s, after {times['after'][-1]:.3f} s", file=sys.stderr)

    from .bench_merge import max_ulp_diff  # noqa: E402  (imports fastsoup from this tree: after timing)

    for name in ("before", "after"):  # the last outputs of both, for the comparison
        one_run(trees[name], paths, outs[name], [outs[name]])
    same = max_ulp_diff(outs["before"], outs["after"])
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "command": "python -m benchmarks.bench_builds " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": args.config, "k": args.k, "dtype": args.dtype, "input_bytes": in_bytes, "runs": args.runs,
        "before": {"tree": os.path.abspath(args.before), "seconds": times["before"], "median": med["before"]},
        "after": {"tree": os.path.abspath(args.after), "seconds": times["after"], "median": med["after"]},
        "after_over_before": med["after"] / med["before"],
        "max_ulp_difference_of_outputs": same,
    }
    print(f"{args.config} K={args.k} {args.dtype}, {in_bytes / 1e9:.2f} GB in, hot cache, {args.runs} runs each "
          "(alternating)")
    for name in ("before", "after"):
        t = times[name]
        print(f"  {name:<7} median {med[name]:.3f} s  min {min(t):.3f}  max {max(t):.3f}  "
              f"{in_bytes / med[name] / 1e9:.2f} GB/s")
    print(f"  after / before (medians): {result['after_over_before']:.3f}; outputs differ by at most {same} ulp")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
