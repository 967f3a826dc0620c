"""Synthetic ViT-like checkpoints for the demo and the benchmarks (made here; nothing downloaded).

The tensor sets follow timm's VisionTransformer naming and shapes. Every "fine-tune" is one shared
random init plus a small perturbation of its own, as soups are of fine-tunes from one init.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import fastsoup


@dataclass(frozen=True)
class ViTConfig:
    name: str
    width: int
    depth: int
    mlp: int
    patch: int
    tokens: int  # patches + cls
    classes: int = 1000

    def shapes(self) -> dict[str, tuple]:
        d, m = self.width, self.mlp
        s = {
            "cls_token": (1, 1, d),
            "pos_embed": (1, self.tokens, d),
            "patch_embed.proj.weight": (d, 3, self.patch, self.patch),
            "patch_embed.proj.bias": (d,),
        }
        for i in range(self.depth):
            b = f"blocks.{i}."
            s.update({
                b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,),
                b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,),
            })
        s.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (self.classes, d), "head.bias": (self.classes,)})
        return s

    @property
    def params(self) -> int:
        n = 0
        for shape in self.shapes().values():
            k = 1
            for x in shape:
                k *= x
            n += k
        return n


CONFIGS = {
    "vit-s16": ViTConfig("ViT-S/16", 384, 12, 1536, 16, 197),
    "vit-b16": ViTConfig("ViT-B/16", 768, 12, 3072, 16, 197),
    "vit-l14": ViTConfig("ViT-L/14", 1024, 24, 4096, 14, 257),
    "vit-g14": ViTConfig("ViT-G/14", 1664, 48, 8192, 14, 257),
}


def make_zoo(
    folder: str,
    config: str = "vit-b16",
    k: int = 8,
    dtype: torch.dtype = torch.float16,
    fmt: str = "safetensors",
    shard_size: str | int | None = None,
    seed: int = 0,
) -> list[str]:
    """Writes k fine-tune-like checkpoints into ``folder`` and returns their paths (reused if present).

    fmt: "safetensors" (one file each), "sharded" (a folder each, shards of ``shard_size``), "bin"
    (torch.save of the state dict).
    """
    cfg = CONFIGS[config]
    os.makedirs(folder, exist_ok=True)
    tag = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    suffix = {"safetensors": ".safetensors", "sharded": "", "bin": ".bin"}[fmt]
    paths = [os.path.join(folder, f"{config}-{tag}-{i:02d}{suffix}") for i in range(k)]
    if all(os.path.exists(p) for p in paths):
        return paths
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g, dtype=torch.float32) * 0.02 for name, shape in cfg.shapes().items()}
    for i, path in enumerate(paths):
        if os.path.exists(path):
            continue
        gi = torch.Generator().manual_seed(seed * 1000 + i + 1)
        sd = {name: (t + torch.randn(t.shape, generator=gi) * 0.002).to(dtype) for name, t in base.items()}
        if fmt == "bin":
            tmp = path + ".tmp"
            torch.save(sd, tmp)
            os.replace(tmp, path)
        else:
            fastsoup.save(sd, path, shard_size=shard_size if fmt == "sharded" else None)
        del sd
    return paths
