"""``average`` and ``weighted_sum``: the linear combinations of checkpoints, the engine's public entry."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .._dtypes import parse_float_dtype
from .._errors import ArgumentError
from ..io import _sidefiles
from ..io._sidefiles import SoupInfo
from ..io.checkpoint import check_compatible, open_checkpoint, with_key
from ..io.names import NameMap
from .device import resolve_device
from .driver import MergeSpec, collective, run


def average(
    ingredients: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    out: str | os.PathLike | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    threads: int | None = None,
    shard_size: int | str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    config_from: Any = None,
):
    """Averages checkpoints: ``sum_k w_k * theta_k / sum_k w_k`` for every float tensor.

    A drop-in for the hand-written averaging loop, streaming from memory-mapped files with one
    fused pass over the inputs and memory that does not grow with K. The sum is accumulated in
    float64 with the weights as given, then divided once by their total and rounded once to the
    output dtype (a uniform soup: the plain sum divided by K), so results are within one unit in
    the last place of the exact mean (README, "Numerics").

    Args:
        ingredients: what :func:`~fastsoup.open_checkpoint` takes (paths of files, folders or index
            files, state dicts, modules), mixed freely.
        weights: one number per ingredient, like ``numpy.average``; None for the uniform soup.
            Negative weights are allowed; their sum must not be zero.
        out: None to return ``dict[str, torch.Tensor]``; a path to write there and return: one
            safetensors file if it ends in ``.safetensors``, one torch file (``torch.save`` of the
            state dict) if it ends in ``.pt``, ``.pth``, ``.bin`` or ``.ckpt``, else a folder. A
            folder soup of model folders is a model folder: weights named as the first ingredient's
            (``model.safetensors``, or shards like it with ``model.safetensors.index.json``; a soup
            of peft adapters: ``adapter_model.safetensors``), the side files of the donor (see
            ``config_from``) and a model card. Every safetensors output records the recipe,
            ingredients, weights and fastsoup version in its metadata (``fastsoup.*``).
        dtype: output dtype ("fp16", "bf16", "fp32", or a torch dtype); default: each tensor's dtype
            in the first ingredient (a :class:`UserWarning` says so when the ingredients' dtypes
            differ). Integer and bool tensors are copied from the first ingredient.
        device: "cpu", or "cuda"/"cuda:N": file inputs stream through pinned memory to the GPU, the
            fused kernel sums there; ``out=None`` then returns CUDA tensors (inputs already on that
            GPU are read in place), a path is written back through pinned memory.
        threads: CPU threads (default: every core this process may use; on CUDA, the threads that
            fill the pinned buffers).
        shard_size: largest output shard (bytes or e.g. "5GB"); default: shard like the first
            ingredient.
        progress: show a progress bar (default: on a terminal, for merges of 256 MB or more); when
            it finishes, a summary line stays on stderr (``average: 4.87 GB in 0.61 s (8.0 GB/s)``).
        overwrite: replace an existing ``out`` (only once the new soup is complete; see the README for
            what may be replaced).
        fsync: flush the output to disk before it is renamed into place.
        key: the state dict to take from training checkpoints (torch files holding several
            entries), e.g. ``"state_dict_ema"`` of timm's ``train.py`` checkpoints; see
            :func:`~fastsoup.open_checkpoint`. Path ingredients become :class:`~fastsoup.KeyedPath`.
        key_map: renames the ingredients' tensors before they are matched: a callable, a dict
            ``{old: new}`` or a list of ``(regex, replacement)`` (see :mod:`fastsoup.io.names`).
        strip_prefix: removes this prefix from the names that have it, e.g. ``"module."`` for DDP and
            open_clip training checkpoints.

    Tied weights (one tensor under two names, as in language models with ``tie_word_embeddings``)
    are recognised in ``save_pretrained`` folders, ``model.state_dict()``, ``save_model`` files and
    ``.bin`` files alike; the soup writes the tensor once, under ``save_pretrained``'s name, and an
    in-memory result carries both names.
        config_from: the folder (or a file in it) whose side files a folder ``out`` gets:
            ``config.json`` (its dtype set to the soup's), ``generation_config.json``, tokenizer
            files, chat templates, processor configs, ``adapter_config.json``, ``README.md``.
            Default: the first ingredient's folder, when it has one (a folder, or a file named as
            transformers or peft name weights, e.g. ``x/model.safetensors``); False: none.

    Returns:
        The state dict (``out=None``) or ``out``.

    Raises:
        CheckpointError: an ingredient (or a side file) is unreadable or does not match the others.
        ArgumentError: bad weights or options (a ValueError); ArgumentTypeError: an option of the wrong type.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> fastsoup.average(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
        >>> soup = fastsoup.average([model_a.state_dict(), model_b.state_dict()])  # doctest: +SKIP
    """
    ingredients = with_key(ingredients, key)
    ws, divisor = normalization(weights, len(ingredients))
    recipe = "uniform_soup" if weights is None else "weighted_soup"
    return collective(out, overwrite, "fastsoup.average", lambda: _merge(
        ingredients, ws, out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size,
        progress=progress, overwrite=overwrite, fsync=fsync, desc="average", recipe=recipe, config_from=config_from,
        key_map=key_map, strip_prefix=strip_prefix, divisor=divisor))

def normalization(weights: Sequence[float] | None, k: int) -> tuple[list[float], tuple[float, float]]:
    """The kernel weights and divisor of an average: the sum is divided once by the weight total.

    Uniform: weights 1 and divisor K (the plain sum, exact in float64 for float16 inputs, divided
    once). Otherwise the weights as given and their total as ``(hi, lo)``: ``math.fsum`` (the
    correctly rounded total) and the rest, which the float64 kernels divide by too. All scaled by
    one power of two so the largest weight lies in [1, 2): exact, the same quotient and rounding,
    and no overflow or underflow from extreme weights.
    """
    if weights is None:
        return [1.0] * k, (float(max(k, 1)), 0.0)
    ws = check_weights(weights, k)
    if not any(ws):
        raise ArgumentError(f"weights sum to zero ({list(weights)}): cannot normalize; use fastsoup.weighted_sum")
    shift = math.frexp(max(abs(w) for w in ws))[1] - 1
    ws = [math.ldexp(w, -shift) for w in ws]  # scaled first: the total of huge weights (1e308, 1e308) fits
    total = math.fsum(ws)
    if total == 0.0:
        raise ArgumentError(f"weights sum to zero ({list(weights)}): cannot normalize; use fastsoup.weighted_sum")
    rest = math.fsum([*ws, -total])
    return ws, (total, rest)


def weighted_sum(
    ingredients: Sequence[Any],
    weights: Sequence[float],
    *,
    out: str | os.PathLike | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    threads: int | None = None,
    shard_size: int | str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    config_from: Any = None,
):
    """The raw linear combination ``sum_k w_k * theta_k`` (no normalization), e.g. for task
    arithmetic (``theta_0 + lambda * (theta_1 - theta_0)`` is ``weights=[1 - lambda, lambda]``).

    Arguments, returns and errors as :func:`average`, with ``weights`` required.
    """
    ingredients = with_key(ingredients, key)
    ws = check_weights(weights, len(ingredients))
    return collective(out, overwrite, "fastsoup.weighted_sum", lambda: _merge(
        ingredients, ws, out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size,
        progress=progress, overwrite=overwrite, fsync=fsync, desc="weighted_sum", recipe="weighted_sum",
        config_from=config_from, key_map=key_map, strip_prefix=strip_prefix))


def check_weights(weights: Sequence[float], k: int) -> list[float]:
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ArgumentError(f"weights must be numbers, got {weights!r}") from None
    if len(ws) != k:
        raise ArgumentError(f"got {len(ws)} weights for {k} ingredients")
    if not all(math.isfinite(w) for w in ws):
        raise ArgumentError(f"weights must be finite, got {ws}")
    return ws


def _merge(ingredients, weights, *, out, dtype, device, threads, shard_size, progress, overwrite, fsync, desc,
           recipe, config_from=None, key_map=None, strip_prefix=None, divisor=(1.0, 0.0)):
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
    out_override = parse_float_dtype(dtype) if dtype is not None else None
    opened = [open_checkpoint(src) for src in ingredients]
    try:
        names = NameMap.build(key_map=key_map, strip_prefix=strip_prefix)
        mapped = names.apply(opened)
        check_compatible(mapped)
        note = _sidefiles.mixed_dtypes_note(mapped, out_override)
        if note is not None:
            _sidefiles.note(note)
        donor = _sidefiles.donor_for(out, config_from, ingredients[0])  # read before any work
        info = SoupInfo(recipe, _sidefiles.ingredient_names(ingredients), [w / divisor[0] for w in weights])
        return run(MergeSpec(mapped, weights, out, dtype=out_override, divisor=divisor, device=dev, threads=threads or 0,
                             shard_size=shard_size, progress=progress, overwrite=overwrite, fsync=fsync, desc=desc,
                             aliases=names.aliases, info=info, donor=donor))
    finally:
        for src, ck in zip(ingredients, opened):
            if ck is not src:
                ck.close()




__all__ = ["average", "check_weights", "normalization", "weighted_sum"]
