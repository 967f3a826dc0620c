"""The greedy benchmark's data (bench_greedy.py): its configuration, 10 classes of synthetic
"photos" (smooth random class templates, each image a randomly shifted crop of its class template
blended with another class's, plus pixel noise, as uint8 HWC images), and the two held-out
pipelines, torch ``Dataset`` s that do what an ImageNet eval pipeline does, scaled down:

- ``jpeg`` (torchvision's ``ImageFolder`` with its PIL loader and the eval transform on PIL images):
  JPEG files (quality 90), opened and decoded by PIL, ``convert("RGB")``, Resize (PIL bilinear),
  CenterCrop, ToTensor, Normalize;
- ``memory``: the images kept decoded (uint8 HWC tensors): uint8 -> float CHW / 255, Resize (torch
  bilinear, antialiased), CenterCrop, Normalize.

Everything is generated here, nothing downloaded. :func:`make_data` makes it all (and stores the
held-out set in the working folder); :func:`load_heldout` reads that back in another process
(compare_builds runs the search with other source trees of fastsoup that way).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

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


def make_config(quick: bool = False, **overrides) -> Config:
    """The configuration (``QUICK``'s sizes when ``quick``), with every override that is not None."""
    cfg = Config(**(QUICK if quick else {}))
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


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


@dataclass
class Data:
    xtr: torch.Tensor  # training images, transformed (N x 3 x crop x crop)
    ytr: torch.Tensor
    xte: torch.Tensor  # the held-out tensors the pipeline gives (for the setup and the untimed analysis)
    yte: torch.Tensor
    dataset: EvalImages  # the held-out pipeline
    what: str  # a line about the held-out set
    seconds: float  # to make it all


def heldout_dataset(cfg: Config, pipeline: str, te_u8: torch.Tensor, yte: torch.Tensor, workdir: str,
                    write: bool = True) -> EvalImages:
    """The held-out pipeline over the decoded images ``te_u8``: ``jpeg`` reads the files of
    ``workdir/heldout-jpeg`` (written first when ``write``), ``memory`` the images themselves."""
    if pipeline == "jpeg":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise SystemExit("--pipeline jpeg needs Pillow: pip install pillow (or pip install -e '.[bench]'), "
                             "or run --pipeline memory") from None
        folder = os.path.join(workdir, "heldout-jpeg")
        files = write_jpegs(te_u8, folder) if write else [os.path.join(folder, f"{i:05d}.jpg") for i in range(len(yte))]
        return JpegFiles(files, yte, cfg.resize, cfg.crop)
    return DecodedImages(te_u8, yte, cfg.resize, cfg.crop)


def make_data(cfg: Config, pipeline: str, workdir: str) -> Data:
    """The training and held-out images and the held-out pipeline (the JPEG files written into
    ``workdir``); the decoded held-out images and labels are stored in ``workdir/heldout.pt`` for
    :func:`load_heldout`."""
    t = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    templates = make_templates(cfg, g)
    tr_u8, ytr = make_images(cfg, cfg.train, templates, g)
    te_u8, yte = make_images(cfg, cfg.heldout, templates, g)
    xtr = transform_batch(tr_u8, cfg)
    dataset = heldout_dataset(cfg, pipeline, te_u8, yte, workdir)
    if pipeline == "jpeg":
        xte = torch.stack([dataset[i][0] for i in range(len(dataset))])
        what = (f"held out as {len(dataset.items)} JPEG files ({sum(os.path.getsize(f) for f in dataset.items) / 1e6:.1f} MB, "
                f"quality 90), decoded by PIL in the pipeline")
    else:
        xte = transform_batch(te_u8, cfg)
        assert torch.equal(torch.stack([dataset[i][0] for i in range(min(64, len(dataset)))]), xte[:64])
        what = f"held out decoded in memory ({te_u8.numel() / 1e6:.1f} MB)"
    torch.save({"u8": te_u8, "labels": yte}, os.path.join(workdir, "heldout.pt"))
    return Data(xtr, ytr, xte, yte, dataset, what, time.perf_counter() - t)


def load_heldout(cfg: Config, pipeline: str, workdir: str) -> EvalImages:
    """The held-out pipeline of an earlier :func:`make_data` in ``workdir`` (same images, same files)."""
    d = torch.load(os.path.join(workdir, "heldout.pt"))
    return heldout_dataset(cfg, pipeline, d["u8"], d["labels"], workdir, write=False)
