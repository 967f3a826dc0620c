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
kernel alone against the machine's memory-read bandwidth. Correctness is checked after timing.
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


def warm(paths) -> None:
    """Reads the inputs once (not timed) so a hot run finds them in the page cache. Needed here:
    this VM's DAMON pages out page cache idle for about a minute, at up to 128 MB/s."""
    subprocess.run(["cat", *input_files(paths)], stdout=subprocess.DEVNULL, check=True)


def prepare(paths, cold):
    if cold:
        drop_caches()
    else:
        warm(paths)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def input_files(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p))
        else:
            out.append(p)
    return out


def nbytes(paths):
    return sum(os.path.getsize(f) for f in input_files(paths))


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def run_bound(paths, out, out_size, cold, parallel=False):
    """Reads every input file (`cat` to /dev/null; one after another, or all at once when parallel)
    and writes a buffer of the output's size to a new file."""
    buf = bytearray(b"\x01") * out_size  # real pages (not the shared zero page), touched before the clock
    remove(out)
    prepare(paths, cold)
    t0 = time.perf_counter()
    if parallel:
        procs = [subprocess.Popen(["cat", f], stdout=subprocess.DEVNULL) for f in input_files(paths)]
        for p in procs:
            p.wait()
    else:
        subprocess.run(["cat", *input_files(paths)], stdout=subprocess.DEVNULL, check=True)
    t1 = time.perf_counter()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    mv = memoryview(buf)
    for i in range(0, out_size, 16 << 20):
        os.write(fd, mv[i : i + (16 << 20)])
    os.close(fd)
    t2 = time.perf_counter()
    remove(out)
    return {"seconds": t2 - t0, "read_seconds": t1 - t0, "write_seconds": t2 - t1}


def run_contender(name, paths, out, cold):
    remove(out)
    prepare(paths, cold)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "benchmarks._contenders", name, out, *paths],
                       capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    return res


def run_cli(paths, out, cold):
    remove(out)
    prepare(paths, cold)
    exe = os.path.join(os.path.dirname(sys.executable), "fastsoup")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "fastsoup"]
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, "average", *paths, "-o", out, "--no-progress"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"fastsoup CLI failed:\n{r.stderr}")
    return {"seconds": wall, "process_seconds": wall}


def rounds(fns, runs):
    """Runs every contender once per round, `runs` rounds; per contender the median of each figure."""
    raw = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            raw[name].append(fn())
    out = {}
    for name, results in raw.items():
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and k != "pid"]
        out[name] = {k: statistics.median(r[k] for r in results) for k in keys}
        out[name]["runs"] = [r["seconds"] for r in results]
    return out


def add_rows(rows, cache, table, in_bytes):
    # The stricter of the two bounds: one `cat` after another, or all inputs read concurrently.
    bound = min(table["bound"]["seconds"], table.get("bound_parallel", table["bound"])["seconds"])
    naive = table["naive_safetensors"]["seconds"]
    for name in ("bound", "bound_parallel", "fastsoup_api", "fastsoup_cli", "naive_safetensors", "naive_torch_load", "naive_torch_load_mmap"):
        if name in table:
            r = table[name]
            rows.append((name, cache, r["seconds"], min(r["runs"]), in_bytes / r["seconds"] / 1e9, r["seconds"] / bound,
                         naive / r["seconds"], r.get("maxrss_mb")))


def max_ulp_diff(a_path, b_path):
    import torch

    import fastsoup

    ca, cb = fastsoup.open_checkpoint(a_path), fastsoup.open_checkpoint(b_path)
    worst = 0
    for name in ca:
        x, y = ca.tensor(name), cb.tensor(name)
        if x.is_floating_point():
            xi = x.view(torch.int16).int() if x.element_size() == 2 else x.view(torch.int32).long()
            yi = y.view(torch.int16).int() if y.element_size() == 2 else y.view(torch.int32).long()
            worst = max(worst, int((xi - yi).abs().max().item()) if x.numel() else 0)
    return worst


def kernel_alone(runs):
    import torch

    from fastsoup import _torch

    n = 64 << 20  # 8 inputs x 128 MB of fp16
    xs = [torch.randn(n, dtype=torch.float32).half() for _ in range(8)]
    out = torch.empty(n, dtype=torch.float16)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        _torch.weighted_sum(xs, [0.125] * 8, out=out)
        times.append(time.perf_counter() - t0)
    kernel = 8 * n * 2 / statistics.median(times) / 1e9
    big = torch.cat([x.view(torch.float32) for x in xs])  # 1 GB, summed: the memory-read bandwidth
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t0)
    read = big.numel() * 4 / statistics.median(times) / 1e9
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
    for _ in range(runs):
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
    print(f"# {cfg.name} ({cfg.params / 1e6:.0f}M params, fp16), K={args.k}, median of {args.runs}; machine: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    zoo = make_zoo(os.path.join(args.data, f"{args.config}-sharded"), args.config, kmax, torch.float16, "sharded",
                   shard_size=args.shard_size)
    paths = zoo[: args.k]
    bins = None
    if "naive_bin" not in args.skip:
        bins = make_zoo(os.path.join(args.data, f"{args.config}-bin"), args.config, args.k, torch.float16, "bin")
    out = os.path.join(args.data, "out.safetensors")
    in_bytes = nbytes(paths)
    out_size = cfg.params * 2
    results = {"config": cfg.name, "k": args.k, "input_bytes": in_bytes, "output_bytes": out_size, "runs": args.runs}

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
    hot = rounds(hot_fns, args.runs)
    hot["import_fastsoup"] = rounds({"i": lambda: run_contender("import_fastsoup", paths, out, False)}, 3)["i"]
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
            cold = rounds({
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
            r = rounds({"k": lambda: run_contender("fastsoup_api", zoo[:k], out, False)}, 3)["k"]
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
        print(f"\npeak RSS of fastsoup.average by K (MB): " + ", ".join(f"K={k}: {r[f'k{k}_mb']:.0f}" for k in args.rss_k)
              + f"; budget (import {r['import_fastsoup_mb']:.0f} + 0.25 × {r['one_ingredient_mb']:.0f} + 256) = {r['budget_mb']:.0f}")
    if "kernel" in results:
        k = results["kernel"]
        print(f"kernel alone (K=8 fp16 in memory): {k['kernel_gbps']:.1f} GB/s of input; memory read (torch sum): "
              f"{k['memory_read_gbps']:.1f} GB/s")
    if "in_memory" in results:
        m = results["in_memory"]
        print(f"in memory: fastsoup.average(state_dicts) {m['fastsoup_seconds']:.3f} s vs dict comprehension "
              f"{m['naive_seconds']:.3f} s: {m['speedup']:.1f}× (max difference {m['max_ulp']} ulp)")
    print(f"fastsoup file output vs naive: max difference {results['max_ulp_vs_naive']} ulp")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
