"""``fastsoup demo``: the paper's experiment in miniature, on real data, in well under a minute on 2 cores.

Data: the handwritten digits that ship inside scikit-learn (``sklearn.datasets.load_digits``: 1,797
8x8 images, 10 classes; read from the installed package, nothing is downloaded). Split with the seed
into train (300), held-out (500, for the greedy search) and test (the rest); the distribution-shifted
test set is the test images moved one pixel to the right, at 80 % contrast, with Gaussian noise.

Zoo: a small MLP is "pretrained" (AdamW, 60 epochs on noise-augmented training images), then
fine-tuned N times with small learning rates and hyperparameters drawn from a grid as in the paper's
random search (learning rate, weight decay, label smoothing, augmentation, epochs, seed), two of them
with learning rates that are too large. All are
saved as safetensors. Then: every ingredient, the uniform soup, the greedy soup (cached-logit search),
the learned soups (per model and layer-wise), the uniform and greedy logit ensembles, on held-out,
test and shift; the table, ``results.jsonl``,
the greedy soup and the paper-style figure (``soups.png``: held-out accuracy on x, test and shift on y,
one panel each, zoomed on the fine-tunes) are written to ``--out``. Without matplotlib the figure is
skipped (one line says so, with the pip command); everything else is the same.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from ._errors import ArgumentError, FastsoupError

TRAIN, HELDOUT = 300, 500
BATCH = 32
GRID = {
    "lr": [5e-5, 1e-4, 2e-4],
    "weight_decay": [0.0, 1e-4, 1e-2, 0.1],
    "label_smoothing": [0.0, 0.1, 0.2],
    "augment": ["none", "noise", "shift"],
    "epochs": [10, 20],
}
TOO_LARGE_LR = [3e-2, 1e-1]


def _torch():
    import torch

    return torch


def load_data(seed: int) -> dict[str, Any]:
    """The digits, split and shifted as described in the module docstring: ``{name: (x, y)}``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FastsoupError(
            "fastsoup demo uses the digits data set that ships inside scikit-learn: pip install 'fastsoup[demo]' "
            "(or pip install scikit-learn matplotlib)"
        ) from None
    torch = _torch()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, held, test = perm[:TRAIN], perm[TRAIN:TRAIN + HELDOUT], perm[TRAIN + HELDOUT:]
    g = torch.Generator().manual_seed(seed + 1)
    shifted = torch.roll(x[test].view(-1, 8, 8), shifts=1, dims=2)
    shifted = (0.8 * shifted + 0.15 * torch.randn(shifted.shape, generator=g)).reshape(-1, 64)
    return {"train": (x[train], y[train]), "heldout": (x[held], y[held]), "test": (x[test], y[test]),
            "shift": (shifted, y[test])}


def make_model():
    """The demo's classifier: an MLP on the 64 pixels."""
    nn = _torch().nn
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))


def batches(x, y, size: int = 100) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _train(model, x, y, *, lr, weight_decay, label_smoothing, augment, epochs, seed):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for b in range(0, len(y), BATCH):
            idx = perm[b:b + BATCH]
            xb = x[idx]
            if augment == "noise":
                xb = xb + 0.3 * torch.randn(xb.shape, generator=g)
            elif augment == "shift":
                xb = torch.roll(xb.view(-1, 8, 8), shifts=(rng.choice([-1, 0, 1]), rng.choice([-1, 0, 1])),
                                dims=(1, 2)).reshape(-1, 64)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=label_smoothing)
            loss.backward()
            opt.step()
    model.eval()
    return model


def hyperparameters(models: int, seed: int) -> list[dict]:
    """The random search: one draw from GRID per fine-tune; two draws get a too-large learning rate."""
    rng = random.Random(seed)
    hps = []
    for i in range(models):
        hp = {k: rng.choice(v) for k, v in GRID.items()}
        hp["seed"] = seed * 1000 + i
        hps.append(hp)
    bad = rng.sample(range(models), min(2, max(models - 2, 0)))
    for lr, i in zip(TOO_LARGE_LR, bad):
        hps[i]["lr"] = lr
    return hps


def build_zoo(out: str, models: int, seed: int, data: dict, log=print) -> list[str]:
    """Pretrains once and fine-tunes ``models`` times; returns the safetensors paths."""
    from . import save

    torch = _torch()
    torch.manual_seed(seed)
    zoo = os.path.join(out, "zoo")
    os.makedirs(zoo, exist_ok=True)
    x, y = data["train"]
    start = time.perf_counter()
    pre = _train(make_model(), x, y, lr=1e-3, weight_decay=0.0, label_smoothing=0.0, augment="noise", epochs=60,
                 seed=seed)
    init = {k: v.detach().clone() for k, v in pre.state_dict().items()}
    save(init, os.path.join(zoo, "pretrained.safetensors"), overwrite=True)
    hps = hyperparameters(models, seed)
    paths = []
    for i, hp in enumerate(hps):
        model = make_model()
        model.load_state_dict(init)
        _train(model, x, y, **hp)
        path = os.path.join(zoo, f"ft-{i:02d}.safetensors")
        save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, overwrite=True,
             metadata={"format": "pt", "hparams": json.dumps(hp)})
        paths.append(path)
    with open(os.path.join(zoo, "hparams.json"), "w") as f:
        json.dump({os.path.basename(p): hp for p, hp in zip(paths, hps)}, f, indent=1)
    log(f"zoo: pretrained + {models} fine-tunes in {time.perf_counter() - start:.1f} s -> {zoo}")
    return paths


def run_demo(out: str = "demo_out", models: int = 12, seed: int = 0, progress: bool | None = None, log=print) -> dict:
    """Runs the demo (see the module docstring); returns ``{"table", "rows", "figure", "greedy", ...}``."""
    if models < 3:
        raise ArgumentError(f"--models must be at least 3, got {models}")
    torch = _torch()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy neighbour
    from .report import MATPLOTLIB_HINT, MatplotlibMissing, _write_rows, plot_results, run_report

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    data = load_data(seed)
    paths = build_zoo(out, models, seed, data, log=log)
    evals = {name: batches(*data[name]) for name in ("test", "shift")}
    # A fresh cache per run of the demo (a rerun of `fastsoup greedy` on the zoo would reuse it).
    cache = os.path.join(out, "cache")
    if os.path.isdir(cache):
        import shutil

        shutil.rmtree(cache)
    report = run_report(paths, make_model(), batches(*data["heldout"]), evals, out=os.path.join(out, "greedy_soup.safetensors"),
                        cache_dir=cache, results=os.path.join(out, "results.jsonl"), progress=progress, overwrite=True)
    # The learned soups (the paper's appendix), per model and layer-wise, scored on every set.
    from .recipes.learned import learned_soup
    from .search import evaluate, prepare

    model = make_model()
    sets = {name: prepare(b, "cpu", name=name) for name, b in [("heldout", batches(*data["heldout"])), *evals.items()]}
    for layerwise in (False, True):
        r = learned_soup(paths, model, batches(*data["heldout"]), layerwise=layerwise, progress=progress, seed=seed)
        r.load_into(model)
        kind = "learned_soup_layerwise" if layerwise else "learned_soup"
        report.rows.insert(len(paths) + 2 + int(layerwise), {
            "name": "learned soup" + (" (layer-wise)" if layerwise else ""), "kind": kind,
            **{name: evaluate(model, d).score for name, d in sets.items()}})
    _write_rows(report.results_path, report.rows, merge=False)  # the demo's own file, every row new
    # Figures: the paper's soups figure, then the analyses' (below).
    figures: dict[str, str] = {}
    skipped = None
    try:
        figures["soups"] = plot_results(
            report.results_path, os.path.join(out, "soups.png"), x="heldout", y=["test", "shift"],
            title=f"fastsoup demo: {models} fine-tunes of one pretrained MLP on digits (seed {seed})",
            subtitle="held-out: the greedy search's data; test; shift: the test images moved 1 px, at 80 % contrast, "
                     "with noise")
    except MatplotlibMissing:
        skipped = f"figure skipped (matplotlib is not installed): {MATPLOTLIB_HINT}"
    # The paper's analyses (fastsoup.analysis), on the same held-out set: an 11 x 11 landscape through the
    # pretrained model and the two best fine-tunes (Fig. 2), and every pair's angle against its 2-soup's
    # gain (Fig. 3).
    from .analysis import overview

    pretrained = os.path.join(os.path.dirname(paths[0]), "pretrained.safetensors")
    analyses = overview(paths, make_model(), batches(*data["heldout"]), out, base=pretrained, steps=11,
                        progress=progress, overwrite=True)
    if skipped is None:
        for name in analyses:
            figures[name] = os.path.join(out, f"{name}.png")
    rows = {r["kind"] if r["kind"] != "individual" else r["name"]: r for r in report.rows}
    best = max((r for r in report.rows if r["kind"] == "individual"), key=lambda r: r["heldout"])
    g, u = rows["greedy_soup"], rows["uniform_soup"]
    summary = [
        f"best individual ({os.path.basename(best['name'])}): held-out {100 * best['heldout']:.2f}, "
        f"test {100 * best['test']:.2f}, shift {100 * best['shift']:.2f}",
        f"greedy soup ({len(report.greedy.indices)} of {models}): held-out {100 * g['heldout']:.2f}, "
        f"test {100 * g['test']:.2f}, shift {100 * g['shift']:.2f}",
        f"uniform soup (all {models}, incl. the too-large learning rates): held-out {100 * u['heldout']:.2f}, "
        f"test {100 * u['test']:.2f}, shift {100 * u['shift']:.2f}",
    ]
    land = analyses["landscape"]
    top = max(land.points, key=lambda r: r["accuracy"])
    a, b, c = land.names
    per = land.stats.get("seconds_per_soup")
    each = f", {1000 * per:.0f} ms each" if per else ""
    summary.append(f"landscape through {os.path.basename(a)}, {os.path.basename(b)}, {os.path.basename(c)} "
                   f"({len(land.points)} soups{each}): best held-out {100 * top['accuracy']:.2f} at x = {top['x']:g}, "
                   f"y = {top['y']:g} (A + x (B - A) + y (C - A))")
    if "pairs" in analyses:
        pr = analyses["pairs"]
        r = pr.summary["pearson_r"]
        summary.append(f"pairs: {len(pr.points)} 2-soups; correlation of the task vectors' angle with the 2-soup's gain "
                       f"over its two models: r = {'n/a' if r is None else f'{r:.2f}'}")
    seconds = time.perf_counter() - start
    return {"table": report.table(), "summary": summary, "rows": report.rows, "figure": figures.get("soups"),
            "figures": figures, "figure_skipped": skipped, "greedy": report.greedy, "out": report.out,
            "analyses": analyses,
            "results": report.results_path, "seconds": seconds}


def main(out: str, models: int, seed: int, progress: bool | None) -> int:
    r = run_demo(out, models, seed, progress)
    print(r["table"])
    print()
    print("\n".join(r["summary"]))
    wrote = [r["out"], r["results"], *(os.path.join(os.path.dirname(r["results"]), f"{n}.jsonl") for n in r["analyses"]),
             *r["figures"].values()]
    print(f"\nwrote {', '.join(wrote[:-1])} and {wrote[-1]} in {r['seconds']:.1f} s")
    if r["figure_skipped"]:
        print(r["figure_skipped"])
    return 0
