"""Greedy soup: ``fastsoup.greedy_soup`` against a plain-torch reproduction of the official model-soups
``main.py`` greedy loop (``_official_greedy.py``), side by side in one run, medians of interleaved rounds.

    python benchmarks/bench_greedy.py [--pipeline jpeg|memory] [--n 16] [--reps 3] [--quick] [--json PATH] [--txt PATH] [--workdir DIR]

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
import gc
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(HERE))  # the repository root: `import fastsoup`, `benchmarks`

import fastsoup  # noqa: E402
import fastsoup.search.greedy  # noqa: E402,F401  (imported here, outside every clock: greedy_soup is lazy)
from benchmarks._official_greedy import official_greedy  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Config:
    n: int = 16  # ingredients
    classes: int = 10
    heldout: int = 4096  # held-out images
    train: int = 8192  # training images (init and fine-tunes)
    raw: int = 64  # decoded image side (uint8 HWC in memory)
    resize: int = 36  # Resize(...) side
    crop: int = 32  # CenterCrop(...) side = model input
    batch_size: int = 128
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp: int = 256
    patch: int = 8
    noise: float = 0.5  # pixel noise (std, on [0, 1] images)
    similarity: float = 0.6  # how much the class templates share (0: unrelated, 1: identical)
    init_steps: int = 60  # AdamW steps of the shared init
    finetune_steps: int = 40  # SGD steps of each fine-tune
    train_batch: int = 64
    seed: int = 1
    quiet_wait: float = 60.0  # seconds to wait at most for a quiet machine before each timed run
    max_redo: int = 6  # rounds set aside for noise (then run again) at most


QUICK = dict(n=4, heldout=512, train=1024, init_steps=20, finetune_steps=10, batch_size=64, quiet_wait=5.0, max_redo=0)


# ---------------------------------------------------------------------------------------------------
# Data


def make_templates(cfg: Config, g: torch.Generator) -> torch.Tensor:
    base = torch.rand(1, 3, 6, 6, generator=g)
    low = (1 - cfg.similarity) * torch.rand(cfg.classes, 3, 6, 6, generator=g) + cfg.similarity * base
    side = cfg.raw + 16
    return F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def make_images(cfg: Config, n: int, templates: torch.Tensor, g: torch.Generator):
    """n decoded images (uint8, N x H x W x 3) and their labels."""
    raw = cfg.raw
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    z = torch.randint(0, cfg.classes, (n,), generator=g)
    a = 0.5 + 0.5 * torch.rand(n, generator=g)
    b = 0.5 * torch.rand(n, generator=g)
    dx = torch.randint(0, 17, (n,), generator=g).tolist()
    dy = torch.randint(0, 17, (n,), generator=g).tolist()
    imgs = torch.empty(n, 3, raw, raw)
    for i in range(n):
        sl = (slice(None), slice(dy[i], dy[i] + raw), slice(dx[i], dx[i] + raw))
        imgs[i] = (a[i] * templates[y[i]][sl] + b[i] * templates[z[i]][sl]) / (a[i] + b[i])
    imgs += cfg.noise * torch.randn(n, 3, raw, raw, generator=g)
    u8 = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return u8, y


class EvalImages(Dataset):
    """Held-out images with their labels; ``__getitem__`` gives one image through the eval transform
    (the subclass's ``tensor(i)``: decode or not, resize, crop, as float CHW in [0, 1]), normalized."""

    def __init__(self, items, labels: torch.Tensor, resize: int, crop: int):
        self.items, self.labels = items, labels.tolist()
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.tensor(i) - self.mean) / self.std, self.labels[i]


class JpegFiles(EvalImages):
    """Held-out images as JPEG files (``items``: paths), read as torchvision's ``ImageFolder`` does
    (its default PIL loader), with the eval transform on the PIL image: Resize (PIL bilinear),
    CenterCrop, ToTensor (then Normalize)."""

    def tensor(self, i: int) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with open(self.items[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        img = img.resize((self.resize, self.resize), Image.BILINEAR)
        o = (self.resize - self.crop) // 2
        img = img.crop((o, o, o + self.crop, o + self.crop))
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def write_jpegs(u8: torch.Tensor, folder: str, quality: int = 90) -> list:
    """Writes every image of ``u8`` (N x H x W x 3) as ``folder/00000.jpg`` ...; returns the paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(u8.numpy()):
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(img).save(path, quality=quality)
        paths.append(path)
    return paths


class DecodedImages(EvalImages):
    """Decoded uint8 HWC images in memory (``items``: an N x H x W x 3 tensor), through the eval
    transform: ToTensor (HWC uint8 -> CHW float / 255), Resize (bilinear, antialiased), CenterCrop
    (then Normalize)."""

    def tensor(self, i: int) -> torch.Tensor:
        x = self.items[i].permute(2, 0, 1).float().div_(255)
        x = F.interpolate(x[None], size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                          antialias=True)[0]
        o = (self.resize - self.crop) // 2
        return x[:, o:o + self.crop, o:o + self.crop]


def transform_batch(u8: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The same transform on a whole batch (for training and the untimed analysis; equal bit for bit)."""
    x = u8.permute(0, 3, 1, 2).float().div_(255)
    x = F.interpolate(x, size=(cfg.resize, cfg.resize), mode="bilinear", align_corners=False, antialias=True)
    o = (cfg.resize - cfg.crop) // 2
    x = x[:, :, o:o + cfg.crop, o:o + cfg.crop]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------
# Model


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


# ---------------------------------------------------------------------------------------------------
# Ingredients


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


def make_ingredients(cfg: Config, folder: str, xtr, ytr, xte, yte, allow_ties: bool, log, pipeline: str):
    """The shared init and N fine-tunes; returns (.pt paths, .safetensors paths, setup accuracies).
    Reused from ``folder`` when an earlier run with the same config left them there."""
    pts = [os.path.join(folder, f"model_{i}.pt") for i in range(cfg.n)]
    sts = [os.path.join(folder, f"model_{i}.safetensors") for i in range(cfg.n)]
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


def fingerprint_bytes(path: str) -> int:
    """Checkpoint bytes fastsoup's cache fingerprint reads (outside its bytes_read counters)."""
    from fastsoup.search import cache

    n = 0
    for ref in fastsoup.open_checkpoint(path).values():
        n += ref.nbytes if ref.nbytes <= cache.WHOLE_BYTES else cache.SAMPLES * cache.SAMPLE_BYTES
    return n


# ---------------------------------------------------------------------------------------------------
# Contenders


class ForeignCPU:
    """CPU seconds that other processes used while the block ran (/proc/stat busy time of the whole
    machine minus this process's own CPU time): how noisy the 2 vCPUs were during a run."""

    def __enter__(self):
        self.busy, self.own = _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = max(0.0, (_busy_seconds() - self.busy) - (_own_seconds() - self.own))
        return False


def _busy_seconds() -> float:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_quiet(max_wait: float, window: float = 0.5, threshold: float = 0.1) -> float:
    """Waits (up to max_wait seconds) until other processes use under ``threshold`` of a CPU over a
    ``window``; returns the seconds waited. Other work on this 2-vCPU machine slows torch's two
    OpenMP threads many times over, so every timed run starts on a quiet machine when it can."""
    t0 = time.perf_counter()
    while True:
        with ForeignCPU() as noise:
            time.sleep(window)
        waited = time.perf_counter() - t0
        if noise.seconds < threshold * window or waited >= max_wait:
            return waited


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
    model = make_model(cfg)
    gc.collect()
    waited = wait_quiet(cfg.quiet_wait)
    with ForeignCPU() as noise:
        t0 = time.perf_counter()
        res = fastsoup.greedy_soup(sts, model, loader, strict=True, cache_dir=cache_dir, progress=False, reorder=reorder)
        seconds = time.perf_counter() - t0
    s = res.stats
    known = s.prepare_seconds + s.individual_seconds + s.form_seconds + s.eval_seconds
    return {
        "result": res,
        "seconds": seconds,
        "prepare_seconds": s.prepare_seconds,
        "individual_seconds": s.individual_seconds,
        "form_seconds": s.form_seconds,
        "eval_seconds": s.eval_seconds,
        "other_seconds": seconds - known,
        "evaluations": s.evaluations,
        "cached": s.cached,
        "batches_evaluated": s.batches_evaluated,
        "batches_saved": s.batches_saved,
        "bytes_read_individual": s.bytes_read_individual,
        "bytes_read_search": s.bytes_read_search,
        "bytes_read": s.bytes_read_individual + s.bytes_read_search,
        "foreign_cpu_seconds": noise.seconds,
        "waited_seconds": waited,
    }


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


# ---------------------------------------------------------------------------------------------------
# Checks and analysis (not timed)


def decisions(r) -> dict:
    if "result" in r:
        res = r["result"]
        return {"indices": list(res.indices), "score": res.score, "order": list(res.order),
                "individual_scores": list(res.individual_scores),
                "accepted": [h["accepted"] for h in res.history]}
    return {"indices": r["indices"], "score": r["score"], "order": r["order"],
            "individual_scores": r["individual_scores"], "accepted": [h["accepted"] for h in r["history"]]}


def max_param_diff(a: dict, b: dict) -> tuple[float, float, float]:
    """(max |a - b|, max |a|, fraction of elements that differ) over all tensors."""
    worst = scale = 0.0
    differ = total = 0
    for k in a:
        x, y = a[k].float(), b[k].float()
        worst = max(worst, float((x - y).abs().max()))
        scale = max(scale, float(x.abs().max()))
        differ += int((x != y).sum())
        total += x.numel()
    return worst, scale, differ / total


def hardest_first_analysis(cfg, sts, base, xte, yte):
    """Replays the baseline's search and counts, over all candidates, the batches an exact early
    rejection runs when the held-out set is taken
    - ``loader_order``: batch by batch in the loader's order;
    - ``batch_hardest_first``: whole batches, those where the current soup errs most first (ties in
      loader order), as fastsoup's ``reorder="batches"``;
    - ``example_hardest_first``: examples sorted by the current soup's margin (true-class logit minus
      the best other one, smallest first), re-batched in batches of the same size for every candidate,
      as fastsoup's default ``reorder="examples"`` (so it should equal the batches fastsoup ran);
    - ``rebatched_once``: examples re-batched once, sorted by the first soup's (the best ingredient's)
      margin, then whole batches hardest-first by the current soup as above (one fixed set of batches
      for the whole search, so a cache of logits stays valid)."""
    model = make_model(cfg).eval()
    sds = [fastsoup.open_checkpoint(p) for p in sts]
    sd = [{k: ck.tensor(k) for k in ck} for ck in sds]
    bs = cfg.batch_size
    nb = math.ceil(xte.shape[0] / bs)
    total = xte.shape[0]

    def logits_of(state):
        model.load_state_dict(state)
        with torch.no_grad():
            return torch.cat([model(xte[i:i + bs]) for i in range(0, total, bs)])

    def batches_needed(right: torch.Tensor, need: int, batch_order=None) -> int:
        """right: per example, in the order of the batches' layout; batch_order: which batch runs when."""
        seen = correct = 0
        for k, b in enumerate(batch_order if batch_order is not None else range(nb)):
            chunk = right[b * bs:(b + 1) * bs]
            seen += chunk.numel()
            correct += int(chunk.sum())
            if seen < total and correct + (total - seen) < need:
                return k + 1
        return nb

    def errors_first(wrong: torch.Tensor) -> list[int]:
        errs = [int(wrong[b * bs:(b + 1) * bs].sum()) for b in range(nb)]
        return sorted(range(nb), key=lambda b: -errs[b])

    def margin(logits):
        true = logits.gather(1, yte[:, None])[:, 0]
        other = logits.scatter(1, yte[:, None], float("-inf")).max(1).values
        return true - other

    def avg(members):
        return {k: sum(sd[i][k] for i in members) / len(members) for k in sd[0]}

    hist = base["history"]
    kept = [hist[0]["index"]]
    best = hist[0]["correct"]
    soup_logits = logits_of(sd[kept[0]])
    fixed = torch.argsort(margin(soup_logits), stable=True)  # the once-only re-batching
    counts = {"loader_order": 0, "batch_hardest_first": 0, "example_hardest_first": 0, "rebatched_once": 0}
    full = 0
    for h in hist[1:]:
        j = h["index"]
        cand_logits = logits_of(avg(kept + [j]))
        right = cand_logits.argmax(1) == yte
        soup_wrong = soup_logits.argmax(1) != yte
        need = best + 1
        counts["loader_order"] += batches_needed(right, need)
        counts["batch_hardest_first"] += batches_needed(right, need, errors_first(soup_wrong))
        counts["example_hardest_first"] += batches_needed(right[torch.argsort(margin(soup_logits), stable=True)], need)
        counts["rebatched_once"] += batches_needed(right[fixed], need, errors_first(soup_wrong[fixed]))
        full += nb
        if int(right.sum()) > best:
            kept.append(j)
            best = int(right.sum())
            soup_logits = cand_logits
    return {"candidate_batches": full, **counts}


# ---------------------------------------------------------------------------------------------------


def machine() -> dict:
    info = {"nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "fastsoup": fastsoup.__version__,
            "native": fastsoup.native_info()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        pass
    root = os.path.dirname(HERE)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                            text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastsoup", "csrc"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        info["git_dirty_package_files"] = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def med(runs, key):
    return statistics.median(r[key] for r in runs)


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

    cfg = Config(**(QUICK if args.quick else {}))
    if args.n is not None:
        cfg.n = args.n
    if args.heldout is not None:
        cfg.heldout = args.heldout
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.quiet_wait is not None:
        cfg.quiet_wait = args.quiet_wait
    if args.max_redo is not None:
        cfg.max_redo = args.max_redo
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if cfg.n < 2 or reps < 1:
        ap.error("--n must be at least 2 and --reps at least 1")

    lines: list[str] = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    mach = machine()
    log(f"$ {command}")
    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {mach.get('Model name', platform.processor())}, "
        f"nproc {mach['nproc']}, torch {mach['torch']} ({mach['torch_threads']} threads), fastsoup {mach['fastsoup']} "
        f"(isa {mach['native']['isa']}, {mach['native']['threads']} threads), Python {mach['python']}")
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
        t = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed)
        templates = make_templates(cfg, g)
        tr_u8, ytr = make_images(cfg, cfg.train, templates, g)
        te_u8, yte = make_images(cfg, cfg.heldout, templates, g)
        xtr = transform_batch(tr_u8, cfg)
        if args.pipeline == "jpeg":
            try:
                import PIL  # noqa: F401
            except ImportError:
                raise SystemExit("--pipeline jpeg needs Pillow: pip install pillow (or pip install -e '.[bench]'), "
                                 "or run --pipeline memory") from None
            files = write_jpegs(te_u8, os.path.join(workdir, "heldout-jpeg"))
            dataset = JpegFiles(files, yte, cfg.resize, cfg.crop)
            # the held-out tensors the pipeline gives (for the ingredients' setup and the untimed analysis)
            xte = torch.stack([dataset[i][0] for i in range(len(dataset))])
            what = (f"held out as {len(files)} JPEG files ({sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB, "
                    f"quality 90), decoded by PIL in the pipeline")
        else:
            xte = transform_batch(te_u8, cfg)
            dataset = DecodedImages(te_u8, yte, cfg.resize, cfg.crop)
            assert torch.equal(torch.stack([dataset[i][0] for i in range(min(64, len(dataset)))]), xte[:64])
            what = f"held out decoded in memory ({te_u8.numel() / 1e6:.1f} MB)"
        log(f"data: {cfg.train} training + {cfg.heldout} held-out images, {cfg.raw}x{cfg.raw}x3 uint8, "
            f"{cfg.classes} classes; {what} ({time.perf_counter() - t:.1f} s)")
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)

        pts, sts, setup_correct, init_correct = make_ingredients(cfg, ckdir, xtr, ytr, xte, yte, args.allow_ties, log,
                                                                 args.pipeline)
        del xtr, ytr, tr_u8
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

        # Rounds: one of each contender per round; the baseline first in even rounds, last in odd ones.
        raw = {"baseline": [], "fastsoup_first": [], "fastsoup_rerun": [], "fastsoup_stored": []}
        discarded = {k: [] for k in raw}
        probe_model = make_model(cfg).eval()
        probe_x = xte[: min(1024, xte.shape[0])]

        def probe() -> float:
            """A fixed workload (one model pass over 1024 prepared images) timed right before a run:
            how fast the machine is at that moment (slowdowns /proc/stat cannot see, e.g. the host's)."""
            t = time.perf_counter()
            with torch.no_grad():
                for i in range(0, probe_x.shape[0], cfg.batch_size):
                    probe_model(probe_x[i:i + cfg.batch_size])
            return time.perf_counter() - t

        r = attempts = 0
        while r < reps:
            cache_dir = os.path.join(workdir, f"cache-{attempts}")
            shutil.rmtree(cache_dir, ignore_errors=True)
            this = {}

            def fast():
                p1 = probe()
                this["fastsoup_first"] = run_fastsoup(cfg, sts, loader, cache_dir, args.reorder)
                this["fastsoup_first"]["probe_seconds"] = p1
                p2 = probe()
                this["fastsoup_rerun"] = run_fastsoup(cfg, sts, loader, cache_dir, args.reorder)
                this["fastsoup_rerun"]["probe_seconds"] = p2
                p3 = probe()
                this["fastsoup_stored"] = run_fastsoup(cfg, sts, None, cache_dir, args.reorder)  # heldout=None: the stored set
                this["fastsoup_stored"]["probe_seconds"] = p3

            def base():
                p = probe()
                this["baseline"] = run_baseline(cfg, pts, loader)
                this["baseline"]["probe_seconds"] = p

            for fn in ((base, fast) if attempts % 2 == 0 else (fast, base)):
                fn()
            attempts += 1
            shutil.rmtree(cache_dir, ignore_errors=True)
            b, f1, f2, f3 = this["baseline"], this["fastsoup_first"], this["fastsoup_rerun"], this["fastsoup_stored"]
            # A round in which other processes took more than 5 % of the machine (2 CPUs x the run's
            # wall time, at least 0.5 CPU-seconds) during any of its runs is set aside and run again.
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
        results["attempts"] = attempts

        # Decisions.
        ref = decisions(raw["baseline"][0])
        same = True
        for name, runs in raw.items():
            for i, run in enumerate(runs):
                d = decisions(run)
                for key in ("indices", "score", "order", "accepted"):
                    if d[key] != ref[key]:
                        same = False
                        log(f"DECISIONS DIFFER: {name} round {i + 1}: {key} {d[key]} vs baseline {ref[key]}")
                if d["individual_scores"] != ref["individual_scores"]:
                    log(f"note: {name} round {i + 1}: individual scores differ: {d['individual_scores']} vs "
                        f"{ref['individual_scores']}")
        base0 = raw["baseline"][0]
        hist = base0["history"]
        margins = []
        best = hist[0]["correct"]
        for h in hist[1:]:
            margins.append(h["correct"] - best)
            if h["accepted"]:
                best = h["correct"]
        n_acc = sum(h["accepted"] for h in hist[1:])
        soup_fast = raw["fastsoup_first"][0]["result"].state_dict()
        diff, scale, frac = max_param_diff(base0["soup"], soup_fast)
        setup_match = [round(c / cfg.heldout, 12) for c in setup_correct] == [round(s, 12) for s in ref["individual_scores"]]
        results["decisions"] = {
            "same": same, "kept": ref["indices"], "score": ref["score"], "correct": base0["correct"],
            "order": ref["order"], "accepted_of_candidates": n_acc, "rejected": len(hist) - 1 - n_acc,
            "margins_vs_best": margins, "closest_margin": min(abs(m) for m in margins),
            "soup_max_abs_diff": diff, "soup_max_abs": scale, "soup_fraction_differing": frac, "setup_scores_match": setup_match,
        }

        # Medians.
        B, F1, F2, F3 = raw["baseline"], raw["fastsoup_first"], raw["fastsoup_rerun"], raw["fastsoup_stored"]
        mb, mf, mr, ms = med(B, "seconds"), med(F1, "seconds"), med(F2, "seconds"), med(F3, "seconds")
        nb = math.ceil(cfg.heldout / cfg.batch_size)
        summary = {
            "baseline": {k: med(B, k) for k in B[0] if isinstance(B[0][k], (int, float)) and not isinstance(B[0][k], bool)},
            "fastsoup_first": {k: med(F1, k) for k in F1[0] if isinstance(F1[0][k], (int, float))},
            "fastsoup_rerun": {k: med(F2, k) for k in F2[0] if isinstance(F2[0][k], (int, float))},
            "fastsoup_stored": {k: med(F3, k) for k in F3[0] if isinstance(F3[0][k], (int, float))},
        }
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
        results["summary"] = summary
        fp_bytes = sum(fingerprint_bytes(p) for p in sts)
        results["fingerprint_bytes_per_run"] = fp_bytes

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
        d = results["decisions"]
        log(f"decisions: {'SAME' if same else 'DIFFERENT'} in every run (kept {d['kept']} in this order, score "
            f"{d['score']:.6f} = {d['correct']}/{cfg.heldout}); search order {d['order']}; {d['accepted_of_candidates']} "
            f"candidates accepted, {d['rejected']} rejected")
        log(f"candidate margins vs the best count so far (strict >: accepted iff > 0): {d['margins_vs_best']}; "
            f"closest call {d['closest_margin']}")
        log(f"final soups (baseline's running average in float32 vs fastsoup's float32 sum / n): max |difference| = "
            f"{d['soup_max_abs_diff']:.3g} (largest |parameter| {d['soup_max_abs']:.3g}; "
            f"{100 * d['soup_fraction_differing']:.1f} % of the values differ); "
            f"setup accuracies equal the measured ones: {d['setup_scores_match']}")

        if not args.no_analysis:
            a = hardest_first_analysis(cfg, sts, base0, xte, yte)
            results["analysis"] = a
            ev = summary["fastsoup_first"]
            per_batch = ev["eval_seconds"] / max(1, ev["batches_evaluated"])
            log(f"early rejection replay (candidate batches run, of {a['candidate_batches']}): loader order "
                f"{a['loader_order']} (~{per_batch * a['loader_order']:.2f} s); whole batches hardest-first "
                f"{a['batch_hardest_first']} (~{per_batch * a['batch_hardest_first']:.2f} s); examples hardest-first, "
                f"re-batched per candidate {a['example_hardest_first']} (fastsoup ran {ev['batches_evaluated']:.0f} "
                f"in {ev['eval_seconds']:.2f} s, reorder={raw['fastsoup_first'][0]['result'].stats.reorder!r}); "
                f"re-batched once by the best ingredient's margin, then batches hardest-first {a['rebatched_once']} "
                f"(~{per_batch * a['rebatched_once']:.2f} s)")
        # Cost model: P, M = one pipeline pass and one model pass (the baseline's per-pass medians);
        # f = fraction of candidate batches run. baseline ~ (2N-1)(P+M); fastsoup ~ P + N M + f (N-1) M.
        n = cfg.n
        P = bb["data_seconds"] / bb["evaluations"]
        M = bb["model_seconds"] / bb["evaluations"]
        fs = summary["fastsoup_first"]
        fracs = {"as run": fs["batches_evaluated"] / ((n - 1) * nb)}
        if "analysis" in results:
            a = results["analysis"]
            fracs["examples hardest-first"] = a["example_hardest_first"] / a["candidate_batches"]
            fracs["re-batched once"] = a["rebatched_once"] / a["candidate_batches"]
        model = {"P": P, "M": M, "predicted_baseline": (2 * n - 1) * (P + M)}
        for label, f in fracs.items():
            need = (3 * (n + f * (n - 1)) - (2 * n - 1)) / (2 * n - 1 - 3)
            model[label] = {"f": f, "predicted_fastsoup": P + n * M + f * (n - 1) * M,
                            "predicted_speedup": (2 * n - 1) * (P + M) / (P + n * M + f * (n - 1) * M),
                            "pipeline_over_model_for_3x": need}
        results["cost_model"] = model
        log(f"cost model (P = {P:.3f} s pipeline pass, M = {M:.3f} s model pass, the baseline's medians): baseline "
            f"≈ (2N-1)(P+M) = {model['predicted_baseline']:.2f} s; fastsoup ≈ P + N·M + f·(N-1)·M = "
            + "; ".join(f"{model[k]['predicted_fastsoup']:.2f} s with f = {model[k]['f']:.2f} ({k}: "
                        f"{model[k]['predicted_speedup']:.2f}×, 3× needs P/M ≥ {model[k]['pipeline_over_model_for_3x']:.2f})"
                        for k in fracs)
            + f"; measured P/M here = {P / M:.2f}; bound for P/M → ∞: {2 * n - 1}×")
        results["raw"] = {name: [{k: v for k, v in x.items() if k not in ("result", "soup")} for x in runs]
                          for name, runs in raw.items()}
        results["discarded"] = {name: [{k: v for k, v in x.items() if k not in ("result", "soup")} for x in runs]
                                for name, runs in discarded.items()}
        results["fastsoup_history"] = raw["fastsoup_first"][0]["result"].history
        results["baseline_history"] = base0["history"]
        results["rerun_sources"] = [h["source"] for h in raw["fastsoup_rerun"][0]["result"].history]
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep or not own_workdir:
            print(f"(working folder kept: {workdir})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.txt:
        os.makedirs(os.path.dirname(os.path.abspath(args.txt)), exist_ok=True)
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
