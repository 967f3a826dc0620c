"""The merge suite's cases (benchmarks.run): which models, dtypes and K each suite measures, the
checkpoints they read (generated once, kept in the working folder), and the runs of one case (every
contender, interleaved rounds, ratios, correctness after timing) and of the scaling in K."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from ..harness import nbytes, remove, rounds
from ..merge import max_ulp_diff, mergekit_config, run_bound, run_cli, run_contender, run_mergekit

SHARD_SIZE = {"vit-s16": "32MB", "vit-b16": "100MB", "vit-l14": "250MB", "vit-g14": "1GB"}
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
BIN_CONTENDERS = {"fastsoup_bin", "naive_torch_load", "naive_torch_load_mmap", "mergekit"}  # they read the .bin files


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
    from ..checkpoints import CONFIGS, make_zoo

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
# Runs


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
    """Every contender of one case in interleaved rounds, then the outputs compared (max ulp)."""
    from ..checkpoints import CONFIGS

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
    table, loads = rounds(fns, runs, limit=limit, on_round=lambda i: state.update(round=i), verbose=True)
    add_ratios(table, lambda name: sizes["bin"] if name in BIN_CONTENDERS else sizes["sharded"])

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
    from ..checkpoints import CONFIGS

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
    table, loads = rounds(fns, runs, verbose=True)
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
