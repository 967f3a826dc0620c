"""Learned soup (per model, and layer-wise) in O(P) memory.

The paper's learned soup (appendix; the official ``learned_soup.py``) learns mixing coefficients on
held-out data by gradient descent: ``theta(alpha) = sum_k alpha_k theta_k`` (one alpha per model and,
layer-wise, per tensor), ``alpha = softmax(raw)`` over the models, the logits scaled by a learned
scalar ``beta``, cross-entropy, AdamW with lr 0.05 and no weight decay, 5 epochs over the held-out
data, starting from the uniform soup. The official code keeps all K models in memory ("a node with
490GB RAM" for 72 CLIP ViT-B/32).

How long it trains. The official run's 5 epochs were about 500 AdamW steps (ImageNet2p, ~100 batches
of 256); it is the step count that reaches the paper's numbers. On a small held-out set 5 epochs are a
handful of steps (4 batches: 20) and the soup stays near its uniform start, below the best
ingredient. So the default (``epochs=None, steps=None``) is :func:`default_steps`: whole epochs, at
least 5 and at least :data:`MIN_DEFAULT_STEPS` (500) steps; ``epochs=`` or ``steps=`` given are
exact. A learned soup that ends with a held-out loss no better than the uniform soup's (not 0.1 %
below it) warns (:class:`LearnedSoupWarning`, one line saying what to try).

Here no model is ever held K times. Each step:

1. ``theta(alpha)`` is written into the model's parameters by one fused weighted sum over the K
   memory-mapped checkpoints (per-tensor weights for layer-wise);
2. forward and backward on one held-out batch give ``dL/dtheta`` (the parameters' ``.grad``);
3. ``dL/dalpha_k = <dL/dtheta, theta_k>`` (per tensor for layer-wise) by one fused ``multi_dot``
   pass over the K checkpoints;
4. autograd carries that through the softmax to ``raw``; AdamW steps ``raw`` and ``beta``.

Memory: the model, its gradients and the activations, O(P), whatever K. Reads: the K checkpoints
twice per step, from the page cache when they fit in RAM (they stay mapped), else from disk.

On a GPU (the model on a CUDA device, and a build with CUDA; ``merge_device=`` overrides), steps 1
and 3 run on the CUDA engine, as the official code trains on the GPU: the mix is the CUDA merge
(the K checkpoints' host data through the ring of pinned slots, summed by the fused kernel straight
into the parameters), and ``dL/dalpha`` is one native call (``_core.dots_cuda``) that streams the
same slots and multiplies them with the gradients where they are, on the device, with the bits of
``multi_dot`` on device tensors. GPU memory: the model, its gradients, the activations and the
ring (a few 32 MiB slots), never K copies; ingredients given as tensors already on the GPU are read
in place. Only the K x n_tensors dot products travel back to the host, where the (tiny) softmax and
AdamW step run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import ArgumentError, ArgumentTypeError, FastsoupError
from ..distributed import comm as _comm
from ..io import _tempfiles
from ..io.checkpoint import Checkpoint, check_compatible, open_checkpoint, with_key
from ..io.names import NameMap
from ..mixing import dots, mix_into_model
from ..search import cache as _cache
from ..search.batches import model_device, model_logits
from ..search.evaluation import evaluate, progress_bar
from ..search.heldout import HeldOut, prepare
from ..search.search import eval_device_of, merge_device_for

PARAMETRIZATIONS = ("softmax", "free")
MIN_DEFAULT_STEPS = 500  # the official run's step count (5 epochs of ~100 batches)
DEFAULT_EPOCHS = 5  # the official epochs
NO_BETTER_RTOL = 1e-3  # a held-out loss within 0.1 % of the uniform soup's (or above it, or NaN) is "no better"


class LearnedSoupWarning(UserWarning):
    """The learned soup ended with a held-out loss no better than the uniform soup's (its starting
    point): the message, one line, says what to try. ``fastsoup learned`` prints it as
    ``fastsoup: warning: ...``."""


def default_steps(n_batches: int) -> int:
    """The default number of steps for ``n_batches`` held-out batches: whole epochs, at least
    :data:`DEFAULT_EPOCHS` (the official 5) and at least :data:`MIN_DEFAULT_STEPS` (500) steps.
    4 batches: 125 epochs, 500 steps; 100 batches: 5 epochs, 500 steps; 1,000 batches: 5 epochs."""
    n = max(1, int(n_batches))
    epochs = max(DEFAULT_EPOCHS, -(-MIN_DEFAULT_STEPS // n))
    return epochs * n


@dataclass
class LearnedResult:
    """The outcome of :func:`learned_soup`.

    Attributes:
        coefficients: the mixing weights alpha, ``[K]`` or, layer-wise, ``[n_tensors, K]`` (float32).
        tensor_names: the tensors of the rows of a layer-wise ``coefficients`` (the float tensors of
            the state dict, in order).
        beta: the learned logit scale.
        score: held-out accuracy of the learned soup; ``loss``: its held-out loss (with beta).
        uniform_loss: held-out loss of the uniform soup (the starting point), for comparison;
            ``uniform_score``: its held-out accuracy.
        losses: the training loss of every step.
        steps: the steps run (``len(losses)``); ``seconds_per_step``: the median time of one step (the
            mix, forward and backward, the gradient pass and the AdamW step).
        advice: the :class:`LearnedSoupWarning`'s message when ``loss`` is no better than
            ``uniform_loss`` (what to try), else None. ``cached``: read from ``cache_dir`` (then
            ``seconds`` is the read's, ``steps`` and ``seconds_per_step`` the training's).
        ingredients: the ingredients (as given); ``sources`` is the deprecated name. ``indices``:
            their positions, ``0 .. K-1`` (all of them are in the soup); :meth:`weights`: the
            coefficients as the soup functions take them.
    """

    coefficients: torch.Tensor
    tensor_names: list[str]
    beta: float
    score: float
    loss: float
    uniform_loss: float
    losses: list[float]
    ingredients: list
    layerwise: bool
    parametrization: str
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    seconds_per_step: float = 0.0
    uniform_score: float = float("nan")
    cached: bool = False  # read from cache_dir (seconds: the read; steps and seconds_per_step: the training's)
    _mapped: list = field(default=None, repr=False, compare=False)  # the ingredients, named as the model's
    _names: Any = field(default=None, repr=False, compare=False)  # their NameMap (to save under the files' names)

    @property
    def indices(self) -> list[int]:
        """The ingredients' positions in the ``ingredients`` argument: all of them, in order."""
        return list(range(len(self.ingredients)))

    @property
    def sources(self) -> list:
        """Deprecated name of :attr:`ingredients`."""
        warnings.warn("LearnedResult.sources is deprecated: use .ingredients", DeprecationWarning, stacklevel=2)
        return self.ingredients

    @property
    def advice(self) -> str | None:
        """One line when the learned soup's held-out loss is no better than the uniform soup's (its
        start), that is not below it by more than :data:`NO_BETTER_RTOL` (0.1 %) of it, or is NaN:
        what happened and what to try; None otherwise."""
        if self.loss < self.uniform_loss - NO_BETTER_RTOL * abs(self.uniform_loss):
            return None
        return (f"learned soup: held-out loss {self.loss:.4f} after {self.steps} step{'' if self.steps == 1 else 's'} is no better than the uniform "
                f"soup's {self.uniform_loss:.4f} (its start): try more steps (steps=, --steps), another lr (lr=, --lr) "
                "or init= a greedy soup's weights")

    def _ingredients(self) -> list[Checkpoint]:
        return self._mapped or [open_checkpoint(s) for s in self.ingredients]

    def weights(self) -> list[float] | dict[str, list[float]]:
        """The soup's weight of each ingredient: the coefficients as the soup functions take them, K
        numbers, or layer-wise tensor name -> K numbers (normalized under the softmax
        parametrization; as learned under "free", where the soup is the plain sum)."""
        if self.layerwise:
            return {n: row.tolist() for n, row in zip(self.tensor_names, self.coefficients)}
        return self.coefficients.tolist()

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Writes the learned soup into ``model``'s parameters in place (reads the K checkpoints once)."""
        mix_into_model(self._ingredients(), model, self.weights(), {})
        return model

    def state_dict(self) -> dict:
        """The learned soup as a new state dict (float tensors: float32 sums cast to the first
        ingredient's dtypes; other tensors from the first ingredient)."""
        ckpts = self._ingredients()
        first = ckpts[0]
        out = {name: first.tensor(name) for name in first}  # shapes/dtypes; float ones are overwritten
        holder = _StateDictModule(out)
        mix_into_model(ckpts, holder, self.weights(), {})
        for alias, canon in first.aliases.items():  # tied weights: both names, one tensor
            if canon in out and alias not in out:
                out[alias] = out[canon]
        return out

    def save(self, out: str | os.PathLike, *, shard_size: int | str | None = None, overwrite: bool = False,
             fsync: bool = False, progress: bool | None = None, config_from: Any = None) -> str:
        """Writes the soup with the layout rules of ``average(out=...)`` (dtypes and shards of the first
        ingredient; a ``.pt`` path: one torch file) and a JSON sidecar with the coefficients, beta,
        scores and loss curve (``NAME.json``, or ``soup.json`` in a folder). A folder output also gets
        the side files of the first ingredient's folder (or of ``config_from``; False: none) and a
        model card; the safetensors metadata records the ingredients and coefficients."""
        from ..engine import MergeSpec, run
        from ..io._sidefiles import SoupInfo, donor_for, ingredient_names
        from ..io.writer import with_sidecar

        recipe = "learned_soup_layerwise" if self.layerwise else "learned_soup"
        info = SoupInfo(recipe, ingredient_names(self.ingredients), self.weights())

        def write_soup(extras) -> str:
            donor = donor_for(out, config_from, self.ingredients[0])  # read before any work
            # Streamed, as state_dict() computes it (the same kernel, weights and rounding): one pass over
            # the K ingredients (named as the model's, a tied tensor once) straight into the files, under
            # the names of the first one's files; no state dict in memory.
            ckpts = self._ingredients()
            weights = self.weights()
            disk = self._names.disk_names if self._names is not None else {}
            if disk:
                mapping = {n: disk.get(n, n) for n in ckpts[0]}
                ckpts = [ck.with_names(mapping) for ck in ckpts]
                if isinstance(weights, dict):
                    weights = {mapping.get(n, n): w for n, w in weights.items()}
            return run(MergeSpec(ckpts, weights, out, shard_size=shard_size, progress=progress, overwrite=overwrite,
                                 fsync=fsync, desc="save", extras=extras, info=info, donor=donor))

        def write() -> str:
            return with_sidecar(out, self.to_json(), write_soup, overwrite=overwrite)

        return _comm.rank0(write)  # collective under torch.distributed: rank 0 writes

    def to_json(self) -> dict:
        return {
            "recipe": "learned_soup_layerwise" if self.layerwise else "learned_soup",
            "parametrization": self.parametrization,
            "ingredients": [str(s) if isinstance(s, (str, os.PathLike)) else f"<ingredient {i}>"
                            for i, s in enumerate(self.ingredients)],
            "coefficients": self.coefficients.tolist(),
            "tensor_names": self.tensor_names if self.layerwise else None,
            "beta": self.beta,
            "score": self.score,
            "loss": self.loss,
            "uniform_loss": self.uniform_loss,
            "losses": self.losses,
            "config": self.config,
            "seconds": self.seconds,
            "steps": self.steps,
            "seconds_per_step": self.seconds_per_step,
            "uniform_score": self.uniform_score,
        }


class _StateDictModule:
    """A stand-in for a module whose state dict is a given dict of tensors (to mix into new tensors)."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self, keep_vars: bool = False) -> dict:
        return self._sd


def learned_soup(
    ingredients: Sequence[Any],
    model: torch.nn.Module,
    heldout: Iterable,
    *,
    layerwise: bool = False,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 0.05,
    init: str | Sequence[float] = "uniform",
    parametrization: str = "softmax",
    logit_scale: bool = True,
    eval_device: Any = None,
    merge_device: Any = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool | None = None,
    verify: str = "sample",
    key_map: Any = None,
    strip_prefix: str | None = None,
    key: str | None = None,
    device: Any = None,
) -> LearnedResult:
    """Learns the soup's mixing coefficients on held-out data, in O(P) memory.

    Defaults follow the official ``learned_soup.py`` (layer-wise in the paper's appendix): softmax
    over the models starting from the uniform soup, a learned logit scale ``beta`` (initially 1),
    cross-entropy, AdamW (lr 0.05, no weight decay), over the held-out batches shuffled each epoch
    with ``seed``. How long: the official 5 epochs were ~500 steps; by default it runs whole epochs,
    at least 5 and at least 500 steps (:func:`default_steps`: 4 batches give 125 epochs, 100 batches
    5), so a small held-out set trains as long as the official run. A result whose held-out loss is
    no better than the uniform soup's warns once (:class:`LearnedSoupWarning`, what to try).

    Args:
        ingredients: K checkpoints fine-tuned from one init (paths, state dicts, modules).
        model: an ``nn.Module`` with float32 parameters matching the ingredients; its parameters are
            overwritten (load the result with ``result.load_into(model)``). Evaluated in eval mode.
        heldout: ``(inputs, labels)`` batches; iterated once and kept (on ``device``).
        layerwise: one coefficient per model and tensor (else one per model).
        epochs: passes over the held-out batches, exactly; ``steps``: exact number of steps instead
            (not both). Neither (the default): :func:`default_steps` of the number of batches.
        lr: AdamW learning rate.
        init: "uniform", or K initial weights (e.g. a greedy soup's: 1 on kept, 0 elsewhere;
            zeros become a small weight under softmax).
        parametrization: "softmax" (weights >= 0 summing to 1) or "free" (any real weights).
        logit_scale: learn ``beta`` (the official code does); False keeps it at 1.
        eval_device: the evaluation device (default: the model's): the model is moved there and the
            held-out tensors kept there.
        merge_device: where the mix and the gradient pass run (default: the CUDA engine when the
            model is on a GPU and this build has CUDA, else the CPU; "cpu" with a model on a GPU mixes
            on the host and stages the parameters and gradients through pinned memory). A CUDA
            ``merge_device`` needs the model on that device.
        device: deprecated name of ``eval_device`` (a FutureWarning).
        cache_dir: keep the result there (``learned-KEY.json``, with a checksum): a rerun with the
            same ingredients, data and settings returns it without training; a damaged entry is
            trained again (one warning), never trusted.
        seed: order of the batches.
        progress: a progress bar over the steps (default: on a terminal).
        verify: how the cache key fingerprints the ingredients, as in
            :func:`~fastsoup.greedy_soup`: ``"sample"`` (file identity and sampled content) or
            ``"full"`` (every byte).
        key: the state dict to take from training checkpoints, e.g. ``"state_dict_ema"`` (see
            :func:`~fastsoup.open_checkpoint`); path ingredients become :class:`~fastsoup.KeyedPath`.
        key_map, strip_prefix: how the ingredients' names become the model's, as in
            :func:`~fastsoup.greedy_soup` (for a transformers model, its own renames by default).

    Returns:
        A :class:`LearnedResult` (with the steps run, the median time per step, and the uniform
        soup's held-out loss and accuracy next to the learned soup's).

    Example:
        >>> r = fastsoup.learned_soup(paths, model, val_loader, layerwise=True)  # doctest: +SKIP
        >>> r.coefficients.shape, r.score  # doctest: +SKIP
        >>> r.save("learned.safetensors")  # doctest: +SKIP
    """
    start = time.perf_counter()
    eval_device = eval_device_of(eval_device, device, "learned_soup")
    if parametrization not in PARAMETRIZATIONS:
        raise ArgumentError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sources = with_key(ingredients, key)
    if not sources:
        raise ArgumentError("no ingredients: give at least one checkpoint")
    if epochs is not None and steps is not None:
        raise ArgumentError(f"give epochs or steps, not both (got epochs={epochs}, steps={steps})")
    if not lr > 0 or (epochs is not None and not epochs >= 1) or (steps is not None and not steps >= 1):
        raise ArgumentError(f"need lr > 0 and epochs >= 1 (or steps >= 1), got lr={lr}, epochs={epochs}, steps={steps}")
    K = len(sources)
    _cache.check_verify(verify)
    layout = open_checkpoint(model)
    name_map = NameMap.build(key_map=key_map, strip_prefix=strip_prefix, model=model, layout=layout)
    ckpts: list[Checkpoint] = name_map.apply([open_checkpoint(s) for s in sources])
    dev = torch.device(eval_device) if eval_device is not None else model_device(model)
    model = model.to(dev)
    check_compatible([layout] + ckpts)
    params = dict(model.named_parameters())
    bad = [n for n, p in params.items() if p.dtype != torch.float32]
    if bad:
        raise FastsoupError(f"learned_soup needs float32 parameters ({bad[:5]} are not): call model.float() first")
    engine = merge_device_for(dev, merge_device)
    if engine.is_cuda and (dev.type != "cuda" or (dev.index if dev.index is not None else 0) != engine.index):
        raise ArgumentError(f"learned_soup: merge_device {engine} needs the model there (it is on {dev}): pass "
                            f"eval_device=\"{engine}\", or merge_device=\"cpu\"")
    held = prepare(heldout, dev, split="rows")  # torch.distributed: every rank takes a share of every batch
    names = [n for n, r in ckpts[0].items() if r.dtype in ("float16", "bfloat16", "float32", "float64")]
    w0 = _initial_weights(init, K)
    n_batches = len(held.batches)
    total = steps if steps is not None else epochs * n_batches if epochs is not None else default_steps(n_batches)
    config = {"layerwise": layerwise, "epochs": epochs, "steps": steps, "total_steps": total, "lr": lr,
              "init": list(w0), "parametrization": parametrization, "logit_scale": logit_scale, "seed": seed}

    cache_path = None
    if cache_dir is not None:
        fps = [_cache.fingerprint_checkpoint(ck, verify) for ck in ckpts]
        k = _cache.key("learned", _cache.fingerprint_model(model), held.fingerprint, fps, config)
        cache_path = os.path.join(os.fspath(cache_dir), f"learned-{k}.json")
        # under torch.distributed only rank 0 reads it
        d = _comm.rank0(_read_cached, cache_path, (len(names), K) if layerwise else (K,))
        if d is not None:
            result = LearnedResult(torch.tensor(d["coefficients"], dtype=torch.float32), d["tensor_names"] or names,
                                   d["beta"], d["score"], d["loss"], d["uniform_loss"], d["losses"], sources,
                                   layerwise, parametrization, config, time.perf_counter() - start,
                                   len(d["losses"]), d.get("seconds_per_step", 0.0),
                                   d.get("uniform_score", float("nan")), True, _mapped=ckpts, _names=name_map)
            _warn_if_no_better(result)
            return result

    rows = len(names) if layerwise else 1
    base = torch.tensor(w0, dtype=torch.float32)
    if parametrization == "softmax":
        raw0 = torch.log(base.clamp_min(1e-3))  # softmax(log w) = w (renormalized)
    else:
        raw0 = base.clone()
    raw = torch.nn.Parameter(raw0.repeat(rows, 1))
    beta = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.AdamW([raw, beta] if logit_scale else [raw], lr=lr, weight_decay=0.0)

    def alphas() -> torch.Tensor:
        return torch.softmax(raw, dim=1) if parametrization == "softmax" else raw

    def write(alpha: torch.Tensor) -> None:
        a = alpha.detach()
        weights = {n: a[i].tolist() for i, n in enumerate(names)} if layerwise else a[0].tolist()
        mix_into_model(ckpts, model, weights, staging, device=engine)

    staging: dict = {}
    uniform_loss, uniform_score = _heldout_loss(model, held, ckpts, [1.0 / K] * K, staging, 1.0, engine)
    batches = list(range(n_batches))
    step_times: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    order: list[int] = []
    bar = progress_bar(progress, total, "learned soup")
    was_training = model.training
    model.eval()
    state = model.state_dict(keep_vars=True)
    # A parameter shared under several names (tied weights) counts once in a per-model gradient:
    # named_parameters() lists it under its first name only.
    aliases = {n for n, t in state.items() if isinstance(t, torch.nn.Parameter) and n not in params}
    try:
        for step in range(total):
            t0 = time.perf_counter()
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            b = order.pop(0)
            x, y = held.batches[b]
            alpha = alphas()
            write(alpha)
            model.zero_grad(set_to_none=False)
            out = model_logits(model, x)
            if held.split is None:
                loss = torch.nn.functional.cross_entropy(out * beta.to(out.device) if logit_scale else out, y)
            else:  # this rank's rows: its share of the batch's mean loss (summed over ranks below)
                loss = torch.nn.functional.cross_entropy(out * beta.to(out.device) if logit_scale else out, y,
                                                         reduction="sum") / held.split.sizes[b]
            loss.backward()
            grads = {n: _grad(state[n], engine) for n in names}
            found = dots(ckpts, {n: g for n, g in grads.items() if g is not None}, device=engine)
            G = torch.zeros(len(names), K, dtype=torch.float64)
            for i, n in enumerate(names):
                if n in found:
                    G[i] = torch.tensor(found[n], dtype=torch.float64)
            if not layerwise:
                G = G[[i for i, n in enumerate(names) if n not in aliases]].sum(0, keepdim=True)
            if held.split is not None:  # torch.distributed: sum the shares (rank order, float64) on every rank
                G, loss = _sum_shares(held.split.comm, G, loss, beta)
            G = G.float()
            alpha.backward(G)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))  # on a GPU: waits for the step
            step_times.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    with torch.no_grad():
        alpha = alphas().detach()
    b = float(beta.detach()) if logit_scale else 1.0
    write(alpha)
    ev = evaluate(model, held, "accuracy")
    final_loss = float(torch.nn.functional.cross_entropy(ev.logits * b, held.labels))
    coeff = alpha if layerwise else alpha[0]
    result = LearnedResult(coeff.clone(), names, b, ev.score, final_loss, uniform_loss, losses, sources, layerwise,
                           parametrization, config, time.perf_counter() - start, len(losses),
                           statistics.median(step_times) if step_times else 0.0, uniform_score,
                           _mapped=ckpts, _names=name_map)
    if cache_path is not None:
        _comm.rank0(_write_cached, cache_path, result.to_json(), share=False)
    _warn_if_no_better(result)
    return result


def _warn_if_no_better(result: LearnedResult) -> None:
    advice = result.advice
    if advice is not None and _comm.is_main_process():
        warnings.warn(advice, LearnedSoupWarning, stacklevel=3)


def _read_cached(path: str, shape: tuple) -> dict | None:
    """The cached result at ``path`` whose checksum and fields check out (``coefficients`` of
    ``shape``), else None: missing, or damaged (one warning; the soup is trained again and the entry
    rewritten). Reaps the temporary files that killed processes left in the cache folder first."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    _tempfiles.reap(folder)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw.decode("utf-8"))
        why = _cache.checked(d) or _cached_problem(d, shape)
    except UnicodeDecodeError:
        why = "not UTF-8"
    except (ValueError, RecursionError):
        why = "not JSON"
    if why is not None:
        warnings.warn(f"ignoring the damaged learned-soup cache entry {path}: {why}; training again", stacklevel=3)
        return None
    return d


def _cached_problem(d: dict, shape: tuple) -> str | None:
    number = (int, float)
    for name in ("beta", "score", "loss", "uniform_loss"):
        if not isinstance(d.get(name), number) or isinstance(d.get(name), bool):
            return f"field {name!r} is missing or not a number"
    losses, names = d.get("losses"), d.get("tensor_names")
    if not isinstance(losses, list) or not all(isinstance(v, number) for v in losses):
        return "field 'losses' is not a list of numbers"
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return "field 'tensor_names' is not a list of names"
    try:
        coeff = torch.tensor(d.get("coefficients"), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        return "field 'coefficients' is not a table of numbers"
    if tuple(coeff.shape) != tuple(shape):
        return f"coefficients of shape {tuple(coeff.shape)}, expected {tuple(shape)}"
    return None


def _write_cached(path: str, obj: dict) -> None:
    with _tempfiles.replacing(path, text=True) as f:  # whole or not at all; removed when interrupted
        json.dump(_cache.seal(obj), f)


def _sum_shares(comm, G: torch.Tensor, loss: torch.Tensor, beta: torch.nn.Parameter):
    """G and the loss summed over the ranks (each computed them on its rows); beta's gradient likewise, in place."""
    beta_grad = beta.grad if beta.grad is not None else torch.zeros_like(beta)
    G, loss_sum, beta_sum = comm.sum(G, loss.detach(), beta_grad)
    if beta.grad is not None:
        beta.grad.copy_(beta_sum.to(beta.grad.dtype))
    return G, loss_sum


def _initial_weights(init: Any, K: int) -> list[float]:
    if isinstance(init, str):
        if init != "uniform":
            raise ArgumentError(f"init must be 'uniform' or {K} weights, got {init!r}")
        return [1.0 / K] * K
    w = [float(v) for v in init]
    if len(w) != K or not all(v == v and abs(v) != float("inf") for v in w) or sum(w) == 0:
        raise ArgumentError(f"init must be 'uniform' or {K} finite weights with a non-zero sum, got {init!r}")
    total = sum(w)
    return [v / total for v in w]


def _heldout_loss(model, held: HeldOut, ckpts, weights, staging, beta: float, engine) -> tuple[float, float]:
    """The held-out loss (logits scaled by beta) and accuracy of the soup with ``weights``."""
    mix_into_model(ckpts, model, weights, staging, device=engine)
    ev = evaluate(model, held, "accuracy")
    return float(torch.nn.functional.cross_entropy(ev.logits * beta, held.labels)), ev.score


def _grad(t: torch.Tensor, engine):
    """A parameter's gradient where the gradient pass reads it: on the CUDA engine's device, else a
    contiguous CPU tensor (copied from a GPU)."""
    g = t.grad if isinstance(t, torch.nn.Parameter) else None
    if g is None:
        return None
    if engine.is_cuda or g.device.type == "cpu":
        return g.detach().contiguous()
    return g.detach().cpu().contiguous()


__all__ = ["LearnedResult", "LearnedSoupWarning", "default_steps", "learned_soup"]
