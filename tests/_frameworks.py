"""Training-framework checkpoints, written as the frameworks' training scripts write them.

timm's ``train.py`` saves through ``timm/utils/checkpoint_saver.py`` (``CheckpointSaver._save``,
without a task)::

    save_state = {'epoch': epoch, 'arch': type(model).__name__.lower(),
                  'optimizer': optimizer.state_dict(), 'version': 2}
    save_state['arch'] = args.model; save_state['args'] = args          # an argparse.Namespace
    save_state[amp_scaler.state_dict_key] = amp_scaler.state_dict()     # 'amp_scaler', with --amp
    save_state['state_dict'] = get_state_dict(model, unwrap_model)
    save_state['state_dict_ema'] = get_state_dict(model_ema, unwrap_model)   # with --model-ema
    save_state['metric'] = metric
    torch.save(save_state, 'tmp.pth.tar'); os.replace -> 'last.pth.tar'
    os.link('last.pth.tar', 'checkpoint-{epoch}.pth.tar'); os.link(..., 'model_best.pth.tar')

into ``output/train/<date>-<model>-<size>/`` (with ``args.yaml`` and ``summary.csv``).

open_clip's training ``main.py`` (``src/open_clip_train/legacy_main.py``, and ``save_checkpoint`` of
``open_clip/task/checkpoint.py``)::

    checkpoint_dict = {"epoch": completed_epoch, "name": args.name,
                       "state_dict": original_model.state_dict(),   # DDP-wrapped: 'module.' keys
                       "optimizer": optimizer.state_dict()}
    checkpoint_dict["scaler"] = scaler.state_dict()                  # with --precision amp
    torch.save(checkpoint_dict, 'logs/<name>/checkpoints/epoch_{n}.pt')   # and epoch_latest.pt

The models here are small stand-ins of the same structure (a conv net with batch norm for timm, a
two-tower CLIP for open_clip), trained for a few real AdamW steps so the optimizer states hold what
real ones hold (step counts, moments).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

NUM_CLASSES = 5


class TinyResNet(nn.Module):
    """A timm-style classifier: conv_stem, bn1 (running stats, num_batches_tracked), act, pool, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn1(self.conv_stem(x)))).flatten(1))


def timm_args(model: str, output: str, *, seed: int, lr: float) -> argparse.Namespace:
    """The arguments as timm's train.py parses and then amends them (a subset of its options)."""
    p = argparse.ArgumentParser(description="PyTorch ImageNet Training")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--model", default="resnet50", type=str)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", default=None, nargs=3, type=int)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--opt", default="sgd", type=str)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=2e-5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model-ema", action="store_true", default=False)
    p.add_argument("--model-ema-decay", type=float, default=0.9998)
    p.add_argument("--amp", action="store_true", default=False)
    p.add_argument("--no-prefetcher", action="store_true", default=False)
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--eval-metric", default="top1", type=str)
    p.add_argument("--output", default="", type=str)
    p.add_argument("--experiment", default="", type=str)
    p.add_argument("--device", default="cuda", type=str)
    args = p.parse_args([
        "--model", model, "--num-classes", str(NUM_CLASSES), "--input-size", "3", "16", "16",
        "--mean", "0.485", "0.456", "0.406", "-b", "8", "--opt", "adamw", "--lr", str(lr), "--epochs", "2",
        "--seed", str(seed), "--model-ema", "--model-ema-decay", "0.9", "--amp", "--output", output,
        "--device", "cpu",
    ])
    # What train.py sets after parsing (main(), utils.init_distributed_device).
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    args.distributed = False
    args.world_size = 1
    args.rank = 0
    args.local_rank = 0
    return args


def _amp_scaler_state() -> dict:
    """What timm's NativeScaler (torch.amp.GradScaler) saves as 'amp_scaler'."""
    return {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 3}


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """timm's ModelEmaV3 step: float entries lerp towards the model, the others are copied."""
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m, 1.0 - decay)
            else:
                e.copy_(m)


def _steps(model: nn.Module, optimizer, seed: int, n: int, shape) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x = torch.randn(8, *shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def timm_save_state(model, model_ema, optimizer, args, epoch: int, metric) -> dict:
    """``CheckpointSaver._save`` (timm/utils/checkpoint_saver.py, no task), entry for entry."""
    save_state = {
        "epoch": epoch,
        "arch": type(model).__name__.lower(),
        "optimizer": optimizer.state_dict(),
        "version": 2,
    }
    if args is not None:
        save_state["arch"] = args.model
        save_state["args"] = args
    save_state["amp_scaler"] = _amp_scaler_state()
    save_state["state_dict"] = model.state_dict()  # get_state_dict(model, unwrap_model)
    if model_ema is not None:
        save_state["state_dict_ema"] = model_ema.state_dict()
    if metric is not None:
        save_state["metric"] = metric
    return save_state


def write_timm_run(root: str, init: dict, run: int, *, model_cls=TinyResNet, arch: str = "tinyresnet",
                   name: str | None = None) -> dict:
    """One timm train.py run from ``init``: 2 epochs of AdamW steps with an EMA, saved after each
    epoch as CheckpointSaver does, in output/train/NAME (default: timm's date-model-size).
    Returns {"dir", "last", "best", "state_dict", "ema"} (the last epoch's weights, as saved)."""
    torch.manual_seed(run)
    exp = os.path.join(root, "output", "train", name or f"20261201-00000{run}-{arch}-16")
    os.makedirs(exp)
    args = timm_args(arch, os.path.join(root, "output", "train"), seed=run, lr=0.01 * (run + 1))
    model = model_cls()
    model.load_state_dict(init)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    with open(os.path.join(exp, "args.yaml"), "w") as f:
        f.write("".join(f"{k}: {v!r}\n" for k, v in vars(args).items()))
    best = None
    last = os.path.join(exp, "last.pth.tar")
    for epoch in range(args.epochs):
        for step in range(3):
            _steps(model, optimizer, seed=100 * run + 10 * epoch + step, n=1, shape=(3, 16, 16))
            _ema_update(ema, model, args.model_ema_decay)
        metric = 40.0 + 10 * run + epoch  # eval top1 (a Python float)
        tmp = os.path.join(exp, "tmp.pth.tar")
        torch.save(timm_save_state(model, ema, optimizer, args, epoch, metric), tmp)
        os.replace(tmp, last)
        os.link(last, os.path.join(exp, f"checkpoint-{epoch}.pth.tar"))
        if best is None or metric > best:
            best = metric
            best_path = os.path.join(exp, "model_best.pth.tar")
            if os.path.exists(best_path):
                os.unlink(best_path)
            os.link(last, best_path)
    with open(os.path.join(exp, "summary.csv"), "w") as f:
        f.write("epoch,train_loss,eval_top1\n0,1.6,40.0\n1,1.5,41.0\n")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema_sd = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    return {"dir": exp, "last": last, "best": os.path.join(exp, "model_best.pth.tar"), "state_dict": sd, "ema": ema_sd}


def timm_zoo(root: str, runs: int = 3, names=None) -> list[dict]:
    torch.manual_seed(0)
    init = TinyResNet().state_dict()
    return [write_timm_run(root, init, r, name=names[r] if names else None) for r in range(runs)]


# ---------------------------------------------------------------------------------------------------
# open_clip


class _Tower(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class TinyCLIP(nn.Module):
    """A two-tower CLIP with open_clip's top-level names: visual, token_embedding,
    positional_embedding, transformer, ln_final, text_projection, logit_scale."""

    def __init__(self, width: int = 16, embed: int = 8, vocab: int = 32, ctx: int = 6):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), nn.Flatten(2))
        self.visual_proj = nn.Parameter(torch.randn(width, embed) * 0.1)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.01)
        self.transformer = _Tower(width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * 0.1)
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.659)

    def forward(self, image, text):
        img = self.visual(image).mean(-1) @ self.visual_proj
        txt = self.ln_final(self.transformer(self.token_embedding(text) + self.positional_embedding))
        txt = txt[:, -1] @ self.text_projection
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * img @ txt.T


class DDP(nn.Module):
    """Stands in for DistributedDataParallel: the wrapped model under ``.module`` (so its state
    dict's keys start with ``module.``, as open_clip's ``original_model.state_dict()`` under DDP)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def _clip_steps(model: nn.Module, optimizer, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        image = torch.randn(4, 3, 8, 8, generator=g)
        text = torch.randint(0, 32, (4, 6), generator=g)
        logits = model(image, text)
        labels = torch.arange(4)
        loss = (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def open_clip_checkpoint(model: nn.Module, optimizer, *, epoch: int, name: str, scaler: dict | None) -> dict:
    """open_clip's training main: the checkpoint dict, entry for entry."""
    checkpoint_dict = {
        "epoch": epoch,
        "name": name,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    if scaler is not None:
        checkpoint_dict["scaler"] = scaler
    return checkpoint_dict


def write_open_clip_run(root: str, init: dict, run: int, model_cls=TinyCLIP) -> dict:
    """One open_clip training run under DDP: epochs 1 and 2 saved as epoch_N.pt and
    epoch_latest.pt in logs/<name>/checkpoints/. Returns {"latest", "state_dict"} (the unwrapped
    model's state dict, without the 'module.' prefix)."""
    torch.manual_seed(run)
    name = f"2026_12_01-00_00_0{run}-model_tiny-lr_{1e-3 * (run + 1):g}-b_4-j_1-p_amp"
    ckdir = os.path.join(root, "logs", name, "checkpoints")
    os.makedirs(ckdir)
    model = model_cls()
    model.load_state_dict(init)
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3 * (run + 1), weight_decay=0.2)
    scaler = _amp_scaler_state()
    latest = os.path.join(ckdir, "epoch_latest.pt")
    for completed_epoch in (1, 2):
        _clip_steps(ddp, optimizer, seed=100 * run + completed_epoch, n=2)
        checkpoint_dict = open_clip_checkpoint(ddp, optimizer, epoch=completed_epoch, name=name, scaler=scaler)
        torch.save(checkpoint_dict, os.path.join(ckdir, f"epoch_{completed_epoch}.pt"))
        tmp = os.path.join(ckdir, "tmp.pt")
        torch.save(checkpoint_dict, tmp)
        os.replace(tmp, latest)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"latest": latest, "state_dict": sd}


def open_clip_zoo(root: str, runs: int = 3) -> list[dict]:
    torch.manual_seed(0)
    init = TinyCLIP().state_dict()
    return [write_open_clip_run(root, init, r) for r in range(runs)]


def mean_state_dict(sds: list[dict]) -> dict:
    """The uniform soup computed as fastsoup does (the plain-torch reference of the kernels' order:
    the sum divided once by K, rounded once; integer tensors from the first)."""
    from fastsoup import _reference

    return _reference.average_state_dicts(sds)


def soup_state_dict(sds: list[dict]) -> dict:
    """A :class:`fastsoup.Soup` of weight-1 ingredients, as the reference computes it (the float32
    running sum in the order added, divided once by W and rounded once)."""
    from fastsoup import _reference

    return _reference.soup_state_dict(sds, sds[0])
