"""Greedy soup: ``fastsoup.greedy_soup`` against a plain-torch reproduction of the official model-soups
``main.py`` greedy loop (``_official_greedy.py``), side by side in one run, medians of interleaved rounds.

    python benchmarks/bench_greedy.py [--pipeline jpeg|memory] [--n 16] [--reps 3] [--quick] [--json PATH] [--txt PATH] [--workdir DIR]
    python -m benchmarks.bench_greedy ...  (the same)

The code: ``greedy/data.py`` (configuration, images, held-out pipelines), ``greedy/model.py`` (the
model and its ingredients), ``greedy/contenders.py`` (the baseline and fastsoup runs),
``greedy/analysis.py`` (checks and replay, after timing), ``greedy/report.py`` (what is printed);
the rounds are here. ``compare_builds.py --bench greedy`` times the same fastsoup runs with two
source trees of fastsoup side by side.

The setting (everything generated here, nothing downloaded):
- data: 10 classes of synthetic "photos": smooth random class templates, each image a randomly shifted
  crop of its class template blended with a random other class's template, plus pixel noise, as
  uint8 HWC images (64 x 64);
- held-out pipeline (``--pipeline``), a torch ``Dataset`` whose ``__getitem__`` does what an ImageNet
  eval pipeline does, scaled down, in a ``DataLoader`` with ``num_workers=0``, ``batch_size=128``, no
  shuffling:
  - ``jpeg`` (default; what the official code runs: torchvision's ``ImageFolder`` with its PIL loader
    and the eval transform on PIL images): the held-out images are JPEG files (quality 90, written
    once into the working folder); each item opens its file, decodes it with PIL, ``convert("RGB")``,
    Resize(36) (PIL bilinear), CenterCrop(32), ToTensor, Normalize(mean, std);
  - ``memory``: the images are kept decoded in memory (uint8 HWC tensors), and each item does
    uint8 -> float CHW / 255, Resize(36) (torch bilinear, antialiased), CenterCrop(32), Normalize:
    the pipeline without its decoding, so one pass of it costs about one pass of the model here;
- model: a small ViT (8 x 8 patch-embedding conv, class token, learned positional embedding,
  3 pre-norm ``nn.TransformerEncoderLayer`` of width 64 with 4 heads and MLP 256, LayerNorm, linear
  head), float32;
- ingredients: one shared init (AdamW on generated training images), then N fine-tunes of it
  (SGD with momentum, a few dozen steps each, learning rates spread over 0.003 .. 0.05, own seeds).
  Fine-tunes whose held-out accuracy ties another's are fine-tuned again with another seed (see
  ``--allow-ties``): on ties the official ranking (ascending sort, then reversed) and fastsoup's
  (stable descending) try the tied models in opposite orders, which is a difference of ranking rule,
  not of speed. Each ingredient is saved as ``.pt`` (``torch.save`` of the state dict: what the
  official code loads, with ``torch.load``) and as ``.safetensors`` (what fastsoup reads) of the same
  tensors.

Contenders, one of each per round (the baseline first in even rounds, last in odd rounds):
- baseline: ``_official_greedy.official_greedy``: every individual accuracy measured by a full pass
  through the DataLoader (the official code reads them from an earlier run's results file), then the
  official loop: ``torch.load`` per candidate, running average with two clones, ``load_state_dict``,
  full pass through the DataLoader (pipeline included), strict ``>``;
- fastsoup first run: ``fastsoup.greedy_soup(paths, model, loader, strict=True, cache_dir=<fresh>)``;
- fastsoup rerun: the same call again with the same ``cache_dir`` (a new model instance): nothing is
  evaluated, but the data pipeline runs once to check that the held-out set is the one cached;
- fastsoup rerun from the stored set: the same call with ``heldout=None``, which takes the held-out
  tensors the first run stored in ``cache_dir`` (no data pipeline; they are checked against their
  fingerprint).
Model construction happens outside every clock; everything else (opening files, fingerprints, cache
writes) is inside. All runs share one process (imports done before the first clock), the page cache
is hot for both (the checkpoints were just written).

Noise (the 2 vCPUs are shared with other work, and torch's two OpenMP threads slow down many times
over when another process takes a core): every timed run first waits (up to ``--quiet-wait``) for a
quiet machine; the CPU time other processes used during each run is measured from /proc/stat, and a
round in which it exceeds 5 % of the machine during any of its runs is set aside (kept in the JSON)
and run again, up to ``--max-redo`` times; a fixed probe workload timed before every run shows the
machine's speed at that moment. Medians are over the rounds kept, for every contender alike.

``--workdir DIR`` keeps the checkpoints there and reuses them when the config matches (training
them takes ~20 s on a quiet machine); by default they go to a temporary folder that is removed.

After timing (not timed): the decisions of every run are compared with the baseline's (kept
ingredients and their order, score), the final soups' parameters are compared, and an analysis
replays every candidate to count how many batches an exact early rejection would need if the
held-out examples were evaluated hardest-first (by the current soup's margin) instead of in loader
order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_greedy.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.greedy.analysis import check_decisions, cost_model, fingerprint_bytes, hardest_first_analysis  # noqa: E402
from benchmarks.greedy.contenders import (make_probe, preload, run_baseline, run_fastsoup,  # noqa: E402
                                          time_pipeline_and_model)
from benchmarks.greedy.data import make_config, make_data  # noqa: E402
from benchmarks.greedy.model import make_ingredients, make_model  # noqa: E402
from benchmarks.greedy.report import CONTENDERS, log_analysis, log_cost_model, log_report, summarize_rounds  # noqa: E402
from benchmarks.harness import Log, command_line, machine, write_json  # noqa: E402


def run_rounds(cfg, reps, pts, sts, loader, probe, workdir, reorder, log):
    """Rounds of one run of each contender (the baseline first in even rounds, last in odd ones);
    a round in which other processes took more than 5 % of the machine (2 CPUs x the run's wall
    time, at least 0.5 CPU-seconds) during any of its runs is set aside and run again, up to
    ``cfg.max_redo`` times. Returns (kept runs, set-aside runs, attempts) per contender."""
    raw = {k: [] for k in CONTENDERS}
    discarded = {k: [] for k in raw}
    r = attempts = 0
    while r < reps:
        cache_dir = os.path.join(workdir, f"cache-{attempts}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        this = {}

        def fast():
            for name, heldout in (("fastsoup_first", loader), ("fastsoup_rerun", loader),
                                  ("fastsoup_stored", None)):  # heldout=None: the stored set
                p = probe()
                this[name] = run_fastsoup(cfg, sts, heldout, cache_dir, reorder)
                this[name]["probe_seconds"] = p

        def base():
            p = probe()
            this["baseline"] = run_baseline(cfg, pts, loader)
            this["baseline"]["probe_seconds"] = p

        for fn in ((base, fast) if attempts % 2 == 0 else (fast, base)):
            fn()
        attempts += 1
        shutil.rmtree(cache_dir, ignore_errors=True)
        b, f1, f2, f3 = (this[k] for k in CONTENDERS)
        noisy = [k for k, x in this.items() if x["foreign_cpu_seconds"] > max(0.5, 0.05 * 2 * x["seconds"])]
        clean = not noisy or attempts > reps + cfg.max_redo
        log(f"round {attempts}{'' if clean else ' (set aside: other processes busy during ' + ', '.join(noisy) + ')'}: "
            f"baseline {b['seconds']:.2f} s, fastsoup first {f1['seconds']:.2f} s, rerun {f2['seconds']:.3f} s, "
            f"rerun from the stored set {f3['seconds']:.3f} s; CPU-s used by other processes "
            + " / ".join(f"{x['foreign_cpu_seconds']:.1f}" for x in (b, f1, f2, f3)) + "; probe "
            + " / ".join(f"{x['probe_seconds']:.3f}" for x in (b, f1, f2, f3)) + " s; waited "
            + " / ".join(f"{x['waited_seconds']:.0f}" for x in (b, f1, f2, f3)) + " s")
        for k, x in this.items():
            x["attempt"] = attempts
            (raw if clean else discarded)[k].append(x)
        if clean:
            r += 1
    return raw, discarded, attempts


def strip(runs: dict) -> dict:
    """The runs without their result objects and soups (for the JSON)."""
    return {name: [{k: v for k, v in x.items() if k not in ("result", "soup")} for x in rs] for name, rs in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", choices=("jpeg", "memory"), default="jpeg",
                    help="held-out pipeline: JPEG files decoded by PIL (default, as the official code), or "
                         "images kept decoded in memory (transforms only)")
    ap.add_argument("--reorder", choices=("examples", "batches", "none"), default="examples",
                    help="fastsoup's early-rejection order (greedy_soup's reorder=; default examples)")
    ap.add_argument("--n", type=int, help="ingredients (default 16; 4 with --quick)")
    ap.add_argument("--reps", type=int, help="rounds (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of well under a minute")
    ap.add_argument("--heldout", type=int, help="held-out images (default 4096)")
    ap.add_argument("--batch-size", type=int, help="DataLoader batch size (default 128)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, = the CPUs)")
    ap.add_argument("--quiet-wait", type=float, help="wait at most this long for a quiet machine before each "
                    "timed run (default 60 s; 0: never wait)")
    ap.add_argument("--max-redo", type=int, help="rounds set aside for noise and run again, at most (default 6)")
    ap.add_argument("--workdir", help="where the checkpoints and caches go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--allow-ties", action="store_true", help="keep fine-tunes whose held-out accuracies tie")
    ap.add_argument("--no-analysis", action="store_true", help="skip the hardest-first replay")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--txt", help="write everything printed here too")
    args = ap.parse_args(argv)

    cfg = make_config(args.quick, n=args.n, heldout=args.heldout, batch_size=args.batch_size,
                      quiet_wait=args.quiet_wait, max_redo=args.max_redo)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if cfg.n < 2 or reps < 1:
        ap.error("--n must be at least 2 and --reps at least 1")
    preload()

    log = Log()
    command = command_line("python " + os.path.relpath(sys.argv[0]), argv)
    mach = machine()
    log(f"$ {command}")
    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {mach['cpu']}, nproc {mach['nproc']}, torch {mach['torch']} "
        f"({mach['torch_threads']} threads), fastsoup {mach['fastsoup']} (isa {mach['isa']}, {mach['threads']} threads), "
        f"Python {mach['python']}")
    if "git_commit" in mach:
        dirty = mach["git_dirty_package_files"]
        log(f"# code: commit {mach['git_commit']}" + (f", uncommitted changes in {', '.join(dirty)}" if dirty else ", clean"))
    log(f"# config: {json.dumps(asdict(cfg))}; pipeline: {args.pipeline}; fastsoup reorder: {args.reorder}; rounds: {reps}")

    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="fastsoup-bench-greedy-") if own_workdir else args.workdir
    os.makedirs(workdir, exist_ok=True)
    ckdir = os.path.join(workdir, "checkpoints")
    os.makedirs(ckdir, exist_ok=True)
    results: dict = {"command": command, "machine": mach, "config": asdict(cfg), "pipeline": args.pipeline, "rounds": reps}
    try:
        data = make_data(cfg, args.pipeline, workdir)
        log(f"data: {cfg.train} training + {cfg.heldout} held-out images, {cfg.raw}x{cfg.raw}x3 uint8, "
            f"{cfg.classes} classes; {data.what} ({data.seconds:.1f} s)")
        xte, yte = data.xte, data.yte
        loader = DataLoader(data.dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)

        pts, sts, setup_correct, init_correct = make_ingredients(cfg, ckdir, data.xtr, data.ytr, xte, yte,
                                                                 args.allow_ties, log, args.pipeline)
        data.xtr = data.ytr = None  # the training images are not needed any more
        params = sum(p.numel() for p in make_model(cfg).parameters())
        ck_bytes = os.path.getsize(sts[0])
        ties = len(setup_correct) - len(set(setup_correct))
        log(f"model: SmallViT, {params / 1e3:.0f}k float32 parameters; checkpoint {ck_bytes / 1e3:.0f} kB "
            f"(.safetensors), {os.path.getsize(pts[0]) / 1e3:.0f} kB (.pt); tied accuracies: {ties}")
        p_s, m_s = time_pipeline_and_model(cfg, loader, xte)
        log(f"one pass alone (median of 3): DataLoader pipeline {p_s:.3f} s ({p_s / cfg.heldout * 1e6:.0f} us/image), "
            f"model {m_s:.3f} s; pipeline/model = {p_s / m_s:.2f}")
        results.update({"params": params, "checkpoint_bytes_safetensors": ck_bytes,
                        "checkpoint_bytes_pt": os.path.getsize(pts[0]), "setup_correct": setup_correct,
                        "init_correct": init_correct, "pipeline_pass_seconds": p_s, "model_pass_seconds": m_s})

        raw, discarded, attempts = run_rounds(cfg, reps, pts, sts, loader, make_probe(cfg, xte), workdir, args.reorder, log)
        results["attempts"] = attempts
        results["decisions"] = d = check_decisions(raw, cfg, setup_correct, log)
        results["summary"] = summary = summarize_rounds(raw)
        results["fingerprint_bytes_per_run"] = fp_bytes = sum(fingerprint_bytes(p) for p in sts)
        log_report(log, cfg, reps, attempts, raw, summary, d, fp_bytes)
        a = None
        if not args.no_analysis:
            results["analysis"] = a = hardest_first_analysis(cfg, sts, raw["baseline"][0], xte, yte)
            log_analysis(log, a, summary, raw)
        results["cost_model"] = model = cost_model(cfg, summary, a)
        log_cost_model(log, cfg, model)
        results["raw"] = strip(raw)
        results["discarded"] = strip(discarded)
        results["fastsoup_history"] = raw["fastsoup_first"][0]["result"].history
        results["baseline_history"] = raw["baseline"][0]["history"]
        results["rerun_sources"] = [h["source"] for h in raw["fastsoup_rerun"][0]["result"].history]
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep or not own_workdir:
            print(f"(working folder kept: {workdir})")
    if args.json:
        write_json(args.json, results, indent=1)
    if args.txt:
        log.write(args.txt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
