"""A tiny model zoo trained in the tests: one shared init of a small MLP, fine-tuned with SGD at several
learning rates and seeds on data from a random linear teacher with noise (so held-out accuracy is well
below 100% and soups of the ingredients can beat each of them).

The zoo mimics the model-soups setting: a "pre-trained" init (one epoch on other data), then fine-tuning
runs that differ in learning rate and data order, one of them with a learning rate far too large (it
diverges and must be rejected). Training all of it takes well under a second on a CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

IN, HIDDEN, CLASSES = 16, 32, 4
TEACHER_SEED = 1234
NOISE = 0.5
HELDOUT_SIZE = 301  # batches of 64: four full ones and an odd-sized last one (45)
BATCH = 64

# (learning rate, seed) of every fine-tuning run; 20.0 is far too large (the run diverges).
RUNS = [(0.3, 1), (0.5, 2), (0.2, 3), (0.4, 4), (0.3, 5), (0.01, 6), (20.0, 7), (0.5, 8)]
DIVERGED = 6  # index of the run with the too-large learning rate


class MLP(nn.Module):
    """16 -> hidden -> 4 with an activation; every parameter float32."""

    def __init__(self, hidden: int = HIDDEN, act: type = nn.ReLU):
        super().__init__()
        self.fc1 = nn.Linear(IN, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def make_data(n: int, seed: int, noise: float = NOISE):
    """n examples of a fixed random linear teacher, argmax over CLASSES, with Gaussian noise on its logits."""
    teacher = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(TEACHER_SEED))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = (x @ teacher + noise * torch.randn(n, CLASSES, generator=g)).argmax(-1)
    return x, y


def batches(x, y, size: int = BATCH) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def train(model: nn.Module, x, y, *, lr: float, seed: int, epochs: int, batch: int = 8) -> nn.Module:
    # Plain SGD by hand: torch.optim imports torch._dynamo on first use (over a second).
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.sub_(lr * gr)
    return model


def clone_state(model_or_sd) -> dict:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {k: v.detach().clone() for k, v in sd.items()}


@dataclass
class Zoo:
    init: dict  # the shared init's state dict
    state_dicts: list  # fine-tuned state dicts, in RUNS order
    paths: list  # the same as .safetensors files
    heldout: list  # (x, y) batches, the last one odd-sized
    float_bytes: int  # bytes of float tensors in one ingredient file (all of its tensors)

    def model(self, **kwargs) -> MLP:
        """A fresh model with the shared init loaded."""
        m = MLP(**kwargs)
        m.load_state_dict(self.init)
        return m


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread: for tiny models extra threads only cost (training the zoo is 10x
    slower with 2 threads on a busy 2-core machine, as they spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_zoo(folder) -> Zoo:
    with one_thread():
        return _build_zoo(folder)


def _build_zoo(folder) -> Zoo:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = MLP()
    xp, yp = make_data(1000, 1)
    train(base, xp, yp, lr=0.05, seed=0, epochs=1)  # the "pre-trained" shared init
    init = clone_state(base)
    xt, yt = make_data(400, 2)
    xh, yh = make_data(HELDOUT_SIZE, 3)
    sds, paths = [], []
    for i, (lr, seed) in enumerate(RUNS):
        m = MLP()
        m.load_state_dict(init)
        train(m, xt, yt, lr=lr, seed=seed, epochs=2)
        sd = clone_state(m)
        path = os.path.join(os.fspath(folder), f"run{i}-lr{lr}.safetensors")
        save_file(sd, path, metadata={"format": "pt"})
        sds.append(sd)
        paths.append(path)
    nbytes = sum(t.numel() * t.element_size() for t in sds[0].values())
    return Zoo(init, sds, paths, batches(xh, yh), nbytes)


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data:
            correct += int((model(x).argmax(-1) == y).sum())
            total += int(y.shape[0])
    return correct / total


def logits_of(model: nn.Module, sd: dict, data) -> torch.Tensor:
    """All held-out logits of ``model`` with ``sd`` loaded (plain torch)."""
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x).float() for x, _ in data])
