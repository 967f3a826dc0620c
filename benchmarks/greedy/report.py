"""The greedy benchmark's report (bench_greedy.py): the medians of the rounds kept and the speed-ups,
then the tables and lines it prints (and writes with --txt): end to end per contender, the
breakdown, the speed-ups against the targets, the decisions, the early-rejection replay and the
cost model."""

from __future__ import annotations

import math

from ..harness import median_of, numeric_keys

CONTENDERS = ("baseline", "fastsoup_first", "fastsoup_rerun", "fastsoup_stored")


def summarize_rounds(raw: dict) -> dict:
    """Per contender the median of every numeric figure over the rounds kept, and ``runs``; the
    speed-ups of the medians and per round."""
    B, F1, F2, F3 = (raw[k] for k in CONTENDERS)
    mb, mf, mr, ms = (median_of(raw[k], "seconds") for k in CONTENDERS)
    summary = {name: {k: median_of(runs, k) for k in numeric_keys(runs[0]) if all(r[k] is not None for r in runs)}
               for name, runs in raw.items()}
    for name, runs in raw.items():
        summary[name]["runs"] = [x["seconds"] for x in runs]
    summary["speedup_first_vs_baseline"] = mb / mf
    summary["speedup_first_vs_baseline_per_round"] = [b["seconds"] / f["seconds"] for b, f in zip(B, F1)]
    summary["speedup_rerun_vs_first_per_round"] = [f["seconds"] / g["seconds"] for f, g in zip(F1, F2)]
    summary["speedup_rerun_vs_first"] = mf / mr
    summary["speedup_rerun_vs_baseline"] = mb / mr
    summary["speedup_stored_vs_first_per_round"] = [f["seconds"] / g["seconds"] for f, g in zip(F1, F3)]
    summary["speedup_stored_vs_first"] = mf / ms
    summary["speedup_stored_vs_baseline"] = mb / ms
    return summary


def log_report(log, cfg, reps: int, attempts: int, raw: dict, summary: dict, d: dict, fp_bytes: int) -> None:
    """The tables and lines of the rounds (d: analysis.check_decisions)."""
    nb = math.ceil(cfg.heldout / cfg.batch_size)
    mb = summary["baseline"]["seconds"]
    same = d["same"]
    log()
    log(f"## Greedy soup, N = {cfg.n}, {cfg.heldout} held-out images ({nb} batches of {cfg.batch_size}); "
        f"median of {reps} interleaved rounds ({attempts - reps} more set aside for noise)")
    log()
    log("| contender | end to end (s) | min | × vs baseline | evaluations (full / early-stopped) | "
        "candidate batches run / saved | checkpoint bytes read |")
    log("|---|---:|---:|---:|---:|---:|---:|")
    bb = summary["baseline"]
    log(f"| baseline (official main.py loop, torch) | {mb:.2f} | {min(summary['baseline']['runs']):.2f} | 1.0× | "
        f"{bb['evaluations']:.0f} / 0 | {(cfg.n - 1) * nb} / 0 | {bb['bytes_read'] / 1e6:.1f} MB ({bb['loads']:.0f} torch.load) |")
    for name, label in (("fastsoup_first", "fastsoup first run (fresh cache)"),
                        ("fastsoup_rerun", "fastsoup rerun (same call, same cache: the pipeline runs to check the data)"),
                        ("fastsoup_stored", "fastsoup rerun from the cache's stored held-out set (heldout=None)")):
        s = summary[name]
        early = sum(1 for h in raw[name][0]["result"].history[1:] if h["source"] == "evaluated" and h["batches"] < nb)
        log(f"| {label} | {s['seconds']:.3f} | {min(s['runs']):.3f} | {mb / s['seconds']:.1f}× | "
            f"{s['evaluations'] - early:.0f} / {early} | {s['batches_evaluated']:.0f} / {s['batches_saved']:.0f} | "
            f"{s['bytes_read'] / 1e6:.1f} MB (+ {fp_bytes / 1e6:.1f} MB fingerprinted) |")
    log()
    log("Breakdown (medians, seconds):")
    log()
    log("| contender | data pipeline | individual scoring | candidate formation | candidate evaluation | other |")
    log("|---|---:|---:|---:|---:|---:|")
    log(f"| baseline | {bb['data_seconds']:.2f} (inside the next columns: every pass reruns it) | "
        f"{bb['individual_seconds']:.2f} (torch.load + load_state_dict + full pass, × {cfg.n}) | "
        f"{bb['formation_seconds']:.3f} (torch.load {bb['load_seconds_search']:.3f} + "
        f"average & load_state_dict {bb['mix_seconds']:.3f}) | {bb['eval_seconds']:.2f} (full passes, pipeline incl.) | "
        f"{bb['other_seconds']:.3f} |")
    for name in ("fastsoup_first", "fastsoup_rerun", "fastsoup_stored"):
        s = summary[name]
        log(f"| {name} | {s['prepare_seconds']:.3f} ({'load + check the stored set' if name == 'fastsoup_stored' else 'prepare, once'}) | {s['individual_seconds']:.3f} | "
            f"{s['form_seconds']:.4f} | {s['eval_seconds']:.3f} | {s['other_seconds']:.3f} (open, fingerprints, cache) |")
    log()
    log(f"baseline passes split: DataLoader {bb['data_seconds']:.2f} s, model {bb['model_seconds']:.2f} s "
        f"over {bb['evaluations']:.0f} full passes ({bb['data_seconds'] / bb['evaluations']:.3f} + "
        f"{bb['model_seconds'] / bb['evaluations']:.3f} s per pass)")
    log(f"speed-up, fastsoup first run vs baseline: {summary['speedup_first_vs_baseline']:.2f}× (target ≥ 3×: "
        f"{'met' if summary['speedup_first_vs_baseline'] >= 3 else 'NOT met'}); per round: "
        + ", ".join(f"{x:.2f}" for x in summary["speedup_first_vs_baseline_per_round"]))
    log(f"speed-up, fastsoup rerun vs first run: {summary['speedup_rerun_vs_first']:.1f}× (target ≥ 20×: "
        f"{'met' if summary['speedup_rerun_vs_first'] >= 20 else 'NOT met'}); rerun vs baseline "
        f"{summary['speedup_rerun_vs_baseline']:.0f}×; per round: "
        + ", ".join(f"{x:.0f}" for x in summary["speedup_rerun_vs_first_per_round"]))
    log(f"speed-up, fastsoup rerun from the stored held-out set vs first run: {summary['speedup_stored_vs_first']:.1f}× "
        f"(target ≥ 20×: {'met' if summary['speedup_stored_vs_first'] >= 20 else 'NOT met'}); vs baseline "
        f"{summary['speedup_stored_vs_baseline']:.0f}×; per round: "
        + ", ".join(f"{x:.0f}" for x in summary["speedup_stored_vs_first_per_round"]))
    log()
    log(f"decisions: {'SAME' if same else 'DIFFERENT'} in every run (kept {d['kept']} in this order, score "
        f"{d['score']:.6f} = {d['correct']}/{cfg.heldout}); search order {d['order']}; {d['accepted_of_candidates']} "
        f"candidates accepted, {d['rejected']} rejected")
    log(f"candidate margins vs the best count so far (strict >: accepted iff > 0): {d['margins_vs_best']}; "
        f"closest call {d['closest_margin']}")
    log(f"final soups (baseline's running average in float32 vs fastsoup's float32 sum / n): max |difference| = "
        f"{d['soup_max_abs_diff']:.3g} (largest |parameter| {d['soup_max_abs']:.3g}; "
        f"{100 * d['soup_fraction_differing']:.1f} % of the values differ); "
        f"setup accuracies equal the measured ones: {d['setup_scores_match']}")


def log_analysis(log, a: dict, summary: dict, raw: dict) -> None:
    """The early-rejection replay (analysis.hardest_first_analysis) against what fastsoup ran."""
    ev = summary["fastsoup_first"]
    per_batch = ev["eval_seconds"] / max(1, ev["batches_evaluated"])
    log(f"early rejection replay (candidate batches run, of {a['candidate_batches']}): loader order "
        f"{a['loader_order']} (~{per_batch * a['loader_order']:.2f} s); whole batches hardest-first "
        f"{a['batch_hardest_first']} (~{per_batch * a['batch_hardest_first']:.2f} s); examples hardest-first, "
        f"re-batched per candidate {a['example_hardest_first']} (fastsoup ran {ev['batches_evaluated']:.0f} "
        f"in {ev['eval_seconds']:.2f} s, reorder={raw['fastsoup_first'][0]['result'].stats.reorder!r}); "
        f"re-batched once by the best ingredient's margin, then batches hardest-first {a['rebatched_once']} "
        f"(~{per_batch * a['rebatched_once']:.2f} s)")


def log_cost_model(log, cfg, model: dict) -> None:
    """The cost model (analysis.cost_model) in one line."""
    n = cfg.n
    P, M = model["P"], model["M"]
    fracs = [k for k in model if isinstance(model[k], dict)]
    log(f"cost model (P = {P:.3f} s pipeline pass, M = {M:.3f} s model pass, the baseline's medians): baseline "
        f"≈ (2N-1)(P+M) = {model['predicted_baseline']:.2f} s; fastsoup ≈ P + N·M + f·(N-1)·M = "
        + "; ".join(f"{model[k]['predicted_fastsoup']:.2f} s with f = {model[k]['f']:.2f} ({k}: "
                    f"{model[k]['predicted_speedup']:.2f}×, 3× needs P/M ≥ {model[k]['pipeline_over_model_for_3x']:.2f})"
                    for k in fracs)
        + f"; measured P/M here = {P / M:.2f}; bound for P/M → ∞: {2 * n - 1}×")
