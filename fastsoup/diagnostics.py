"""Looking before you soup: checkpoint summaries and the similarity of fine-tunes.

The paper relates the angle between fine-tuned solutions (measured from the pretrained init) to the
gain of averaging them. :func:`similarity` computes every pairwise cosine in one streaming pass over
the files (the fused ``gram`` kernel), without torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._dtypes import BY_NAME
from ._dtypes import info as dtype_info
from ._errors import ArgumentError
from ._native import _core
from .io.checkpoint import Checkpoint, check_compatible, open_checkpoint, with_key

CHUNK = 1 << 20  # elements per task-vector block (K float32 rows of it are kept) ...
SCRATCH_BYTES = 64 << 20  # ... and at most this many bytes of them (fewer elements per block for large K)
MIN_CHUNK = 1 << 14


@dataclass
class Similarity:
    """Pairwise similarity of K checkpoints (or of their task vectors ``theta_k - base``).

    Attributes:
        names: the checkpoints.
        gram: K x K inner products (float64, nested lists).
        norms: the K norms.
        cosine: K x K cosine similarities (NaN where a norm is 0).
        angles: K x K angles in degrees.
        base: the base checkpoint, or None.
    """

    names: list[str]
    gram: list[list[float]]
    base: str | None

    @property
    def norms(self) -> list[float]:
        return [math.sqrt(max(self.gram[i][i], 0.0)) for i in range(len(self.names))]

    @property
    def cosine(self) -> list[list[float]]:
        n = self.norms
        return [[self.gram[i][j] / (n[i] * n[j]) if n[i] and n[j] else float("nan") for j in range(len(n))]
                for i in range(len(n))]

    @property
    def angles(self) -> list[list[float]]:
        return [[math.degrees(math.acos(max(-1.0, min(1.0, c)))) if c == c else float("nan") for c in row]
                for row in self.cosine]

    def table(self, what: str = "cosine") -> str:
        """The matrix as text ("cosine" or "angles"), rows and columns numbered as ``names``."""
        m = self.cosine if what == "cosine" else self.angles
        k = len(self.names)
        lines = ["      " + "".join(f"{j:>8d}" for j in range(k))]
        for i in range(k):
            lines.append(f"{i:>4d}  " + "".join(f"{m[i][j]:>8.4f}" if what == "cosine" else f"{m[i][j]:>8.2f}"
                                                for j in range(k)))
        lines.append("")
        lines += [f"{i:>4d}  {name}" for i, name in enumerate(self.names)]
        return "\n".join(lines)

    def plot(self, out: str, what: str = "cosine") -> str:
        """A heatmap PNG of the matrix (needs matplotlib)."""
        from ._plotting import Figures

        plt = Figures("the heatmap")
        m = self.cosine if what == "cosine" else self.angles
        k = len(self.names)
        fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k))
        im = ax.imshow(m, cmap="viridis")
        labels = [os.path.basename(n.rstrip("/")) or n for n in self.names]
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        title = "cosine similarity" if what == "cosine" else "angle (degrees)"
        ax.set_title(title + (" of task vectors" if self.base else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        fig.savefig(out, dpi=150)
        return out


class TensorGram:
    """The Gram matrix of one tensor across K checkpoints, or of its task vectors ``theta_k - base``:
    ``TensorGram(ckpts, base)(name)`` -> K x K floats (nested lists). One streaming pass over the
    tensor (the fused ``gram`` kernel: float32 products, summed in float32 within fixed blocks and in
    float64 across them). Task vectors are formed block by block in float32, in a scratch of K rows
    of at most ``CHUNK`` elements and ``SCRATCH_BYTES`` in all (the only memory it holds); the tensor's
    mapped file pages are released after each call (:meth:`Checkpoint.release`)."""

    def __init__(self, ckpts: Sequence[Checkpoint], base: Checkpoint | None = None, *, threads: int = 0):
        self.ckpts, self.base, self.threads = list(ckpts), base, threads
        K = len(self.ckpts)
        self.chunk = max(MIN_CHUNK, min(CHUNK, SCRATCH_BYTES // (4 * max(K, 1))))
        self._scratch = None
        self._keep: list = []

    def _addr(self, ck: Checkpoint, name: str) -> tuple[int, int]:
        a, mapped, obj = ck.buffer(ck[name])
        if not mapped:
            self._keep.append(obj)
        return a, dtype_info(ck[name].dtype).code

    def __call__(self, name: str) -> list[list[float]]:
        ckpts, K, t = self.ckpts, len(self.ckpts), self.threads
        gram = [[0.0] * K for _ in range(K)]
        numel = ckpts[0][name].numel
        self._keep = []
        ins = [self._addr(ck, name) for ck in ckpts]
        if self.base is None:
            gram = [list(row) for row in _core.gram([a for a, _ in ins], [c for _, c in ins], numel, t)]
            self._release(name)
            return gram
        b_addr, b_code = self._addr(self.base, name)
        if self._scratch is None:
            import numpy as np

            self._scratch = np.empty((K, self.chunk), dtype=np.float32)
        rows = [self._scratch[k].ctypes.data for k in range(K)]
        f32 = BY_NAME["float32"].code
        size_b = dtype_info(self.base[name].dtype).itemsize
        for start in range(0, numel, self.chunk):
            n = min(self.chunk, numel - start)
            for k, (a, c) in enumerate(ins):
                size_k = dtype_info(ckpts[k][name].dtype).itemsize
                _core.weighted_sum([a + start * size_k, b_addr + start * size_b], [c, b_code], [1.0, -1.0], n,
                                   rows[k], f32, False, t)
            g = _core.gram(rows, [f32] * K, n, t)
            for i in range(K):
                for j in range(K):
                    gram[i][j] += g[i][j]
        self._keep = []
        self._release(name)
        return gram

    def _release(self, name: str) -> None:
        """The tensor's mapped pages out of resident memory (one tensor's at a time, whatever K)."""
        for ck in self.ckpts + ([self.base] if self.base is not None else []):
            ck.release(name)


def similarity(ingredients: Sequence[Any], base: Any = None, *, threads: int | None = None,
               key: str | None = None) -> Similarity:
    """Cosine similarities and angles between K checkpoints over all their float tensors, or between
    their task vectors ``theta_k - base`` when ``base`` (e.g. the pretrained init) is given.

    One streaming pass over the K files (the fused ``gram`` kernel, float32 products summed in float64
    across blocks). Task vectors are formed block by block in float32 (K blocks of 1M elements), so
    their small differences do not cancel against the large weights. ``key``: the state dict to take
    from training checkpoints (the ingredients and the base), as in :func:`~fastsoup.open_checkpoint`.

    Example:
        >>> s = fastsoup.similarity(paths, base="pretrained.safetensors")  # doctest: +SKIP
        >>> print(s.table("angles"))  # doctest: +SKIP
    """
    srcs = list(ingredients)
    if not srcs:
        raise ArgumentError("no ingredients: give at least one checkpoint")
    ckpts = [open_checkpoint(s) for s in with_key(srcs, key)]
    base_ck = open_checkpoint(with_key([base], key)[0]) if base is not None else None
    check_compatible(ckpts + ([base_ck] if base_ck is not None else []))
    K = len(ckpts)
    gram = [[0.0] * K for _ in range(K)]
    grams = TensorGram(ckpts, base_ck, threads=threads or 0)
    for name, ref in ckpts[0].items():
        if dtype_info(ref.dtype).kind != "float" or ref.numel == 0:
            continue
        g = grams(name)
        for i in range(K):
            for j in range(K):
                gram[i][j] += g[i][j]
    for ck in ckpts + ([base_ck] if base_ck is not None else []):
        ck.verify("the similarity pass")  # numbers from a file changed under the read are not reported
    names = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"<ingredient {i}>" for i, s in enumerate(srcs)]
    base_name = None if base is None else (os.fspath(base) if isinstance(base, (str, os.PathLike)) else "<base>")
    return Similarity(names, gram, base_name)


def inspect_checkpoint(src: Any, *, key: str | None = None, tensors: bool = False) -> dict:
    """A summary of one checkpoint: tensors, parameters, bytes, dtypes, shards and metadata.

    Args:
        src: what :func:`~fastsoup.open_checkpoint` takes.
        key: the state dict to take from a training checkpoint (as in ``open_checkpoint``).
        tensors: also list every tensor (``"tensor_list"``: name, dtype, shape, bytes, file).

    Returns:
        ``{"source", "tensors" (count), "params", "bytes", "dtypes" ({dtype: {"tensors", "params",
        "bytes"}}), "shards" ([{"file", "bytes", "tensors"}]), "metadata", "key" (the entry of a
        training checkpoint the state dict came from, else None), "entries" (a training checkpoint's
        entries: name -> what it holds, else None)}``, and ``"tensor_list"`` with ``tensors=True``.

    Example:
        >>> info = fastsoup.inspect_checkpoint("last.pth.tar", tensors=True)  # doctest: +SKIP
        >>> info["key"], info["entries"]["epoch"]  # doctest: +SKIP
    """
    ck = open_checkpoint(with_key([src], key)[0])
    by_dtype: dict[str, dict[str, int]] = {}
    for ref in ck.values():
        d = by_dtype.setdefault(ref.dtype, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += ref.numel
        d["bytes"] += ref.nbytes
    shards = []
    for f in ck.files:
        names = [r.name for r in ck.values() if r.file == f]
        shards.append({"file": f, "bytes": os.path.getsize(f), "tensors": len(names)})
    info = {
        "source": ck.source,
        "tensors": len(ck),
        "params": sum(r.numel for r in ck.values()),
        "bytes": ck.nbytes,
        "dtypes": by_dtype,
        "shards": shards,
        "metadata": ck.metadata,
        "key": ck.key,
        "entries": ck.entries,
    }
    if tensors:
        info["tensor_list"] = [
            {"name": r.name, "dtype": r.dtype, "shape": list(r.shape), "bytes": r.nbytes,
             "file": os.path.basename(r.file) if r.file is not None else None}
            for r in ck.values()
        ]
    return info


__all__ = ["Similarity", "TensorGram", "inspect_checkpoint", "similarity"]
