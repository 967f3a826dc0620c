"""The greedy benchmark's contenders (bench_greedy.py, compare_builds.py --bench greedy), each timed
on a quiet machine when it can be (harness.wait_quiet) with the CPU time other processes took
during the run beside it (harness.ForeignCPU):

- the baseline: ``_official_greedy.official_greedy``, the official ``main.py`` loop in plain torch
  (every individual accuracy by a full pass through the DataLoader, then ``torch.load`` per
  candidate, the running average with two clones, ``load_state_dict``, a full pass, strict ``>``);
- fastsoup: ``fastsoup.greedy_soup(paths, model, loader, strict=True, cache_dir=...)`` (the public
  API only: the same code times older builds of fastsoup).

Model construction happens outside every clock; everything else (opening files, fingerprints,
cache writes) is inside.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

import fastsoup

from .._official_greedy import official_greedy
from ..harness import ForeignCPU, wait_quiet
from .model import make_model

# SearchStats fields reported per fastsoup run (None where a build lacks one).
STATS = ("prepare_seconds", "individual_seconds", "form_seconds", "eval_seconds", "evaluations", "cached",
         "batches_evaluated", "batches_saved", "bytes_read_individual", "bytes_read_search")


def preload() -> None:
    """Imports what fastsoup's greedy search needs, outside every clock (``fastsoup.greedy_soup`` is
    resolved lazily, on first use)."""
    fastsoup.greedy_soup  # noqa: B018


def run_baseline(cfg, pts, loader):
    model = make_model(cfg)
    gc.collect()
    waited = wait_quiet(cfg.quiet_wait)
    with ForeignCPU() as noise:
        r = official_greedy(pts, model, loader)
    r["formation_seconds"] = r["load_seconds_search"] + r["mix_seconds"]
    r["other_seconds"] = r["seconds"] - r["individual_seconds"] - r["formation_seconds"] - r["eval_seconds"]
    r["foreign_cpu_seconds"] = noise.seconds
    r["waited_seconds"] = waited
    return r


def run_fastsoup(cfg, sts, loader, cache_dir, reorder="examples"):
    """One ``fastsoup.greedy_soup`` call (``loader=None``: the held-out set stored in ``cache_dir``;
    ``reorder=None``: the build's default, not passed). Returns its figures and ``"result"``."""
    model = make_model(cfg)
    gc.collect()
    waited = wait_quiet(cfg.quiet_wait)
    kw = {} if reorder is None else {"reorder": reorder}
    with ForeignCPU() as noise:
        t0, c0 = time.perf_counter(), time.process_time()
        res = fastsoup.greedy_soup(sts, model, loader, strict=True, cache_dir=cache_dir, progress=False, **kw)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = {k: getattr(res.stats, k, None) for k in STATS}
    known = sum(s[k] or 0.0 for k in ("prepare_seconds", "individual_seconds", "form_seconds", "eval_seconds"))
    read = None if s["bytes_read_individual"] is None else s["bytes_read_individual"] + (s["bytes_read_search"] or 0)
    return {"result": res, "seconds": seconds, "cpu_seconds": cpu, **s, "other_seconds": seconds - known,
            "bytes_read": read, "foreign_cpu_seconds": noise.seconds, "waited_seconds": waited}


def make_probe(cfg, xte):
    """A fixed workload (one model pass over 1024 prepared images), timed right before a run: how
    fast the machine is at that moment (slowdowns /proc/stat cannot see, e.g. the host's)."""
    probe_model = make_model(cfg).eval()
    probe_x = xte[: min(1024, xte.shape[0])]

    def probe() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, probe_x.shape[0], cfg.batch_size):
                probe_model(probe_x[i:i + cfg.batch_size])
        return time.perf_counter() - t

    return probe


def time_pipeline_and_model(cfg, loader, xte, reps=3):
    """One pass of the DataLoader alone, and one pass of the model alone over the prepared tensors."""
    model = make_model(cfg).eval()
    p, m = [], []
    for _ in range(reps):
        wait_quiet(cfg.quiet_wait)
        t = time.perf_counter()
        for _ in loader:
            pass
        p.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, xte.shape[0], cfg.batch_size):
                model(xte[i:i + cfg.batch_size]).argmax(1)
        m.append(time.perf_counter() - t)
    return statistics.median(p), statistics.median(m)
