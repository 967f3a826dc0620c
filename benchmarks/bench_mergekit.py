"""fastsoup against mergekit (the popular LLM merging tool) on Hugging Face Llama-style folders: the
linear merge and the merge methods, each given to both tools as the same mergekit YAML config.

    python -m benchmarks.bench_mergekit [--mergekit-yaml PATH] [--methods linear ties ...] [--k 8]
                                        [--runs 5] [--mk-runs N] [--rss-k 2 4 8] [--save]

mergekit is optional and heavy (transformers, accelerate, ...): install it in a virtualenv of its
own and point --mergekit-yaml at its `mergekit-yaml` (default: the one on PATH, else
/tmp/mkvenv/bin/mergekit-yaml), e.g.
    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 && /tmp/mkvenv/bin/pip install mergekit
Without it the benchmark prints a note and exits 0.

The zoo (made once in --data, kept): a base folder (`llama-base`, the shared init) and K fine-tunes
(`llama-00`...), Llama-style (config.json from transformers' LlamaConfig in mergekit's environment;
322 M random fp16 parameters, 0.64 GB each). Each fine-tune is the init plus a task vector
0.002 * (0.5 * c + 0.866 * n_k), c shared and n_k its own (pairwise cosine of the task vectors about
0.25: Model Stock's t is not degenerate, TIES's election has a majority to find).

For every method of --methods, one config (written to --data/METHOD.yml, printed in the output) is
given to both tools: `mergekit-yaml CONFIG OUT --no-copy-tokenizer --quiet --no-write-model-card`
(DARE: `--random-seed 0`; mergekit runs on the CPU, its default) and `fastsoup merge CONFIG -o OUT
--no-progress`. Configs: linear (the K models, weight 1), task_arithmetic (base + K, weight 1/K,
lambda 0.9), ties (base + K, weight 0.5, density 0.5; normalize and lambda left to the default),
dare_ties (base + K, weight 0.5, density 0.5; rescale left to the default), slerp (llama-00 as the
base and llama-01, t per layer and kind of tensor as mergekit's gradient-slerp example), model_stock
(base + K). Each method's time is also set against fastsoup's own linear merge of the same input
files (`fastsoup merge` of a linear config over them: base + K, or the two slerp models).

Every run is a whole process (interpreter start included) on a hot page cache (the inputs `cat` right
before it), its peak RSS measured (VmHWM of the process, benchmarks/harness.py's run_peak); rounds
are interleaved (one run of every contender per round), medians of --runs (mergekit: of --mk-runs,
default --runs). Then the outputs of the last round are compared tensor by tensor: max abs
difference, max ulp, fraction of entries more than 1 ulp apart. DARE's masks come from different
RNGs, so its outputs are compared in distribution: over all tensors, the fraction of entries left at
the base and the RMS of out - base, for both tools; and a one-model dare_ties config (`dare1.yml`,
run once by each tool) gives, from the task vector d = model - base, the fraction of entries kept
(out != base, counted where |d| is at least one ulp of the base) and the mean of (out - base) / d over
the kept ones (where |d| >= 64 ulp of the base), against the density and 1 / density.
--rss-k: fastsoup's TIES alone at those K (one run each, its /proc status sampled): peak RSS, and its
anonymous and file-backed parts, against K. --fp32-check: those methods also run once by mergekit
computing in float32 (`dtype: float32`, `out_dtype: float16`; fastsoup's output is the same for both
configs: it computes in float64, its dtype is the output's), compared with fastsoup.

--save writes the output and the raw figures to benchmarks/results/mergekit-methods-llama-kK-DATE
.txt/.json and the report between <!-- bench_mergekit:begin --> and <!-- bench_mergekit:end --> in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import time

from .harness import (RESULTS_DIR, Log, command_line, fastsoup_cli, loadavg, machine, rounds, run_peak, warm,
                      write_between_markers, write_json)

LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
ZOO_VERSION = 2  # 2: a base folder and correlated task vectors (1: K perturbations of an unsaved init)
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock")
BEGIN, END = "<!-- bench_mergekit:begin -->", "<!-- bench_mergekit:end -->"
MK_FLAGS = ["--no-copy-tokenizer", "--quiet", "--no-write-model-card"]


def llama_shapes(c):
    d, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (m, d)
        shapes[p + "mlp.up_proj.weight"] = (m, d)
        shapes[p + "mlp.down_proj.weight"] = (d, m)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def make_models(folder, k, mk_python):
    """The zoo in ``folder``: ``(base path, [K model paths])``; what is missing is made (deterministic
    per index, so a larger K adds models)."""
    import torch

    import fastsoup

    os.makedirs(folder, exist_ok=True)
    base_path = os.path.join(folder, "llama-base")
    paths = [os.path.join(folder, f"llama-{i:02d}") for i in range(k)]
    marker = os.path.join(folder, "zoo.json")
    want = {"version": ZOO_VERSION, "llama": LLAMA}
    try:
        with open(marker) as f:
            same = json.load(f) == want
    except (OSError, ValueError):
        same = False
    todo = [p for p in [base_path, *paths] if not same or not os.path.exists(os.path.join(p, "config.json"))]
    if not todo:
        return base_path, paths
    cfg_dir = os.path.join(folder, "_config")
    code = ("import sys; from transformers import LlamaConfig; "
            f"LlamaConfig(**{LLAMA!r}, torch_dtype='float16', tie_word_embeddings=False, "
            "architectures=['LlamaForCausalLM']).save_pretrained(sys.argv[1])")
    subprocess.run([mk_python, "-c", code, cfg_dir], check=True)
    shapes = llama_shapes(LLAMA)
    g = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    gc = torch.Generator().manual_seed(1000)
    common = {n: torch.randn(s, generator=gc) for n, s in shapes.items()}
    for p in todo:
        if p == base_path:
            sd = {n: t.half() for n, t in init.items()}
        else:
            i = paths.index(p)
            gi = torch.Generator().manual_seed(i + 1)
            sd = {n: (t + 0.002 * (0.5 * common[n] + 0.866 * torch.randn(t.shape, generator=gi))).half()
                  for n, t in init.items()}
        print(f"  making {p}", flush=True)
        fastsoup.save(sd, p, shard_size="5GB", overwrite=True)
        shutil.copy(os.path.join(cfg_dir, "config.json"), os.path.join(p, "config.json"))
    with open(marker, "w") as f:
        json.dump(want, f)
    return base_path, paths


def configs(base, paths):
    """``{name: (YAML text, the input paths it reads)}``: the benchmark's configs."""
    k = len(paths)
    models = "".join(f"  - model: {p}\n    parameters:\n      weight: {{w}}\n" for p in paths)
    cfg = {
        "linear": ("merge_method: linear\n" + "models:\n" + models.format(w=1.0) + "dtype: float16\n", paths),
        "task_arithmetic": (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n" + models.format(w=1.0 / k)
                            + "parameters:\n  lambda: 0.9\ndtype: float16\n", [base, *paths]),
        "ties": (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                 + models.replace("weight: {w}", "weight: 0.5\n      density: 0.5")
                 + "dtype: float16\n", [base, *paths]),
        "dare_ties": (f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                      + models.replace("weight: {w}", "weight: 0.5\n      density: 0.5")
                      + "dtype: float16\n", [base, *paths]),
        "slerp": ("slices:\n  - sources:\n"
                  f"      - model: {paths[0]}\n        layer_range: [0, {LLAMA['num_hidden_layers']}]\n"
                  f"      - model: {paths[1]}\n        layer_range: [0, {LLAMA['num_hidden_layers']}]\n"
                  f"merge_method: slerp\nbase_model: {paths[0]}\nparameters:\n  t:\n"
                  "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                  "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
                  "    - value: 0.5\ndtype: float16\n", paths[:2]),
        "model_stock": (f"merge_method: model_stock\nbase_model: {base}\nmodels:\n"
                        + "".join(f"  - model: {p}\n" for p in paths) + "dtype: float16\n", [base, *paths]),
        "dare1": (f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {paths[0]}\n"
                  "    parameters:\n      weight: 1.0\n      density: 0.5\ndtype: float16\n", [base, paths[0]]),
    }
    return cfg


def linear_config(inputs):
    return ("merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n    parameters:\n      weight: 1.0\n"
                                                        for p in inputs) + "dtype: float16\n")


def ties_config(base, paths):
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {p}\n    parameters:\n      weight: 0.5\n      density: 0.5\n" for p in paths)
            + "dtype: float16\n")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def mk_cmd(exe, config, out, method):
    return [exe, config, out, *MK_FLAGS, *(["--random-seed", "0"] if method.startswith("dare") else [])]


def fs_cmd(config, out):
    return [*fastsoup_cli(), "merge", config, "-o", out, "--no-progress"]


def timed_run(cmd, out, inputs):
    """A contender: the output removed, the inputs warmed, then the whole process (seconds, peak RSS)."""
    def fn():
        shutil.rmtree(out, ignore_errors=True)
        warm(inputs)
        return run_peak(cmd)
    return fn


def _tensors(folder):
    import fastsoup

    return fastsoup.open_checkpoint(folder)


def agreement(fs_out, mk_out):
    """Tensor by tensor: max |fastsoup - mergekit| (float64), max ulp, entries more than 1 ulp apart
    (count and fraction), entries that differ at all (fraction), and tensors whose names differ."""

    from fastsoup._reference import ulp_distance

    a, b = _tensors(fs_out), _tensors(mk_out)
    names_a, names_b = set(a), set(b)
    worst_abs, worst_ulp, over1, diff, n = 0.0, 0, 0, 0, 0
    worst_name = None
    for name in sorted(names_a & names_b):
        x, y = a.tensor(name), b.tensor(name)
        if not x.is_floating_point() or not x.numel():
            continue
        if x.dtype != y.dtype:
            return {"error": f"{name}: dtypes {x.dtype} (fastsoup) and {y.dtype} (mergekit)"}
        u = ulp_distance(x, y)
        mu = int(u.max())
        if mu > worst_ulp:
            worst_ulp, worst_name = mu, name
        worst_abs = max(worst_abs, float((x.double() - y.double()).abs().max()))
        over1 += int((u > 1).sum())
        diff += int((u > 0).sum())
        n += x.numel()
    return {"max_abs": worst_abs, "max_ulp": worst_ulp, "worst_tensor": worst_name, "entries": n,
            "over_1ulp": over1, "over_1ulp_fraction": over1 / max(n, 1), "differ_fraction": diff / max(n, 1),
            "names_only_fastsoup": sorted(names_a - names_b), "names_only_mergekit": sorted(names_b - names_a)}


def dare_stats(out, base):
    """Over all float tensors: the fraction of entries equal to the base's, and the RMS of out - base."""
    o, b = _tensors(out), _tensors(base)
    same, sq, n = 0, 0.0, 0
    for name in o:
        x = o.tensor(name)
        if not x.is_floating_point() or not x.numel():
            continue
        y = b.tensor(name)
        same += int((x == y).sum())
        sq += float(((x.double() - y.double()) ** 2).sum())
        n += x.numel()
    return {"at_base_fraction": same / n, "rms_delta": math.sqrt(sq / n)}


def dare_kept(out, base, model):
    """One-model DARE: from the task vector d = model - base, the fraction of entries kept (out != base,
    where |d| >= 1 ulp of the base: there a kept entry always moves) and the mean scale (out - base) / d
    of the kept entries where |d| >= 64 ulp of the base (the scale to about 1 %)."""
    import torch

    o, b, m = _tensors(out), _tensors(base), _tensors(model)
    kept, counted, scale_sum, scale_n = 0, 0, 0.0, 0
    for name in o:
        x = o.tensor(name)
        if not x.is_floating_point() or not x.numel():
            continue
        y, z = b.tensor(name), m.tensor(name)
        d = z.double() - y.double()
        ulp = (torch.nextafter(y.abs().float(), torch.tensor(float("inf"))) - y.abs().float()).double()
        moved = x != y
        sel = d.abs() >= ulp
        kept += int((moved & sel).sum())
        counted += int(sel.sum())
        sel64 = moved & (d.abs() >= 64 * ulp)
        if sel64.any():
            scale_sum += float(((x.double() - y.double())[sel64] / d[sel64]).sum())
            scale_n += int(sel64.sum())
    return {"kept_fraction": kept / max(counted, 1), "counted": counted,
            "mean_scale": scale_sum / max(scale_n, 1), "scale_counted": scale_n}


def run_sampled(cmd, interval=0.05):
    """A whole process, its /proc status sampled every ``interval`` s: wall seconds and the largest
    VmHWM, RssAnon (anonymous memory) and RssFile (file pages mapped, e.g. the inputs' mappings: page
    cache, reclaimable) seen, in MB."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(interval)
    err = p.stderr.read().decode(errors="replace")
    if p.wait() != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "maxrss_mb": peak["VmHWM"] / 1024,
            "rss_anon_mb": peak["RssAnon"] / 1024, "rss_file_mb": peak["RssFile"] / 1024}


def find_mergekit_yaml(explicit):
    for c in (explicit, shutil.which("mergekit-yaml"), "/tmp/mkvenv/bin/mergekit-yaml"):
        if c and os.path.exists(c):
            return c
    return None


def mergekit_versions(exe):
    py = os.path.join(os.path.dirname(exe), "python")
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers')}))")
    try:
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"mergekit": "?"}


def fmt_mb(x):
    return f"{x:,.0f}"


def results_block(lines, today, cmdline, stem, loads):
    """RESULTS.md's section: the run, the table, then the rest of the report as printed."""
    first = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    table = [line for line in lines[first:] if line.startswith("|")]
    rest = [line for line in lines[first + len(table):] if line.strip()]
    md = [BEGIN, f"Last run: {today}, `{cmdline}` (raw: `results/{stem}.txt`, `.json`); load average "
          f"{min(loads):.1f}–{max(loads):.1f} (before the first round and after each).", "", *table, "",
          "```", *rest, "```", END]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-yaml", help="mergekit's `mergekit-yaml` (default: PATH, then /tmp/mkvenv/bin)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--k", type=int, default=8, help="fine-tunes (default 8)")
    ap.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--mk-runs", type=int, help="mergekit's runs: its first N rounds (default: --runs)")
    ap.add_argument("--rss-k", type=int, nargs="*", default=[2, 4, 8],
                    help="fastsoup TIES alone at these K, for peak RSS against K (default 2 4 8; none: skip)")
    ap.add_argument("--fp32-check", nargs="*", default=["task_arithmetic", "ties", "model_stock"], choices=METHODS,
                    help="methods also run once by mergekit computing in float32 (dtype: float32, out_dtype: float16), "
                         "compared with fastsoup (default: task_arithmetic ties model_stock; none: skip)")
    ap.add_argument("--no-dare-check", action="store_true", help="skip the one-model DARE runs")
    ap.add_argument("--data", default="/tmp/fastsoup-bench/llama")
    ap.add_argument("--json", help="raw figures to this file")
    ap.add_argument("--save", action="store_true",
                    help="write benchmarks/results/mergekit-methods-llama-kK-DATE.txt/.json and RESULTS.md's section")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)
    exe = find_mergekit_yaml(args.mergekit_yaml)
    if exe is None:
        print("mergekit is not installed: skipped (see this script's docstring to install it in a venv of its own)")
        return 0
    if args.k < 2:
        ap.error("--k must be at least 2 (slerp takes two models, Model Stock at least two)")
    mk_runs = min(args.mk_runs or args.runs, args.runs)
    t_start = time.perf_counter()
    log = Log()
    mk_python = os.path.join(os.path.dirname(exe), "python")
    need_k = max([args.k, *[k for k in args.rss_k]])
    base, all_paths = make_models(args.data, need_k, mk_python)
    paths = all_paths[:args.k]
    cfgs = configs(base, paths)
    info = machine()
    versions = mergekit_versions(exe)
    cmdline = command_line("python -m benchmarks.bench_mergekit", argv)
    today = datetime.date.today().isoformat()
    in_bytes = {p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".safetensors"))
                for p in [base, *paths]}
    log(f"$ {cmdline}")
    log(f"# {today}; {info['cpu']}, {info['nproc']} CPUs, {info['ram_gib']:.1f} GiB; fastsoup {info['fastsoup']} "
        f"({info['isa']}, git {info.get('git_commit', '?')}); mergekit {versions.get('mergekit')} "
        f"(torch {versions.get('torch')}, transformers {versions.get('transformers')}) at {exe}")
    log(f"# zoo: {args.data}: base + {args.k} Llama-style fp16 models, {in_bytes[paths[0]] / 1e9:.2f} GB each; "
        f"whole processes, hot page cache, interleaved rounds, median of {args.runs}"
        + (f" (mergekit: of its first {mk_runs})" if mk_runs < args.runs else ""))
    load_before = loadavg()
    log(f"# load average before: {load_before:.2f}")

    fns, limit, ref_of, cfg_paths = {}, {}, {}, {}
    refs = {}
    for m in args.methods:
        text, inputs = cfgs[m]
        cfg_paths[m] = write(os.path.join(args.data, f"{m}.yml"), text)
        mk_out, fs_out = os.path.join(args.data, f"out-mk-{m}"), os.path.join(args.data, f"out-fs-{m}")
        fns[f"mergekit {m}"] = timed_run(mk_cmd(exe, cfg_paths[m], mk_out, m), mk_out, inputs)
        limit[f"mergekit {m}"] = mk_runs
        fns[f"fastsoup {m}"] = timed_run(fs_cmd(cfg_paths[m], fs_out), fs_out, inputs)
        if m != "linear":
            key = tuple(inputs)
            if key not in refs:
                refs[key] = f"fastsoup linear ({len(inputs)} inputs{', base + K' if inputs[0] == base else ''})"
                ref_cfg = write(os.path.join(args.data, f"ref-linear-{len(refs)}.yml"), linear_config(inputs))
                ref_out = os.path.join(args.data, f"out-ref-linear-{len(refs)}")
                fns[refs[key]] = timed_run(fs_cmd(ref_cfg, ref_out), ref_out, inputs)
            ref_of[m] = refs[key]
        else:
            ref_of[m] = "fastsoup linear"
    for m in args.methods:
        log(f"## {m}.yml\n" + "\n".join("    " + line for line in cfgs[m][0].rstrip().split("\n")))

    table, loads = rounds(fns, args.runs, limit=limit, verbose=True)
    log(f"# load average after each round: {', '.join(f'{x:.2f}' for x in loads[1:])}")

    # Agreement, from the last round's outputs.
    agree = {}
    for m in args.methods:
        fs_out, mk_out = os.path.join(args.data, f"out-fs-{m}"), os.path.join(args.data, f"out-mk-{m}")
        if m.startswith("dare"):
            agree[m] = {"fastsoup": dare_stats(fs_out, base), "mergekit": dare_stats(mk_out, base)}
        else:
            agree[m] = agreement(fs_out, mk_out)
    # mergekit computes in the config's dtype (float16 here); the same config with `dtype: float32` and
    # `out_dtype: float16` makes it compute in float32 (fastsoup: the same output, it computes in float64).
    fp32 = {}
    for m in args.methods:
        if m not in args.fp32_check:
            continue
        text = cfgs[m][0].replace("dtype: float16\n", "dtype: float32\nout_dtype: float16\n")
        c = write(os.path.join(args.data, f"{m}-fp32.yml"), text)
        out = os.path.join(args.data, f"out-mk-{m}-fp32")
        shutil.rmtree(out, ignore_errors=True)
        warm(cfgs[m][1])
        r = run_peak(mk_cmd(exe, c, out, m))
        fp32[m] = {"seconds": r["seconds"], "maxrss_mb": r["maxrss_mb"],
                   **agreement(os.path.join(args.data, f"out-fs-{m}"), out)}
        shutil.rmtree(out, ignore_errors=True)
    dare1 = None
    if any(m.startswith("dare") for m in args.methods) and not args.no_dare_check:
        c1 = write(os.path.join(args.data, "dare1.yml"), cfgs["dare1"][0])
        dare1 = {}
        for tool, cmd, out in (("mergekit", mk_cmd, os.path.join(args.data, "out-mk-dare1")),
                               ("fastsoup", None, os.path.join(args.data, "out-fs-dare1"))):
            shutil.rmtree(out, ignore_errors=True)
            run_peak(cmd(exe, c1, out, "dare_ties") if cmd else fs_cmd(c1, out))
            dare1[tool] = dare_kept(out, base, paths[0])
            shutil.rmtree(out, ignore_errors=True)

    # Peak RSS against K: fastsoup's TIES alone.
    rss_k = {}
    for kk in args.rss_k:
        c = write(os.path.join(args.data, f"ties-k{kk}.yml"), ties_config(base, all_paths[:kk]))
        out = os.path.join(args.data, f"out-fs-ties-k{kk}")
        inputs = [base, *all_paths[:kk]]
        shutil.rmtree(out, ignore_errors=True)
        warm(inputs)
        rss_k[kk] = run_sampled(fs_cmd(c, out))
        shutil.rmtree(out, ignore_errors=True)

    # Report.
    log()
    log("| method | mergekit s | **fastsoup s** | **vs mergekit** | fastsoup linear, same inputs, s | "
        "fastsoup / its linear | peak RSS MB: mergekit / fastsoup | agreement with mergekit |")
    log("|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for m in args.methods:
        mk, fs = table[f"mergekit {m}"], table[f"fastsoup {m}"]
        ref = table[ref_of[m]] if ref_of[m] in table else fs
        a = agree[m]
        if m.startswith("dare"):
            af, am = a["fastsoup"], a["mergekit"]
            ag = (f"in distribution: at base {af['at_base_fraction']:.4f} / {am['at_base_fraction']:.4f}, "
                  f"RMS(out − base) {af['rms_delta']:.3e} / {am['rms_delta']:.3e} (fastsoup / mergekit)")
        elif "error" in a:
            ag = a["error"]
        else:
            ag = (f"max {a['max_ulp']} ulp, max abs {a['max_abs']:.2e}; {100 * a['differ_fraction']:.2f} % of "
                  f"entries differ, {100 * a['over_1ulp_fraction']:.4f} % by > 1 ulp")
        row = {"method": m, "mergekit_s": mk["seconds"], "fastsoup_s": fs["seconds"],
               "speedup": mk["seconds"] / fs["seconds"], "linear_ref": ref_of[m], "linear_s": ref["seconds"],
               "vs_linear": fs["seconds"] / ref["seconds"], "mergekit_rss_mb": mk.get("maxrss_mb"),
               "fastsoup_rss_mb": fs.get("maxrss_mb")}
        rows.append(row)
        log(f"| {m} | {mk['seconds']:.2f} | **{fs['seconds']:.2f}** | **{row['speedup']:.1f}×** | "
            f"{ref['seconds']:.2f} | {row['vs_linear']:.1f}× | {fmt_mb(mk['maxrss_mb'])} / {fmt_mb(fs['maxrss_mb'])} "
            f"| {ag} |")
    log()
    log("Every contender (median, min, max seconds; peak RSS median):")
    for n, v in table.items():
        log(f"  {n:45s} {v['seconds']:8.2f} {v['min_seconds']:8.2f} {max(v['runs']):8.2f}  "
            f"{fmt_mb(v['maxrss_mb']):>7s} MB  runs: {', '.join(f'{x:.2f}' for x in v['runs'])}")
    if fp32:
        log()
        log("mergekit computing in float32 (the config with `dtype: float32`, `out_dtype: float16`; one run), "
            "against fastsoup:")
        for m, a in fp32.items():
            log(f"  {m:16s} max {a['max_ulp']} ulp, max abs {a['max_abs']:.2e}; {100 * a['differ_fraction']:.2f} % of "
                f"entries differ, {100 * a['over_1ulp_fraction']:.4f} % by > 1 ulp (mergekit {a['seconds']:.1f} s, "
                f"{fmt_mb(a['maxrss_mb'])} MB)")
    if dare1:
        log()
        log("One-model dare_ties (density 0.5, rescale left to the default; from the task vector d = model - base):")
        for tool, s in dare1.items():
            log(f"  {tool:9s} kept {s['kept_fraction']:.5f} of {s['counted']:,} entries (density 0.5); "
                f"mean (out - base) / d of the kept: {s['mean_scale']:.4f} over {s['scale_counted']:,} "
                f"(1 / density = 2)")
    if rss_k:
        log()
        log("fastsoup TIES against K (one run each; /proc status sampled every 50 ms): peak RSS (VmHWM) / largest "
            "anonymous RSS / largest file-backed RSS (the inputs' mapped pages: page cache):")
        for kk, r in rss_k.items():
            log(f"  K = {kk}: {fmt_mb(r['maxrss_mb'])} / {fmt_mb(r['rss_anon_mb'])} / {fmt_mb(r['rss_file_mb'])} MB "
                f"({r['seconds']:.1f} s)")
    wall = time.perf_counter() - t_start
    log(f"# wall time {wall:.0f} s; load average now {loadavg():.2f}")

    res = {"date": today, "command": cmdline, "machine": info, "mergekit": versions, "mergekit_yaml": exe,
           "k": args.k, "runs": args.runs, "mk_runs": mk_runs, "input_bytes": in_bytes,
           "configs": {m: cfgs[m][0] for m in args.methods}, "table": table, "rows": rows, "agreement": agree,
           "mergekit_fp32": fp32, "dare_one_model": dare1, "rss_vs_k": rss_k, "loads": [load_before, *loads[1:]], "wall_seconds": wall}
    if args.json:
        write_json(args.json, res)
    if args.save:
        stem = os.path.join(RESULTS_DIR, f"mergekit-methods-llama-k{args.k}-{today.replace('-', '')}")
        log.write(stem + ".txt")
        write_json(stem + ".json", res)
        write_between_markers(os.path.join(os.path.dirname(RESULTS_DIR), "RESULTS.md"),
                              results_block(log.lines, today, cmdline, os.path.basename(stem), res["loads"]), BEGIN, END)
    if not args.keep_outputs:
        for n in os.listdir(args.data):
            if n.startswith("out-"):
                shutil.rmtree(os.path.join(args.data, n), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
