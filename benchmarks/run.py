"""The merge benchmark suite: fastsoup against the read bound, the naive torch recipes and mergekit,
side by side in one run, on generated ViT-like checkpoints.

    python -m benchmarks.run [--suite quick|full] [--out benchmarks/RESULTS.md] [--workdir DIR] [--clean]

Suites (hot page cache: every input is re-read with `cat` right before every run; every contender
runs in a fresh process of its own; rounds are interleaved, one run of every contender per round;
medians, with the minimum beside them):
  quick  ViT-S/16 fp16 (sharded safetensors and torch .bin) and bf16 (sharded), K = 4; K = 2, 4, 8 on
         ViT-S/16 fp16; median of 3; under 2 minutes on a 2-vCPU machine (fastsoup from .bin files and
         mergekit: full suite only).
  full   ViT-B/16 and ViT-L/14, fp16 and bf16, K = 8, sharded safetensors, and torch .bin (all but
         ViT-L bf16; mergekit's linear merge on the fp16 ones); K = 2, 4, 8, 16, 32 on ViT-B/16 fp16;
         the ViT-G/14 scale: K = 4 x 3.7 GB fp16 sharded, fastsoup against the naive recipe; median of
         5 (of 3 for the naive recipe on ViT-G: 20-50 s a run). About 25 minutes on a 2-vCPU machine, ~39 GB of generated checkpoints (made once,
         kept in --workdir; --clean deletes them).

Contenders:
  bound                  `cat` of every input file to /dev/null + writing a buffer of the output's size
  bound_parallel         the same with all inputs read concurrently; "x bound" is against the faster one
  fastsoup               fastsoup.average(paths, out=...), sharded safetensors in (timed in the process)
  fastsoup (.bin)        the same from the torch .bin files
  fastsoup CLI           `fastsoup average IN... -o OUT`, the whole process (interpreter start included)
  fastsoup CUDA          fastsoup.average(..., device="cuda"), when fastsoup.native_info() says CUDA is there
  naive safetensors      load_file each input, acc += t.float(), divide, cast, save_file (torch's
                         default threads; and "1 thread": the same after torch.set_num_threads(1), which
                         is far faster when another process keeps a CPU busy; "vs naive" is against the
                         faster of the two)
  naive torch.load       the same from .bin files with torch.load, and with torch.load(mmap=True)
  mergekit linear        `mergekit-pytorch` with a `linear` config on the .bin files, the whole process
                         (when mergekit-pytorch is found: --mergekit-pytorch, PATH, /tmp/mkvenv/bin)
Correctness after timing: fastsoup's output against the naive recipe's (and mergekit's), max ulp.

Writes the Markdown between <!-- benchmarks.run:begin --> and <!-- benchmarks.run:end --> in --out
(markers appended if missing; nothing else in the file is touched), and benchmarks/results/suite-SUITE
.json/.md/.png (raw figures, the same Markdown, and the plot of throughput and peak RSS against K).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from .bench_merge import HERE, ROOT, input_files, max_ulp_diff, nbytes, prepare, remove, run_bound, run_contender

BEGIN, END = "<!-- benchmarks.run:begin -->", "<!-- benchmarks.run:end -->"
RESULTS_DIR = os.path.join(HERE, "results")
DEFAULT_WORKDIR = "/tmp/fastsoup-suite"
SHARD_SIZE = {"vit-s16": "32MB", "vit-b16": "100MB", "vit-l14": "250MB", "vit-g14": "1GB"}
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
LABEL = {
    "bound": "bound (`cat` + write)",
    "bound_parallel": "bound, concurrent reads",
    "fastsoup": "**fastsoup**",
    "fastsoup_bin": "**fastsoup** (.bin in)",
    "fastsoup_cli": "**fastsoup CLI** (whole process)",
    "fastsoup_cuda": "**fastsoup CUDA**",
    "naive_safetensors": "naive safetensors",
    "naive_safetensors_1t": "naive safetensors, 1 thread",
    "naive_torch_load": "naive torch.load (.bin)",
    "naive_torch_load_mmap": "naive torch.load(mmap=True) (.bin)",
    "mergekit": "mergekit linear (.bin, whole process)",
}


@dataclass
class Case:
    config: str
    dtype: str
    k: int
    bin: bool = True  # also the torch .bin contenders
    mergekit: bool = False
    fastsoup_bin: bool = True  # fastsoup from the .bin files too


@dataclass
class Suite:
    runs: int
    cases: list
    scaling: tuple  # (config, dtype, [K...])
    giant: Case | None = None
    giant_runs: dict = field(default_factory=dict)  # contender -> runs, where fewer than `runs`


SUITES = {
    "quick": Suite(runs=3,
                   cases=[Case("vit-s16", "fp16", 4, fastsoup_bin=False), Case("vit-s16", "bf16", 4, bin=False)],
                   scaling=("vit-s16", "fp16", [2, 4, 8])),
    "full": Suite(runs=5,
                  cases=[Case("vit-b16", "fp16", 8, mergekit=True), Case("vit-b16", "bf16", 8),
                         Case("vit-l14", "fp16", 8, mergekit=True), Case("vit-l14", "bf16", 8, bin=False)],
                  scaling=("vit-b16", "fp16", [2, 4, 8, 16, 32]),
                  giant=Case("vit-g14", "fp16", 4, bin=False),
                  giant_runs={"naive_safetensors": 3, "naive_safetensors_1t": 3}),
}


# ---------------------------------------------------------------------------------------------------
# Data


def torch_dtype(tag):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[tag]


def zoo_folder(workdir, config, dtype, fmt):
    return os.path.join(workdir, f"{config}-{dtype}-{fmt}")


def zoo_needs(suite: Suite):
    """{(config, dtype, fmt): K} of every checkpoint set the suite reads."""
    need = {}

    def add(key, k):
        need[key] = max(need.get(key, 0), k)

    cfg, dt, ks = suite.scaling
    add((cfg, dt, "sharded"), max(ks))
    for c in suite.cases + ([suite.giant] if suite.giant else []):
        add((c.config, c.dtype, "sharded"), c.k)
        if c.bin:
            add((c.config, c.dtype, "bin"), c.k)
    return need


def existing(folder, config, dtype, k, fmt):
    suffix = {"sharded": "", "bin": ".bin"}[fmt]
    return [os.path.exists(os.path.join(folder, f"{config}-{dtype}-{i:02d}{suffix}")) for i in range(k)]


def make_data(workdir, suite: Suite):
    """Generates what is missing (checkpoints.make_zoo; kept for the next run). Checks the free disk
    space first."""
    from .checkpoints import CONFIGS, make_zoo

    need = zoo_needs(suite)
    missing = 0
    for (config, dtype, fmt), k in need.items():
        have = existing(zoo_folder(workdir, config, dtype, fmt), config, dtype, k, fmt)
        missing += have.count(False) * CONFIGS[config].params * DTYPE_BYTES[dtype]
    os.makedirs(workdir, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    outputs = max(CONFIGS[c.config].params for c in suite.cases + ([suite.giant] if suite.giant else [])) * 2 * 3
    if missing + outputs > free - (2 << 30):
        raise SystemExit(f"not enough disk space in {workdir}: {missing / 1e9:.1f} GB of checkpoints to generate "
                         f"+ {outputs / 1e9:.1f} GB of outputs, {free / 1e9:.1f} GB free")
    if missing:
        print(f"generating {missing / 1e9:.1f} GB of checkpoints in {workdir} (kept for later runs)", flush=True)
    zoos = {}
    for (config, dtype, fmt), k in need.items():
        t0 = time.perf_counter()
        folder = zoo_folder(workdir, config, dtype, fmt)
        fresh = not all(existing(folder, config, dtype, k, fmt))
        zoos[(config, dtype, fmt)] = make_zoo(folder, config, k, torch_dtype(dtype), fmt,
                                              shard_size=SHARD_SIZE[config] if fmt == "sharded" else None)
        if fresh:
            print(f"  {config} {dtype} {fmt} x{k}: {time.perf_counter() - t0:.0f} s", flush=True)
    return zoos


# ---------------------------------------------------------------------------------------------------
# Contenders beyond bench_merge's


def run_peak(cmd, paths, cold=False):
    """A whole process, through benchmarks._peak (its own wall time and peak RSS)."""
    prepare(paths, cold)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "benchmarks._peak", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    return res


def fastsoup_cmd():
    exe = os.path.join(os.path.dirname(sys.executable), "fastsoup")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "fastsoup"]


def run_cli(paths, out):
    remove(out)
    return run_peak([*fastsoup_cmd(), "average", *paths, "-o", out, "--no-progress"], paths)


def find_mergekit(explicit):
    for c in (explicit, shutil.which("mergekit-pytorch"), "/tmp/mkvenv/bin/mergekit-pytorch"):
        if c and os.path.exists(c):
            return c
    return None


def mergekit_version(exe):
    py = os.path.join(os.path.dirname(exe), "python")
    try:
        r = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def mergekit_config(path, inputs):
    with open(path, "w") as f:
        f.write("merge_method: linear\nmodels:\n")
        for p in inputs:
            f.write(f"  - model: {p}\n    parameters:\n      weight: 1.0\n")
    return path


def run_mergekit(exe, config, inputs, out):
    remove(out)
    return run_peak([exe, config, out, "--quiet"], inputs)


# ---------------------------------------------------------------------------------------------------
# Rounds and figures


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def rounds(fns, runs, limit=None, on_round=None):
    """One run of every contender per round, `runs` rounds (a contender in `limit` only in its first
    limit[name] rounds); per contender: the median of every figure, the minimum and the raw runs.
    on_round(i) is called before round i."""
    limit = limit or {}
    raw = {name: [] for name in fns}
    loads = [loadavg()]
    for i in range(runs):
        if on_round:
            on_round(i)
        for name, fn in fns.items():
            if i < limit.get(name, runs):
                raw[name].append(fn())
        loads.append(loadavg())
        print(f"    round {i + 1}/{runs} done (load average {loads[-1]:.1f})", flush=True)
    out = {}
    for name, results in raw.items():
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and k != "pid"]
        out[name] = {k: statistics.median(r[k] for r in results) for k in keys}
        out[name]["min_seconds"] = min(r["seconds"] for r in results)
        out[name]["runs"] = [r["seconds"] for r in results]
        if "maxrss_mb" in keys:
            out[name]["maxrss_runs"] = [r["maxrss_mb"] for r in results]
    out["_loadavg"] = loads
    return out


def add_ratios(table, bytes_of):
    """GB/s of input, x the stricter bound, speed-up against naive safetensors."""
    bound = min(table[b]["seconds"] for b in ("bound", "bound_parallel") if b in table)
    naive = min(table[n]["seconds"] for n in ("naive_safetensors", "naive_safetensors_1t") if n in table)
    for name, r in table.items():
        r["input_bytes"] = bytes_of(name)
        r["gbps"] = r["input_bytes"] / r["seconds"] / 1e9
        r["x_bound"] = r["seconds"] / bound
        r["vs_naive"] = naive / r["seconds"]


def bench_case(case: Case, zoos, workdir, runs, mk_exe, cuda, limit=None):
    from .checkpoints import CONFIGS

    cfg = CONFIGS[case.config]
    paths = zoos[(case.config, case.dtype, "sharded")][: case.k]
    bins = zoos[(case.config, case.dtype, "bin")][: case.k] if case.bin else None
    out = os.path.join(workdir, "out.safetensors")
    out_size = cfg.params * DTYPE_BYTES[case.dtype]
    sizes = {"sharded": nbytes(paths), "bin": nbytes(bins) if bins else 0}
    # Correctness is checked on the soups of the last timed round (kept; earlier rounds' are deleted
    # after each run); outputs of 1 GB or more are deleted after every run and made again after
    # timing, so they do not take page cache from the inputs during the rounds.
    fast_out = os.path.join(workdir, "out-fastsoup.safetensors")
    naive_out = os.path.join(workdir, "out-naive.safetensors")
    cuda_out = os.path.join(workdir, "out-cuda.safetensors")
    mk_out = os.path.join(workdir, "out-mergekit")
    keep_small = out_size < 1e9
    state = {"round": 0}

    def kept(name, fn, path):
        last = min(runs, (limit or {}).get(name, runs)) - 1

        def run():
            r = fn()
            if not (keep_small and state["round"] == last):
                remove(path)
            return r
        return run

    fns = {
        "bound": lambda: run_bound(paths, out, out_size, False),
        "bound_parallel": lambda: run_bound(paths, out, out_size, False, parallel=True),
        "fastsoup": kept("fastsoup", lambda: run_contender("fastsoup_api", paths, fast_out, False), fast_out),
    }
    if bins and case.fastsoup_bin:
        fns["fastsoup_bin"] = lambda: run_contender("fastsoup_api", bins, out, False)
    fns["fastsoup_cli"] = lambda: run_cli(paths, out)
    if cuda:
        fns["fastsoup_cuda"] = kept("fastsoup_cuda", lambda: run_contender("fastsoup_cuda", paths, cuda_out, False), cuda_out)
    fns["naive_safetensors"] = kept("naive_safetensors", lambda: run_contender("naive_safetensors", paths, naive_out, False),
                                    naive_out)
    fns["naive_safetensors_1t"] = lambda: run_contender("naive_safetensors_1t", paths, out, False)
    if bins:
        fns["naive_torch_load"] = lambda: run_contender("naive_torch_load", bins, out, False)
        fns["naive_torch_load_mmap"] = lambda: run_contender("naive_torch_load_mmap", bins, out, False)
    if mk_exe and case.mergekit and bins:
        mk_cfg = mergekit_config(os.path.join(workdir, "linear.yml"), bins)
        fns["mergekit"] = kept("mergekit", lambda: run_mergekit(mk_exe, mk_cfg, bins, mk_out), mk_out)
    bin_names = {"fastsoup_bin", "naive_torch_load", "naive_torch_load_mmap", "mergekit"}
    table = rounds(fns, runs, limit, on_round=lambda i: state.update(round=i))
    loads = table.pop("_loadavg")
    add_ratios(table, lambda name: sizes["bin"] if name in bin_names else sizes["sharded"])

    # Correctness, after timing: fastsoup's soup against the naive recipe's, mergekit's and CUDA's.
    remove(out)
    if not keep_small:
        run_contender("fastsoup_api", paths, fast_out, False)
        run_contender("naive_safetensors", paths, naive_out, False)
        if cuda:
            run_contender("fastsoup_cuda", paths, cuda_out, False)
    check = {"fastsoup_vs_naive_ulp": max_ulp_diff(fast_out, naive_out)}
    if "mergekit" in table:
        if not keep_small:
            run_mergekit(mk_exe, mk_cfg, bins, mk_out)
        check["fastsoup_vs_mergekit_ulp"] = max_ulp_diff(fast_out, mk_out)
    if cuda:
        check["cuda_vs_cpu_ulp"] = max_ulp_diff(fast_out, cuda_out)
    for p in (out, fast_out, naive_out, cuda_out, mk_out):
        remove(p)
    return {"case": asdict(case), "params": cfg.params, "model": cfg.name, "input_bytes": sizes,
            "output_bytes": out_size, "runs": runs, "limit": limit or {}, "table": table, "check": check,
            "loadavg": loads}


def bench_scaling(config, dtype, ks, zoos, workdir, runs, given=None):
    """bound, fastsoup and naive safetensors (default threads and 1 thread) for every K; `given`: {K: table} of K values measured
    already (a side-by-side case of the same model, dtype and K), reused instead of measured again."""
    from .checkpoints import CONFIGS

    cfg = CONFIGS[config]
    zoo = zoos[(config, dtype, "sharded")]
    out = os.path.join(workdir, "out.safetensors")
    out_size = cfg.params * DTYPE_BYTES[dtype]
    given = given or {}
    fns = {}
    for k in ks:
        if k in given:
            continue
        paths = zoo[:k]
        fns[f"k{k}:bound"] = lambda p=paths: run_bound(p, out, out_size, False)
        fns[f"k{k}:fastsoup"] = lambda p=paths: run_contender("fastsoup_api", p, out, False)
        fns[f"k{k}:naive_safetensors"] = lambda p=paths: run_contender("naive_safetensors", p, out, False)
        fns[f"k{k}:naive_safetensors_1t"] = lambda p=paths: run_contender("naive_safetensors_1t", p, out, False)
    table = rounds(fns, runs)
    loads = table.pop("_loadavg")
    remove(out)
    rows = []
    for k in ks:
        b = nbytes(zoo[:k])
        row = {"k": k, "input_bytes": b}
        for name in ("bound", "fastsoup", "naive_safetensors", "naive_safetensors_1t"):
            r = given[k][name] if k in given else table[f"k{k}:{name}"]
            row[name] = {"seconds": r["seconds"], "min_seconds": r["min_seconds"], "gbps": b / r["seconds"] / 1e9,
                         "maxrss_mb": r.get("maxrss_mb"), "runs": r["runs"]}
        row["from_side_by_side"] = k in given
        rows.append(row)
    return {"model": cfg.name, "config": config, "dtype": dtype, "runs": runs, "rows": rows, "loadavg": loads}


# ---------------------------------------------------------------------------------------------------
# Report


def machine():
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    import torch

    import fastsoup

    info = fastsoup.native_info()
    return {"cpu": model, "nproc": len(os.sched_getaffinity(0)), "ram_gib": mem / 2**30, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "fastsoup": info.get("version"),
            "isa": info.get("isa"), "threads": info.get("threads"), "cuda_available": bool(info.get("cuda_available"))}


def fmt_s(x):
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def fmt_rss(x):
    return "" if x is None else f"{x:,.0f}"


def best_naive(t):
    """The faster of the two naive safetensors variants (default threads, 1 thread) in a table."""
    return min((n for n in ("naive_safetensors", "naive_safetensors_1t") if n in t), key=lambda n: t[n]["seconds"])


def markdown(res, png_rel, json_rel):
    m = res["machine"]
    cases = res["cases"] + ([res["giant"]] if res.get("giant") else [])
    L = [BEGIN, f"## Merge benchmark suite (`python -m benchmarks.run --suite {res['suite']}`)", ""]
    L.append(f"Command: `{res['command']}` — {res['date']}; wall time of the whole suite: {res['wall_seconds'] / 60:.1f} min "
             "(data generation included when it ran).  ")
    L.append(f"Machine: {m['cpu']}, {m['nproc']} CPUs (`nproc`), {m['ram_gib']:.1f} GiB RAM, Linux {m['kernel']}, "
             f"Python {m['python']}, torch {m['torch']}, fastsoup {m['fastsoup']} ({m['isa']}, {m['threads']} threads).  ")
    L.append("CUDA: " + ("available: the fastsoup CUDA rows ran on it" if m["cuda_available"] else "not available on this machine")
             + ".  ")
    L.append("mergekit: " + res["mergekit"] + ".  ")
    L.append(f"Raw figures: [`{json_rel}`]({json_rel}).")
    L.append("")
    L.append("Hot page cache: every input is re-read with `cat` right before every run (this VM's DAMON pages "
             "out page cache idle for about a minute). Every contender runs in a fresh process of its own; "
             "the rounds are interleaved (one run of each contender per round), so drift in the machine's load "
             "hits all alike. Seconds are medians, the minimum beside them. GB/s = input bytes / median seconds. "
             "\"× bound\" = seconds / the faster of the two bounds. The naive safetensors recipe runs twice per "
             "round: with torch's default threads and after `torch.set_num_threads(1)` (when another process keeps "
             "a CPU busy, torch's OpenMP threads wait for one another at every op and the default can be many times "
             "slower); \"vs naive\" = the faster of the two (median) / seconds. Peak RSS = the process's VmHWM "
             "(median over runs). fastsoup and the naive recipes are timed inside their process (imports before the "
             "clock); the CLI and mergekit rows are whole processes (interpreter start and imports included).")
    L.append("")
    L.append("### Headline (medians; details and minima below)")
    L.append("")
    L.append("| model, dtype, K × size | bound s | fastsoup s | fastsoup GB/s | fastsoup × bound "
             "| naive safetensors s (default / 1 thread) | fastsoup vs naive | naive torch.load s | torch.load(mmap) s "
             "| fastsoup CLI s (process) | mergekit s (process) | peak RSS MB: fastsoup / naive |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        t, case = c["table"], c["case"]
        bound = min(t[b]["seconds"] for b in ("bound", "bound_parallel") if b in t)

        def sec(name):
            if name not in t:
                return "–"
            n = len(t[name]["runs"])
            return fmt_s(t[name]["seconds"]) + (f" ({n} runs)" if n < c["runs"] else "")

        f, n = t["fastsoup"], t["naive_safetensors"]
        L.append(f"| {c['model']} {case['dtype']}, {case['k']} × {c['input_bytes']['sharded'] / case['k'] / 1e9:.2f} GB "
                 f"| {fmt_s(bound)} | **{fmt_s(f['seconds'])}** | {f['gbps']:.2f} | {f['x_bound']:.2f} "
                 f"| {sec('naive_safetensors')} / {sec('naive_safetensors_1t')} "
                 f"| **{f['vs_naive']:.1f}×** | {sec('naive_torch_load')} | {sec('naive_torch_load_mmap')} "
                 f"| {sec('fastsoup_cli')} | {sec('mergekit')} | {f['maxrss_mb']:,.0f} / {n['maxrss_mb']:,.0f} |")
    L.append("")
    L.append("### Side by side, every contender")
    L.append("")
    L.append("| model | dtype | K | input | contender | seconds (median) | min | runs | GB/s | × bound | vs naive | peak RSS (MB) |")
    L.append("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        case = c["case"]
        for name, r in c["table"].items():
            gb = r["input_bytes"] / 1e9
            fmt = ".bin" if name in ("fastsoup_bin", "naive_torch_load", "naive_torch_load_mmap", "mergekit") else "sharded st"
            L.append(f"| {c['model']} | {case['dtype']} | {case['k']} | {gb:.2f} GB {fmt} | {LABEL[name]} | "
                     f"{r['seconds']:.3f} | {r['min_seconds']:.3f} | {len(r['runs'])} | {r['gbps']:.2f} | "
                     f"{r['x_bound']:.2f} | {r['vs_naive']:.1f}× | {fmt_rss(r.get('maxrss_mb'))} |")
    L.append("")
    notes = []
    for c in cases:
        for name, n in c.get("limit", {}).items():
            notes.append(f"{c['model']} {LABEL[name]}: {n} runs (fewer than the suite's {c['runs']}: each takes long).")
    if notes:
        L += ["Fewer runs: " + " ".join(notes), ""]

    s = res["scaling"]
    L.append(f"### Scaling in K ({s['model']} {s['dtype']}, sharded safetensors; median of {s['runs']})")
    L.append("")
    L.append("| K | input GB | bound s | fastsoup s | fastsoup GB/s | fastsoup peak RSS (MB) | naive s (default / 1 thread) "
             "| naive GB/s (faster) | naive peak RSS (MB) | fastsoup vs naive | fastsoup × bound |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in s["rows"]:
        b, f, n, n1 = row["bound"], row["fastsoup"], row["naive_safetensors"], row["naive_safetensors_1t"]
        best = row[best_naive(row)]
        L.append(f"| {row['k']} | {row['input_bytes'] / 1e9:.2f} | {b['seconds']:.3f} | {f['seconds']:.3f} | {f['gbps']:.2f} | "
                 f"{fmt_rss(f['maxrss_mb'])} | {n['seconds']:.3f} / {n1['seconds']:.3f} | {best['gbps']:.2f} | "
                 f"{fmt_rss(n['maxrss_mb'])} | {best['seconds'] / f['seconds']:.1f}× | {f['seconds'] / b['seconds']:.2f} |")
    rows = s["rows"]
    reused = [str(r["k"]) for r in rows if r.get("from_side_by_side")]
    if reused:
        L.append("")
        L.append(f"K = {', '.join(reused)}: the side-by-side table's runs of the same model (not measured twice).")
    if len(rows) >= 2:
        a, z = rows[0], rows[-1]
        na, nz = a[best_naive(a)], z[best_naive(z)]
        L.append("")
        L.append(f"From K = {a['k']} to K = {z['k']} ({z['k'] / a['k']:.0f}× the input): fastsoup's time × "
                 f"{z['fastsoup']['seconds'] / a['fastsoup']['seconds']:.1f}, its peak RSS × "
                 f"{z['fastsoup']['maxrss_mb'] / a['fastsoup']['maxrss_mb']:.2f} "
                 f"({a['fastsoup']['maxrss_mb']:.0f} → {z['fastsoup']['maxrss_mb']:.0f} MB); the naive recipe's time "
                 f"(the faster variant) × {nz['seconds'] / na['seconds']:.1f}, its peak RSS × "
                 f"{z['naive_safetensors']['maxrss_mb'] / a['naive_safetensors']['maxrss_mb']:.2f}.")
    L.append("")
    L.append(f"![throughput and peak RSS against K]({png_rel})")
    L.append("")

    g = res.get("giant")
    if g:
        t = g["table"]
        f, n = t["fastsoup"], t[best_naive(t)]
        L.append(f"### {g['model']} scale (K = {g['case']['k']} × {g['input_bytes']['sharded'] / g['case']['k'] / 1e9:.2f} GB "
                 f"{g['case']['dtype']}, sharded)")
        L.append("")
        L.append(f"fastsoup: {f['seconds']:.2f} s (median of {len(f['runs'])}), peak RSS {f['maxrss_mb']:,.0f} MB; "
                 f"{LABEL[best_naive(t)]} (the faster naive variant): {n['seconds']:.2f} s (median of "
                 f"{len(n['runs'])}), peak RSS {n['maxrss_mb']:,.0f} MB ({n['seconds'] / f['seconds']:.1f}× fastsoup's time, "
                 f"{n['maxrss_mb'] / f['maxrss_mb']:.0f}× its peak RSS); bound "
                 f"{min(t['bound']['seconds'], t['bound_parallel']['seconds']):.2f} s. "
                 + (f"The inputs ({g['input_bytes']['sharded'] / 1e9:.1f} GB) plus the naive recipe's peak "
                    f"({n['maxrss_mb'] / 1e3:.1f} GB) exceed this machine's {m['ram_gib']:.1f} GiB, so the naive runs "
                    "cannot keep every input in the page cache (part of their input may come from disk)."
                    if g["input_bytes"]["sharded"] + n["maxrss_mb"] * 2**20 > m["ram_gib"] * 2**30 else ""))
        L.append("")
    loads = [(f"{c['model']} {c['case']['dtype']} K = {c['case']['k']}", c["loadavg"]) for c in cases]
    loads.append((f"scaling ({s['model']})", s["loadavg"]))
    L.append(f"Machine load: the 1-minute load average (from /proc/loadavg, before and after every round) was "
             + "; ".join(f"{n}: {min(v):.1f}–{max(v):.1f}" for n, v in loads)
             + f" on {m['nproc']} CPUs. Above {m['nproc']}, the contenders shared the CPUs with other work, which slows "
             "every row; compare rows of one table, measured in the same rounds.")
    L.append("")
    L.append("### Correctness (after timing)")
    L.append("")
    for c in cases:
        parts = [f"fastsoup vs naive {c['check']['fastsoup_vs_naive_ulp']} ulp"]
        if "fastsoup_vs_mergekit_ulp" in c["check"]:
            parts.append(f"vs mergekit {c['check']['fastsoup_vs_mergekit_ulp']} ulp")
        if "cuda_vs_cpu_ulp" in c["check"]:
            parts.append(f"CUDA vs CPU {c['check']['cuda_vs_cpu_ulp']} ulp")
        L.append(f"- {c['model']} {c['case']['dtype']} K = {c['case']['k']}: " + ", ".join(parts) + " (max over all tensors).")
    L.append("")
    L.append(END)
    return "\n".join(L) + "\n"


def write_between_markers(path, block):
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    i, j = text.find(BEGIN), text.find(END)
    if i >= 0 and j > i:
        text = text[:i] + block.rstrip("\n") + text[j + len(END):]
    else:
        text = text + ("" if text.endswith("\n") or not text else "\n") + ("\n" if text else "") + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["scaling"]
    ks = [r["k"] for r in s["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = (("fastsoup", "fastsoup", "C0", "o", "-"), ("naive_safetensors", "naive safetensors", "C3", "s", "-"),
              ("naive_safetensors_1t", "naive safetensors, 1 thread", "C1", "s", "--"),
              ("bound", "bound (cat + write)", "0.5", "^", ":"))
    for key, label, color, marker, style in series:
        kw = dict(marker=marker, color=color, label=label, linestyle=style)
        axes[0].plot(ks, [r[key]["seconds"] for r in s["rows"]], **kw)
        axes[1].plot(ks, [r[key]["gbps"] for r in s["rows"]], **kw)
        if key != "bound":
            axes[2].plot(ks, [r[key]["maxrss_mb"] for r in s["rows"]], **kw)
    titles = ("time (s)", "throughput (GB/s of input)", "peak RSS (MB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K (checkpoints merged)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle(f"{s['model']} {s['dtype']} sharded safetensors, hot page cache, median of {s['runs']} "
                 f"({res['machine']['cpu']}, {res['machine']['nproc']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), help="default: quick (with --clean alone: clean and exit)")
    ap.add_argument("--out", help="Markdown file to write the results into, between the suite's markers")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR, help="generated checkpoints (kept between runs)")
    ap.add_argument("--clean", action="store_true", help="delete --workdir (then run the suite only if --suite is given)")
    ap.add_argument("--runs", type=int, help="rounds per measurement (default: the suite's; at least 3)")
    ap.add_argument("--giant-naive-runs", type=int, help="runs of the naive recipes on the ViT-G case (full suite default: 3)")
    ap.add_argument("--mergekit-pytorch", help="mergekit's `mergekit-pytorch` (default: PATH, then /tmp/mkvenv/bin)")
    ap.add_argument("--no-mergekit", action="store_true")
    args = ap.parse_args(argv)

    if args.clean:
        if os.path.isdir(args.workdir):
            shutil.rmtree(args.workdir)
            print(f"deleted {args.workdir}")
        if args.suite is None:
            return 0
    suite_name = args.suite or "quick"
    suite = SUITES[suite_name]
    runs = args.runs or suite.runs
    if runs < 3:
        ap.error("--runs must be at least 3 (medians)")
    t_start = time.perf_counter()
    command = "python -m benchmarks.run" + ("".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    import fastsoup

    info = fastsoup.native_info()
    cuda = bool(info.get("cuda_available"))
    print("CUDA: " + ("available: fastsoup CUDA rows included" if cuda else "not available on this machine"), flush=True)
    mk_exe = None if args.no_mergekit else find_mergekit(args.mergekit_pytorch)
    want_mk = any(c.mergekit for c in suite.cases)
    if not want_mk:
        mk_note = "not in this suite (the full suite runs it)"
    elif args.no_mergekit:
        mk_note = "skipped (--no-mergekit)"
    elif mk_exe is None:
        mk_note = "not installed: skipped (install it in a venv of its own, see benchmarks/bench_mergekit.py)"
    else:
        mk_note = f"mergekit {mergekit_version(mk_exe)}, `{mk_exe}`"
    print("mergekit: " + mk_note, flush=True)

    zoos = make_data(args.workdir, suite)
    res = {"suite": suite_name, "command": command, "date": date, "machine": machine(), "mergekit": mk_note,
           "workdir": args.workdir, "cases": []}
    for case in suite.cases:
        print(f"== {case.config} {case.dtype} K={case.k}, median of {runs}", flush=True)
        res["cases"].append(bench_case(case, zoos, args.workdir, runs, mk_exe if want_mk else None, cuda))
    sc_cfg, sc_dt, sc_ks = suite.scaling
    print(f"== scaling: {sc_cfg} {sc_dt} K={sc_ks}, median of {runs}", flush=True)
    given = {c["case"]["k"]: c["table"] for c in res["cases"]
             if (c["case"]["config"], c["case"]["dtype"]) == (sc_cfg, sc_dt) and c["case"]["k"] in sc_ks}
    res["scaling"] = bench_scaling(sc_cfg, sc_dt, sc_ks, zoos, args.workdir, runs, given)
    if suite.giant:
        g = suite.giant
        limit = dict(suite.giant_runs)
        if args.giant_naive_runs:
            if args.giant_naive_runs < 3:
                ap.error("--giant-naive-runs must be at least 3 (medians)")
            limit = {"naive_safetensors": args.giant_naive_runs, "naive_safetensors_1t": args.giant_naive_runs}
        limit = {k: v for k, v in limit.items() if v < runs} or None
        print(f"== {g.config} {g.dtype} K={g.k}, median of {runs}" + (f" (naive: {limit['naive_safetensors']})" if limit else ""),
              flush=True)
        res["giant"] = bench_case(g, zoos, args.workdir, runs, None, cuda, limit)
    res["wall_seconds"] = time.perf_counter() - t_start

    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = os.path.join(RESULTS_DIR, f"suite-{suite_name}.json")
    png_path = os.path.join(RESULTS_DIR, f"suite-{suite_name}.png")
    md_path = os.path.join(RESULTS_DIR, f"suite-{suite_name}.md")
    plot(res, png_path)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=2)
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else RESULTS_DIR
    md = markdown(res, os.path.relpath(png_path, out_dir), os.path.relpath(json_path, out_dir))
    with open(md_path, "w") as f:
        f.write(markdown(res, os.path.basename(png_path), os.path.basename(json_path)))
    if args.out:
        write_between_markers(args.out, md)
    print()
    print(md)
    print(f"suite wall time: {res['wall_seconds']:.1f} s; wrote {json_path}, {png_path}, {md_path}"
          + (f" and {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
