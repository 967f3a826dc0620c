"""The greedy benchmark's model and ingredients (bench_greedy.py): a small ViT (8 x 8
patch-embedding conv, class token, learned positional embedding, pre-norm
``nn.TransformerEncoderLayer`` blocks, LayerNorm, linear head; float32), one shared init (AdamW on the
generated training images) and N fine-tunes of it (SGD with momentum, learning rates spread over
0.003 .. 0.05, own seeds), saved as ``.pt`` (what the official code loads) and ``.safetensors`` (what
fastsoup reads) of the same tensors, and reused from the working folder when the config matches.

Fine-tunes whose held-out accuracy ties another's are fine-tuned again with another seed (unless
``allow_ties``): on ties the official ranking (ascending sort, then reversed) and fastsoup's (stable
descending) try the tied models in opposite orders, a difference of ranking rule, not of speed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsoup

from .data import Config


class SmallViT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dim
        self.patch_embed = nn.Conv2d(3, d, cfg.patch, cfg.patch)
        tokens = (cfg.crop // cfg.patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def make_model(cfg: Config) -> SmallViT:
    torch.manual_seed(12345)  # the weights are overwritten; a fixed seed keeps runs alike
    return SmallViT(cfg)


def train(model, x, y, steps, lr, seed, batch, opt="sgd"):
    g = torch.Generator().manual_seed(seed)
    if opt == "sgd":
        o = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        o = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        o.zero_grad()
        loss.backward()
        o.step()
    model.eval()


def correct_batches(model, x, y, batch):
    """Correct top-1 count, batch by batch as the DataLoader gives them."""
    c = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            c += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return c


def ingredient_paths(cfg: Config, folder: str) -> tuple[list, list]:
    """The ingredients' ``.pt`` and ``.safetensors`` paths in ``folder``."""
    return ([os.path.join(folder, f"model_{i}.pt") for i in range(cfg.n)],
            [os.path.join(folder, f"model_{i}.safetensors") for i in range(cfg.n)])


def make_ingredients(cfg: Config, folder: str, xtr, ytr, xte, yte, allow_ties: bool, log, pipeline: str):
    """The shared init and N fine-tunes; returns (.pt paths, .safetensors paths, setup accuracies).
    Reused from ``folder`` when an earlier run with the same config left them there."""
    pts, sts = ingredient_paths(cfg, folder)
    manifest = os.path.join(folder, "manifest.json")
    stamp = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("quiet_wait", "max_redo")},
             "pipeline": pipeline,
             "allow_ties": allow_ties}
    try:
        with open(manifest) as f:
            m = json.load(f)
        if m["stamp"] == stamp and all(os.path.exists(p) for p in pts + sts):
            log(f"ingredients: reused from {folder}: init {m['init_correct']}/{cfg.heldout} correct; "
                f"fine-tunes {m['correct']}")
            return pts, sts, m["correct"], m["init_correct"]
    except (OSError, ValueError, KeyError):
        pass
    model = make_model(cfg)
    t = time.perf_counter()
    train(model, xtr, ytr, cfg.init_steps, 1e-3, cfg.seed, cfg.train_batch, opt="adamw")
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    init_correct = correct_batches(model, xte, yte, cfg.batch_size)
    sds, correct = [], []
    for i in range(cfg.n):
        lr = 0.003 * 1.5 ** (i % 8)
        for attempt in range(8):
            model.load_state_dict(init)
            train(model, xtr, ytr, cfg.finetune_steps, lr, 100 + i + 1000 * attempt, cfg.train_batch)
            c = correct_batches(model, xte, yte, cfg.batch_size)
            if allow_ties or c not in correct:
                break
        sds.append({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
        correct.append(c)
    log(f"ingredients: init {init_correct}/{cfg.heldout} correct; fine-tunes {correct} "
        f"({time.perf_counter() - t:.1f} s to train)")
    for sd, pt, st in zip(sds, pts, sts):
        torch.save(sd, pt)
        fastsoup.save(sd, st, overwrite=True)
    with open(manifest, "w") as f:
        json.dump({"stamp": stamp, "correct": correct, "init_correct": init_correct}, f)
    return pts, sts, correct, init_correct
