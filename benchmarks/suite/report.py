"""The merge suite's report (benchmarks.run): the Markdown written into RESULTS.md between the
suite's markers, and the plot of time, throughput and peak RSS against K."""

from __future__ import annotations

from .cases import BIN_CONTENDERS

BEGIN, END = "<!-- benchmarks.run:begin -->", "<!-- benchmarks.run:end -->"
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


def fmt_s(x):
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def fmt_rss(x):
    return "" if x is None else f"{x:,.0f}"


def best_naive(t):
    """The faster of the two naive safetensors variants (default threads, 1 thread) in a table."""
    return min((n for n in ("naive_safetensors", "naive_safetensors_1t") if n in t), key=lambda n: t[n]["seconds"])


def markdown(res, png_rel, json_rel):
    """The suite's Markdown block (between BEGIN and END): command, machine, the headline table,
    every contender side by side, scaling in K, the ViT-G scale, machine load, correctness."""
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
            fmt = ".bin" if name in BIN_CONTENDERS else "sharded st"
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


def plot(res, path):
    """Time, throughput and peak RSS against K (the scaling rows) as a PNG."""
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
