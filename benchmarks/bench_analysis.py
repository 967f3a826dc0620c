"""The cost of one evaluated soup in an analysis: ``fastsoup.analysis`` (a landscape) against the naive
way, side by side in one run, medians over the soups of interleaved rounds.

    python benchmarks/bench_analysis.py [--steps 5] [--rounds 3] [--heldout 1024] [--json PATH] [--txt PATH]
    python -m benchmarks.bench_analysis ...  (the same)

Setting (the greedy benchmark's, ``benchmarks/greedy/``, nothing downloaded): the small ViT (164 k
float32 parameters), three fine-tunes of one init as A, B, C, and ``--heldout`` synthetic 64 x 64
images through the in-memory eval pipeline (uint8 -> float, resize 36, crop 32, normalize, per item in
a ``DataLoader`` of batch 128, ``num_workers=0``). Every contender scores the same landscape grid,
``--steps`` x ``--steps`` points of ``A + x (B - A) + y (C - A)`` over -0.5 .. 1.5:

- ``fastsoup``: ``Analyzer([A, B, C], model, loader).landscape(steps=...)``: the pipeline runs once
  (in the Analyzer, with the three individual evaluations: a one-time cost, reported apart), then per
  point one fused pass over the three mapped checkpoints into the model's parameters and a pass of
  the model over the prepared tensors. Its time per soup is the landscape loop's seconds / soups.
- ``naive``: the three state dicts loaded once (``torch.load``, outside the clock: generous to it);
  per point the averaged state dict in plain torch (``wA * A[k] + wB * B[k] + wC * C[k]``, float32),
  ``model.load_state_dict``, and a full pass through the ``DataLoader`` (pipeline included), as the
  official model-soups code evaluates every soup.
- ``naive, tensors in memory``: the same, but the pass runs over the pipeline's output kept in memory
  (what the naive way costs with the data pipeline taken out: the mixing and ``load_state_dict`` stay).

Per point, each contender's held-out accuracy is recorded; the run says at how many points the naive
accuracy equals fastsoup's (the naive float32 sum rounds differently from fastsoup's float64 sum
rounded once, so a point may differ by an example). All contenders share one process, the page
cache is hot, rounds alternate the order of the contenders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_analysis.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.greedy.data import make_config, make_data  # noqa: E402
from benchmarks.greedy.model import make_ingredients, make_model  # noqa: E402
from benchmarks.harness import Log, command_line, loadavg, machine, summarize, write_json  # noqa: E402


def grid(steps: int) -> list[tuple[float, float]]:
    xs = [round(-0.5 + 2.0 * i / (steps - 1), 12) + 0.0 for i in range(steps)]
    return [(x, y) for y in xs for x in xs]


def run_fastsoup(cfg, paths, loader, steps):
    from fastsoup.analysis import Analyzer

    model = make_model(cfg)
    t = time.perf_counter()
    an = Analyzer(paths, model, loader, progress=False)
    an.search.individual_logits()
    setup = time.perf_counter() - t
    r = an.landscape(0, 1, 2, steps=steps)
    per = r.stats["seconds"] / r.stats["evaluated"]
    acc = {(p["x"], p["y"]): p["accuracy"] for p in r.points}
    return {"setup_seconds": setup, "loop_seconds": r.stats["seconds"], "per_soup": [per] * len(r.points),
            "form_per_soup": r.stats["form_seconds"] / r.stats["evaluated"],
            "eval_per_soup": r.stats["eval_seconds"] / r.stats["evaluated"], "accuracy": acc}


def run_naive(cfg, sds, data, steps):
    """``data``: a DataLoader (the pipeline per pass) or a list of (x, y) batches in memory."""
    model = make_model(cfg)
    per, form, acc = [], [], {}
    t0 = time.perf_counter()
    for x, y in grid(steps):
        t = time.perf_counter()
        w = (1.0 - x - y, x, y)
        soup = {k: w[0] * sds[0][k] + w[1] * sds[1][k] + w[2] * sds[2][k] if sds[0][k].is_floating_point()
                else sds[0][k] for k in sds[0]}
        model.load_state_dict(soup)
        form.append(time.perf_counter() - t)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for xb, yb in data:
                correct += int((model(xb).argmax(-1) == yb).sum())
                total += int(yb.shape[0])
        acc[(x, y)] = correct / total
        per.append(time.perf_counter() - t)
    return {"loop_seconds": time.perf_counter() - t0, "per_soup": per, "form_per_soup": statistics.median(form),
            "accuracy": acc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="grid points per axis (default 5: 25 soups per contender)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--heldout", type=int, default=1024, help="held-out images (default 1024)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder, removed)")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--txt", help="write everything printed here too")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log = Log()
    cfg = make_config(False, n=3, heldout=args.heldout)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-analysis-")
    os.makedirs(work, exist_ok=True)
    try:
        info = machine()
        log(f"# {command_line('python benchmarks/bench_analysis.py', argv)}")
        log(f"machine: {info['cpu']}, {info['nproc']} CPUs, torch {info['torch']} ({info['torch_threads']} threads), "
            f"fastsoup {info['fastsoup']} ({info['isa']}), commit {info.get('git_commit')}")
        data = make_data(cfg, "memory", work)
        pts, sts, correct, _ = make_ingredients(cfg, work, data.xtr, data.ytr, data.xte, data.yte, True, log, "memory")
        sds = [torch.load(p) for p in pts]
        params = sum(t.numel() for t in sds[0].values() if t.is_floating_point())
        loader = DataLoader(data.dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
        memory = [(data.xte[i:i + cfg.batch_size], data.yte[i:i + cfg.batch_size])
                  for i in range(0, len(data.yte), cfg.batch_size)]
        log(f"model: small ViT, {params:,} float32 parameters; held-out {len(data.yte)} images in "
            f"{len(memory)} batches of {cfg.batch_size}; landscape {args.steps} x {args.steps} = "
            f"{args.steps ** 2} soups per contender and round, {args.rounds} rounds")
        contenders = {
            "fastsoup": lambda: run_fastsoup(cfg, sts, loader, args.steps),
            "naive": lambda: run_naive(cfg, sds, loader, args.steps),
            "naive, tensors in memory": lambda: run_naive(cfg, sds, memory, args.steps),
        }
        runs = {name: [] for name in contenders}
        loads = [loadavg()]
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                runs[name].append(contenders[name]())
                log(f"  round {r + 1}: {name}: {runs[name][-1]['loop_seconds']:.2f} s for {args.steps ** 2} soups")
            loads.append(loadavg())
        table = {}
        for name, rs in runs.items():
            per = [v for x in rs for v in x["per_soup"]]
            table[name] = {"per_soup": summarize(per), "loop_seconds": [x["loop_seconds"] for x in rs]}
            table[name]["form_per_soup_median"] = statistics.median(x["form_per_soup"] for x in rs)
            if name == "fastsoup":
                table[name]["setup_seconds"] = [x["setup_seconds"] for x in rs]
                table[name]["eval_per_soup_median"] = statistics.median(x["eval_per_soup"] for x in rs)
        fs = table["fastsoup"]["per_soup"]["median"]
        ref = runs["fastsoup"][0]["accuracy"]
        log("")
        log(f"{'contender':<28} {'per soup (median) ms':>22} {'IQR ms':>16} {'vs fastsoup':>12}")
        for name, t in table.items():
            p = t["per_soup"]
            log(f"{name:<28} {1000 * p['median']:>22.2f} {1000 * p['q1']:>7.2f}..{1000 * p['q3']:<7.2f} "
                f"{p['median'] / fs:>11.1f}x")
        log(f"forming one soup in the model: fastsoup {1000 * table['fastsoup']['form_per_soup_median']:.2f} ms (fused "
            f"pass into the parameters), naive {1000 * table['naive']['form_per_soup_median']:.2f} ms (averaged state "
            "dict + load_state_dict)")
        log(f"fastsoup per soup: forming {1000 * table['fastsoup']['form_per_soup_median']:.2f} ms + evaluation "
            f"{1000 * table['fastsoup']['eval_per_soup_median']:.2f} ms (medians over rounds); one-time setup "
            f"(pipeline once + 3 individual evaluations) {statistics.median(table['fastsoup']['setup_seconds']):.2f} s")
        for name in ("naive", "naive, tensors in memory"):
            same = sum(runs[name][0]["accuracy"][k] == ref[k] for k in ref)
            diff = max(abs(runs[name][0]["accuracy"][k] - ref[k]) for k in ref)
            log(f"{name}: accuracy equal to fastsoup's at {same} of {len(ref)} points (largest difference {diff:.5f})")
        log(f"load average: {' '.join(f'{v:.1f}' for v in loads)}")
        if args.json:
            write_json(args.json, {"machine": info, "config": vars(args), "params": params, "table": table,
                                   "loads": loads,
                                   "accuracy": {n: [[k[0], k[1], v] for k, v in rs[0]["accuracy"].items()]
                                                for n, rs in runs.items()}})
        if args.txt:
            log.write(args.txt)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
