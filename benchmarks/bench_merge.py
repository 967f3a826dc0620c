"""The CPU engine's benchmark: fastsoup against the I/O bound and the naive torch recipe, side by
side in one run (median of --runs runs; every contender in a fresh process of its own).

    python -m benchmarks.bench_merge [--config vit-l14] [--k 8] [--runs 5] [--cold] [--json FILE]

Contenders (hot page cache unless --cold, which drops the page cache before every run; needs root):
  bound               cat of every input to /dev/null + writing a buffer of the output's size to a new file
  naive safetensors   load_file each input, acc += t.float(), divide, cast, save_file
  naive torch.load    the same from .bin files (torch.load), and with torch.load(mmap=True)
  fastsoup API        fastsoup.average(paths, out=...) (timed inside the process)
  fastsoup CLI        `fastsoup average IN... -o OUT` as a whole process (interpreter start included)
Also: peak RSS against K (2, 8, 16), the in-memory drop-in against the dict comprehension, and the
kernel alone against the machine's memory-read bandwidth (through the public fastsoup.weighted_sum,
which allocates its 128 MB output every call: about half the GB/s of the kernel writing into a
reused output, measured side by side). Correctness is checked after timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from .harness import drop_caches, machine, nbytes, remove, rounds, timed, write_json
from .merge import max_ulp_diff, run_bound, run_cli, run_contender


def add_rows(rows, cache, table, in_bytes):
    # The stricter of the two bounds: one `cat` after another, or all inputs read concurrently.
    bound = min(table["bound"]["seconds"], table.get("bound_parallel", table["bound"])["seconds"])
    naive = table["naive_safetensors"]["seconds"]
    for name in ("bound", "bound_parallel", "fastsoup_api", "fastsoup_cli", "naive_safetensors", "naive_torch_load", "naive_torch_load_mmap"):
        if name in table:
            r = table[name]
            rows.append((name, cache, r["seconds"], min(r["runs"]), in_bytes / r["seconds"] / 1e9, r["seconds"] / bound,
                         naive / r["seconds"], r.get("maxrss_mb")))


def kernel_alone(runs):
    """K = 8 fp16 tensors of 64 Mi elements in memory through ``fastsoup.weighted_sum`` (the public
    API: one-tensor state dicts, so the 128 MB output is allocated by each call), against the
    machine's memory-read bandwidth (``torch.sum`` of 1 GB)."""
    import torch

    import fastsoup

    n = 64 << 20  # 8 inputs x 128 MB of fp16
    xs = [torch.randn(n, dtype=torch.float32).half() for _ in range(8)]
    sds = [{"t": x} for x in xs]
    t_kernel, _ = timed(lambda: fastsoup.weighted_sum(sds, [0.125] * 8, progress=False), runs)
    kernel = 8 * n * 2 / t_kernel / 1e9
    big = torch.cat([x.view(torch.float32) for x in xs])  # 1 GB, summed: the memory-read bandwidth
    t_read, _ = timed(big.sum, runs)
    read = big.numel() * 4 / t_read / 1e9
    return {"kernel_gbps": kernel, "memory_read_gbps": read}


def in_memory(paths, runs):
    import torch

    import fastsoup

    from ._contenders import load_safetensors

    sds = [load_safetensors(p) for p in paths]
    n = len(sds)

    def naive():
        return {k: (sum(sd[k].float() for sd in sds) / n).to(sds[0][k].dtype) for k in sds[0]}

    def fast():
        return fastsoup.average(sds, progress=False)

    t_naive, t_fast = [], []
    for _ in range(runs):  # interleaved; the last round's results are compared after timing
        t0 = time.perf_counter(); a = naive(); t_naive.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); b = fast(); t_fast.append(time.perf_counter() - t0)
    worst = 0
    for k in a:
        d = (a[k].view(torch.int16).int() - b[k].view(torch.int16).int()).abs().max().item() if a[k].numel() else 0
        worst = max(worst, d)
    return {"naive_seconds": statistics.median(t_naive), "fastsoup_seconds": statistics.median(t_fast),
            "speedup": statistics.median(t_naive) / statistics.median(t_fast), "max_ulp": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vit-l14")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--data", default="/tmp/fastsoup-bench")
    ap.add_argument("--shard-size", default="250MB", help="shard size of the generated inputs")
    ap.add_argument("--cold", action="store_true", help="also measure with the page cache dropped before each run")
    ap.add_argument("--rss-k", type=int, nargs="*", default=[2, 8, 16], help="K values for the peak-RSS scan")
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to skip: naive_bin, in_memory, kernel, rss")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)

    import torch

    from .checkpoints import CONFIGS, make_zoo

    cfg = CONFIGS[args.config]
    kmax = max([args.k, *args.rss_k])
    mach = machine()
    print(f"# {cfg.name} ({cfg.params / 1e6:.0f}M params, fp16), K={args.k}, median of {args.runs}; machine: "
          f"{mach['cpu']}, {mach['nproc']} CPUs", flush=True)
    zoo = make_zoo(os.path.join(args.data, f"{args.config}-sharded"), args.config, kmax, torch.float16, "sharded",
                   shard_size=args.shard_size)
    paths = zoo[: args.k]
    bins = None
    if "naive_bin" not in args.skip:
        bins = make_zoo(os.path.join(args.data, f"{args.config}-bin"), args.config, args.k, torch.float16, "bin")
    out = os.path.join(args.data, "out.safetensors")
    in_bytes = nbytes(paths)
    out_size = cfg.params * 2
    results = {"config": cfg.name, "k": args.k, "input_bytes": in_bytes, "output_bytes": out_size, "runs": args.runs,
               "machine": mach}

    # Runs are interleaved (one of each contender per round) so that drift in the machine's load
    # affects every contender alike; medians per contender.
    fast_out = out + ".fastsoup.safetensors"
    hot_fns = {
        "bound": lambda: run_bound(paths, out, out_size, False),
        "bound_parallel": lambda: run_bound(paths, out, out_size, False, parallel=True),
        "fastsoup_api": lambda: run_contender("fastsoup_api", paths, out, False),
        "fastsoup_cli": lambda: run_cli(paths, out, False),
        "naive_safetensors": lambda: run_contender("naive_safetensors", paths, out, False),
    }
    if bins:
        hot_fns["naive_torch_load"] = lambda: run_contender("naive_torch_load", bins, out, False)
        hot_fns["naive_torch_load_mmap"] = lambda: run_contender("naive_torch_load_mmap", bins, out, False)
    hot, _ = rounds(hot_fns, args.runs)
    hot["import_fastsoup"] = rounds({"i": lambda: run_contender("import_fastsoup", paths, out, False)}, 3)[0]["i"]
    # Correctness after timing: fastsoup's file against the naive recipe's.
    remove(fast_out)
    run_contender("fastsoup_api", paths, fast_out, False)
    run_contender("naive_safetensors", paths, out, False)
    results["max_ulp_vs_naive"] = max_ulp_diff(fast_out, out)
    results["hot"] = hot
    rows = []
    for cache, table in (("hot", hot),):
        add_rows(rows, cache, table, in_bytes)

    if args.cold:
        if not drop_caches():
            print("(cannot drop the page cache here: no cold runs)")
        else:
            cold, _ = rounds({
                "bound": lambda: run_bound(paths, out, out_size, True),
                "bound_parallel": lambda: run_bound(paths, out, out_size, True, parallel=True),
                "fastsoup_api": lambda: run_contender("fastsoup_api", paths, out, True),
                "fastsoup_cli": lambda: run_cli(paths, out, True),
                "naive_safetensors": lambda: run_contender("naive_safetensors", paths, out, True),
            }, args.runs)
            results["cold"] = cold
            add_rows(rows, "cold", cold, in_bytes)

    if "rss" not in args.skip:
        base = hot["import_fastsoup"]["maxrss_mb"]
        one = nbytes(zoo[:1]) / 1e6
        results["rss"] = {"import_fastsoup_mb": base, "one_ingredient_mb": one, "budget_mb": base + 0.25 * one + 256}
        for k in args.rss_k:
            r = rounds({"k": lambda: run_contender("fastsoup_api", zoo[:k], out, False)}, 3)[0]["k"]
            results["rss"][f"k{k}_mb"] = r["maxrss_mb"]
            results["rss"][f"k{k}_seconds"] = r["seconds"]
    if "kernel" not in args.skip:
        results["kernel"] = kernel_alone(args.runs)
    if "in_memory" not in args.skip:
        results["in_memory"] = in_memory(paths, args.runs)
    remove(out)
    remove(fast_out)

    print()
    print("| contender | cache | seconds (median) | min | GB/s of input | × best bound | speed-up vs naive | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, cache, s, smin, gbps, xb, sp, rss in rows:
        print(f"| {name} | {cache} | {s:.3f} | {smin:.3f} | {gbps:.1f} | {xb:.2f} | {sp:.1f}× | {'' if rss is None else f'{rss:.0f}'} |")
    if "rss" in results:
        r = results["rss"]
        print("\npeak RSS of fastsoup.average by K (MB): " + ", ".join(f"K={k}: {r[f'k{k}_mb']:.0f}" for k in args.rss_k)
              + f"; budget (import {r['import_fastsoup_mb']:.0f} + 0.25 × {r['one_ingredient_mb']:.0f} + 256) = {r['budget_mb']:.0f}")
    if "kernel" in results:
        k = results["kernel"]
        print(f"kernel alone (K=8 fp16 in memory, fastsoup.weighted_sum: output allocation included): "
              f"{k['kernel_gbps']:.1f} GB/s of input; memory read (torch sum): "
              f"{k['memory_read_gbps']:.1f} GB/s")
    if "in_memory" in results:
        m = results["in_memory"]
        print(f"in memory: fastsoup.average(state_dicts) {m['fastsoup_seconds']:.3f} s vs dict comprehension "
              f"{m['naive_seconds']:.3f} s: {m['speedup']:.1f}× (max difference {m['max_ulp']} ulp)")
    print(f"fastsoup file output vs naive: max difference {results['max_ulp_vs_naive']} ulp")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
