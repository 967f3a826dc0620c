"""Learned soup: how long the default trains (issue 23 §1), on a tiny synthetic task.

    python benchmarks/bench_learned.py [--batches 4 100] [--json PATH]

The task (everything generated here, nothing downloaded; tests/_tiny.py's teacher task): 16 inputs,
4 classes from a fixed random linear teacher with noise on its logits; an MLP 16 -> 32 -> 4 (ReLU),
float32. One shared init (one epoch of SGD on other data), then 4 fine-tunes of it (SGD, 2 epochs of
batches of 8 on 400 examples), learning rates 0.3, 0.5, 0.2 and 2.0: the last diverges (held-out
accuracy ~30 %, finite weights), the issue's "one diverged" setting. Held-out sets of N batches of 64
(``--batches``), a test set of 2,000 examples.

For every held-out size it runs the learned soup (per model and layer-wise) with the old default
(``epochs=5``: 5 N steps) and the new one (no ``epochs``/``steps``: whole epochs, at least 5 and at
least 500 steps), the greedy soup, and scores every ingredient: held-out and test accuracy, the
steps run and the median time per step (``LearnedResult.seconds_per_step``: the mix, forward and
backward, the gradient pass, AdamW), and the largest difference of its coefficients from the same
run in plain torch (``plain_torch_learned``: the official algorithm with all K models in memory and
autograd through the sum, the same batch order). Time per step is of one process on a shared 2-core machine:
read it as the order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import _tiny  # noqa: E402

import fastsoup  # noqa: E402
from fastsoup.recipes.learned import LearnedSoupWarning, learned_soup  # noqa: E402

RUNS = [(0.3, 1), (0.5, 2), (0.2, 3), (2.0, 7)]


def build(folder: str, n_batches: int):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = _tiny.MLP()
    xp, yp = _tiny.make_data(1000, 1)
    _tiny.train(base, xp, yp, lr=0.05, seed=0, epochs=1)
    init = _tiny.clone_state(base)
    xt, yt = _tiny.make_data(400, 2)
    held = _tiny.batches(*_tiny.make_data(64 * n_batches, 3), 64)
    test = _tiny.batches(*_tiny.make_data(2000, 4), 500)
    paths = []
    for i, (lr, seed) in enumerate(RUNS):
        m = _tiny.MLP()
        m.load_state_dict(init)
        _tiny.train(m, xt, yt, lr=lr, seed=seed, epochs=2)
        p = os.path.join(folder, f"ft{i}-lr{lr}.safetensors")
        save_file(_tiny.clone_state(m), p)
        paths.append(p)

    def model() -> nn.Module:
        m = _tiny.MLP()
        m.load_state_dict(init)
        return m

    return paths, held, test, model


def plain_torch_learned(paths, model: nn.Module, held, steps: int, layerwise: bool, seed: int = 0,
                        lr: float = 0.05) -> torch.Tensor:
    """The official algorithm in plain torch, all K state dicts in memory (the cross-check): softmax
    over the models from uniform, beta 1, AdamW (no weight decay), the batch order learned_soup uses
    (a permutation of the batches per epoch from ``torch.Generator().manual_seed(seed)``), autograd
    through sum_k alpha_k theta_k. Returns the coefficients as learned_soup does."""
    from torch.func import functional_call

    sds = []
    for p in paths:
        ck = fastsoup.open_checkpoint(p)
        sds.append({n: ck.tensor(n) for n in ck})
    names = list(sds[0])
    K = len(sds)
    raw = torch.nn.Parameter(torch.log(torch.full((len(names) if layerwise else 1, K), 1.0 / K)))
    beta = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.AdamW([raw, beta], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list = []
    model.eval()
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(held), generator=gen).tolist()
        x, y = held[order.pop(0)]
        alpha = torch.softmax(raw, dim=1)
        params = {n: sum(alpha[i if layerwise else 0, k] * sds[k][n] for k in range(K)) for i, n in enumerate(names)}
        loss = nn.functional.cross_entropy(functional_call(model, params, (x,)) * beta, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = torch.softmax(raw, dim=1).detach()
    return a if layerwise else a[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 100])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nb in args.batches:
            folder = os.path.join(tmp, f"b{nb}")
            os.makedirs(folder)
            paths, held, test, model = build(folder, nb)
            for i, p in enumerate(paths):
                m = model()
                ck = fastsoup.open_checkpoint(p)
                m.load_state_dict({n: ck.tensor(n) for n in ck})
                rows.append({"batches": nb, "what": f"ingredient {i} (lr {RUNS[i][0]})", "heldout": _tiny.accuracy(m, held),
                             "test": _tiny.accuracy(m, test)})
            g = fastsoup.greedy_soup(paths, model(), held, progress=False)
            m = model()
            g.load_into(m)
            rows.append({"batches": nb, "what": f"greedy soup ({len(g.indices)} of {len(paths)})",
                         "heldout": g.score, "test": _tiny.accuracy(m, test)})
            for layerwise in (False, True):
                for label, kw in (("before: epochs=5", {"epochs": 5}), ("after: default", {})):
                    m = model()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", LearnedSoupWarning)
                        r = learned_soup(paths, m, held, layerwise=layerwise, progress=False, **kw)
                    r.load_into(m)
                    ref = plain_torch_learned(paths, model(), held, r.steps, layerwise)
                    rows.append({"batches": nb, "what": f"learned{' layer-wise' if layerwise else ''}, {label}",
                                 "heldout": r.score, "test": _tiny.accuracy(m, test), "steps": r.steps,
                                 "ms_per_step": 1000 * r.seconds_per_step, "loss": r.loss,
                                 "uniform_loss": r.uniform_loss,
                                 "plain_torch_max_diff": float((r.coefficients - ref).abs().max()),
                                 "warned": any(issubclass(w.category, LearnedSoupWarning) for w in caught)})
    print(f"{'held-out':>9}  {'':<40} {'held-out':>8} {'test':>7} {'steps':>6} {'ms/step':>8}  loss (uniform)   "
          "max |coefficient - plain torch|")
    for r in rows:
        extra = ""
        if "steps" in r:
            extra = (f" {r['steps']:>6} {r['ms_per_step']:>8.2f}  {r['loss']:.4f} ({r['uniform_loss']:.4f})"
                     f"  {r['plain_torch_max_diff']:.1e}" + ("  warned" if r["warned"] else ""))
        print(f"{r['batches']:>3} x 64  {r['what']:<40} {100 * r['heldout']:>8.2f} {100 * r['test']:>7.2f}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
