"""Merge methods beyond the soup, on the streaming engine (issue 22): task arithmetic, SLERP, Model
Stock and mergekit's linear, each run as one weighted sum per tensor (:class:`~fastsoup.engine.MergeSpec`
with per-tensor weights), so they stream like ``average``: memory independent of K and of model size,
the same output rules (atomic files, shards, side files, metadata).

The coefficients of each tensor (:mod:`fastsoup.methods.coefficients`) come from its parameters
(:meth:`~fastsoup.methods.MergeConfig.arguments`: scalars, per-layer lists, filters) and, for SLERP and
Model Stock, from its Gram matrix, computed by a first streaming pass over that tensor
(:class:`~fastsoup.diagnostics.TensorGram`: the native ``gram`` kernel; for task vectors a scratch of
at most 64 MiB, whatever K and the tensor's size).

TIES, DARE and breadcrumbs (and breadcrumbs with TIES) run per tensor on the native
``_core.sparse_merge`` (:mod:`fastsoup.methods.native`, bit for bit ``fastsoup._reference``): each float
tensor is merged from the mapped inputs straight into an in-memory output, or into one reused host
scratch of that tensor's output bytes, then written into its shard at its offset (``os.pwrite``).
Their memory: one output tensor's bytes (file outputs) plus the kernel's (``csrc/cpu/sparse.cpp``):
for tensors of 2^18+ elements the one-pass selection's candidate keys, at most one uint32 per element
(one fp32 tensor; about 4 % of the elements per TIES model in practice) and 256 KiB of sampled keys per
model, else 2·2^16 histogram counters per parallel task; and 2 KiB of float64 terms per model per task;
nothing that holds K tensors. Non-float tensors are copied from the base.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._dtypes import info as dtype_info
from .._dtypes import parse_float_dtype
from .._errors import ArgumentError
from ..diagnostics import TensorGram
from ..io import _sidefiles
from ..io._sidefiles import SoupInfo
from ..io.checkpoint import check_compatible, open_checkpoint, with_key
from ..io.names import NameMap
from ..methods import MergeConfig, parse_config, read_config
from ..methods import coefficients as C
from ..methods import native as _native
from ..methods import params as P
from ..methods.spec import METHODS
from .device import CPU, Device, resolve_device
from .driver import MergeSpec, collective, run
from .linear import normalization

SPARSE = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")  # the native sparse kernel's
AVAILABLE = ("linear", "task_arithmetic", "slerp", "model_stock", *SPARSE)
NEXT: tuple = ()
_RESCALES = (None, "l1", "density")


def check_method(method: Any) -> str:
    """``method`` if the engine runs it, else an ArgumentError listing the methods it does."""
    if method in AVAILABLE:
        return method
    avail = ", ".join(AVAILABLE)
    if method in METHODS:
        raise ArgumentError(f"merge method {method!r} is not available yet; available: {avail}")
    raise ArgumentError(f"unknown merge method {method!r}; available: {avail}")


def merge(
    ingredients: Any,
    method: str = "task_arithmetic",
    *,
    base: Any = None,
    weights: Sequence[Any] | None = None,
    lam: Any = None,
    t: Any = None,
    density: Any = None,
    gamma: Any = None,
    seed: int | None = None,
    normalize: bool | None = None,
    rescale: Any = "default",
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
    """Merges checkpoints with a merge method (README, "Merge methods").

    Methods:

    * ``"task_arithmetic"``: ``base + lam * sum_k w_k (theta_k - base)`` (weights default 1, lam 1;
      ``normalize`` divides by the weight sum);
    * ``"slerp"``: two ingredients, ``t`` (0 gives the first); with ``base``, the interpolation of
      their task vectors;
    * ``"model_stock"``: ``t * mean_k theta_k + (1 - t) * base`` with t from the task vectors' mean
      pairwise cosine, per tensor (clamped to [0, 1]);
    * ``"linear"``: mergekit's linear merge, ``sum_k w_k theta_k / sum_k w_k`` (``normalize=False``: the
      raw sum);
    * ``"ties"``: each task vector trimmed to its top ``density`` fraction by magnitude (exact; ties at
      the threshold: lower index first), the sign elected, the disjoint mean (``normalize``, on by
      default), ``base + lam * that``;
    * ``"dare_linear"``, ``"dare_ties"``: each task-vector entry kept with probability ``density`` by the
      counter RNG of (``seed``, model index, tensor name, element index), the kept ones rescaled
      (``rescale="density"``: divided by the density, the default; ``"l1"``: mergekit's L1-norm
      rescale; None), then summed (dare_linear) or TIES's election and sum (dare_ties);
    * ``"breadcrumbs"``, ``"breadcrumbs_ties"``: each task vector keeps the entries below its top
      ``gamma`` fraction, the next ``density`` fraction by magnitude; then summed, or elected as TIES.

    The first four are one rounding of a float64 weighted sum per tensor (the coefficients and their
    exact definition: :mod:`fastsoup.methods.coefficients`); the last five run per tensor on the native
    ``sparse_merge`` (:mod:`fastsoup.methods.native`), bit for bit ``fastsoup._reference``'s function of
    the same name and defaults. The DARE masks depend on the seed and the tensor's name in the output
    (after ``strip_prefix`` and ``key_map``), not on ``threads``.

    Args:
        ingredients: the models, as :func:`~fastsoup.average` takes them (not the base); or a mergekit
            config (a ``.yml`` path or a :class:`~fastsoup.methods.MergeConfig`): see :func:`merge_config`.
        method: one of the methods above.
        base: the base model (the pretrained init): required by task arithmetic and Model Stock,
            optional for SLERP.
        weights: one per ingredient. Each, like ``lam`` and ``t``, is a number, a list of numbers
            interpolated over the layers (mergekit's gradient), or a list of ``{"filter": SUBSTRING,
            "value": ...}`` matched against tensor names (:mod:`fastsoup.methods.params`).
        lam: task arithmetic's scale (mergekit's ``lambda``).
        t: SLERP's position.
        density, gamma: the sparse methods' fractions for every ingredient (defaults: density 1, gamma
            0.01): a number, a gradient or filters as ``lam`` (per-ingredient values: a config).
        seed: DARE's seed (default 0).
        normalize: mergekit's option (task arithmetic: off by default; linear, ties: on; the other
            sparse methods: off).
        rescale: the sparse methods' rescale of the kept entries: None, ``"l1"`` or (DARE) ``"density"``;
            default: ``"density"`` for DARE, None for the others (as ``fastsoup._reference``).
        out, dtype, device, threads, shard_size, progress, overwrite, fsync, key_map, strip_prefix,
        key, config_from: as :func:`~fastsoup.average`; the output dtype defaults to each tensor's in
        the base (SLERP without a base: the first ingredient). Metadata records the method
        (``fastsoup.recipe``), its parameters (``fastsoup.parameters``) and the coefficients.

    Returns:
        The state dict (``out=None``) or ``out``.

    Raises:
        ArgumentError: an unknown or not yet available method, a parameter the method does not take,
            a missing base or ``t``, bad weights.
        CheckpointError, OutputExistsError: as :func:`~fastsoup.average`.

    Example:
        >>> fastsoup.merge(["math.safetensors", "code.safetensors"], "task_arithmetic",
        ...                base="base.safetensors", weights=[0.5, 0.5], lam=1.0, out="ta.safetensors")  # doctest: +SKIP
    """
    options = dict(out=out, dtype=dtype, device=device, threads=threads, shard_size=shard_size, progress=progress,
                   overwrite=overwrite, fsync=fsync, key_map=key_map, strip_prefix=strip_prefix, key=key,
                   config_from=config_from)
    if isinstance(ingredients, MergeConfig) or (isinstance(ingredients, (str, os.PathLike))
                                                and os.fspath(ingredients).endswith((".yml", ".yaml"))):
        given = [n for n, v in (("base", base), ("weights", weights), ("lam", lam), ("t", t), ("density", density),
                                ("gamma", gamma), ("normalize", normalize)) if v is not None]
        if rescale != "default":
            given.append("rescale")
        if given:
            raise ArgumentError(f"merge: a config gives the method's parameters; got {', '.join(given)} as well")
        return merge_config(ingredients, seed=seed, **options)
    if isinstance(ingredients, (str, os.PathLike)) or isinstance(ingredients, Mapping):
        raise ArgumentError("merge: ingredients is a list of models (or a .yml config path)")
    srcs = list(ingredients)
    check_method(method)
    if seed is not None and not method.startswith("dare"):
        raise ArgumentError(f"{method} takes no seed (only the DARE methods draw random numbers)")
    _check_seed(seed)
    if rescale != "default":
        if method not in SPARSE:
            raise ArgumentError(f"{method} takes no rescale (only ties, DARE and breadcrumbs do)")
        if rescale not in _RESCALES or (rescale == "density" and not method.startswith("dare")):
            allowed = "None, 'l1' or 'density'" if method.startswith("dare") else "None or 'l1'"
            raise ArgumentError(f"{method}: rescale must be {allowed}, got {rescale!r}")
    spec = METHODS[method]
    params = {k: v for k, v in (("lambda", lam), ("t", t), ("density", density), ("gamma", gamma),
                                ("normalize", normalize)) if v is not None}
    if method == "slerp":
        if len(srcs) != 2:
            raise ArgumentError(f"slerp takes two ingredients, got {len(srcs)}")
        if t is None:
            raise ArgumentError("slerp needs t (0 gives the first ingredient, 1 the second)")
    elif spec.base == "required" and base is None:
        raise ArgumentError(f"{method} needs a base (base=..., e.g. the pretrained model)")
    elif spec.base == "none" and base is not None:
        raise ArgumentError(f"{method} takes no base")
    if not srcs:
        raise ArgumentError("no ingredients: give at least one checkpoint")
    if weights is not None:
        if spec.param("weight") is None:
            raise ArgumentError(f"{method} takes no weights")
        if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
            raise ArgumentError(f"weights must be one per ingredient, got {weights!r}")
        if len(weights) != len(srcs):
            raise ArgumentError(f"got {len(weights)} weights for {len(srcs)} ingredients")
    elif spec.param("weight") is not None:
        weights = [1.0] * len(srcs)
    names = [f"#{i + 1}" for i in range(len(srcs))]
    models = [{"model": n, **({"parameters": {"weight": w}} if weights is not None else {})}
              for n, w in zip(names, weights or [None] * len(srcs))]
    raw: dict[str, Any] = {"merge_method": method, "models": models, "parameters": params}
    sources = dict(zip(names, srcs))
    if method == "slerp":
        raw["base_model"] = names[0]
    elif base is not None:
        raw["base_model"] = "#0"
        sources["#0"] = base
    cfg = parse_config(raw, source=f"fastsoup.merge({method})")
    sparse: dict[str, Any] = {}
    if method in SPARSE:
        sparse["rescale"] = _native.DEFAULTS[method]["rescale"] if rescale == "default" else rescale
        if method.startswith("dare"):
            sparse["seed"] = 0 if seed is None else seed
    record = {"method": method, **({"weights": list(weights)} if weights is not None else {}),
              **{k: _jsonable(v) if k in ("density", "gamma") else v for k, v in params.items()}, **sparse,
              **({"base": _name(base, "<base>")} if base is not None else {})}
    task_base = base if method == "slerp" else None
    return collective(out, overwrite, "fastsoup.merge", lambda: _run(
        cfg, sources.__getitem__, record=record, task_base=task_base, sparse=sparse, **options))


def merge_config(config: Any, *, seed: int | None = None, out: str | os.PathLike | None = None, dtype: Any = None,
                 device: Any = "cpu",
                 threads: int | None = None, shard_size: int | str | None = None, progress: bool | None = None,
                 overwrite: bool = False, fsync: bool = False, key_map: Any = None, strip_prefix: str | None = None,
                 key: str | None = None, config_from: Any = None):
    """Runs a mergekit config (``fastsoup.methods.read_config``'s subset): the paths as written,
    ``dtype`` (if given) over the config's; ``seed``: DARE's (default 0; mergekit configs hold none).
    Other options as :func:`merge`.

    Example:
        >>> fastsoup.merge_config("examples/slerp.yml", out="merged")  # doctest: +SKIP

    Raises:
        MergeConfigError: the config cannot be read, or holds something outside the subset.
        ArgumentError: its method is not available yet (see :func:`merge`).
    """
    cfg = config if isinstance(config, MergeConfig) else read_config(config)
    check_method(cfg.method)
    if seed is not None and not cfg.method.startswith("dare"):
        raise ArgumentError(f"{cfg.method} takes no seed (only the DARE methods draw random numbers)")
    _check_seed(seed)
    sparse: dict[str, Any] = {}
    if cfg.method.startswith("dare"):
        sparse["seed"] = 0 if seed is None else seed
    record = {"config": cfg.source, "method": cfg.method, "base": cfg.base,
              "models": [{"model": m.path, "parameters": {k: _jsonable(v) for k, v in m.parameters.items()}}
                         for m in cfg.models],
              "parameters": {k: _jsonable(v) for k, v in cfg.parameters.items()}, **sparse}
    return collective(out, overwrite, "fastsoup.merge", lambda: _run(
        cfg, lambda path: path, record=record, sparse=sparse, out=out, dtype=dtype if dtype is not None else cfg.dtype,
        device=device, threads=threads, shard_size=shard_size, progress=progress, overwrite=overwrite, fsync=fsync,
        key_map=key_map, strip_prefix=strip_prefix, key=key, config_from=config_from))


def task_arithmetic(ingredients: Sequence[Any], base: Any, weights: Sequence[Any] | None = None, *, lam: Any = 1.0,
                    normalize: bool = False, **options: Any):
    """``base + lam * sum_k w_k (theta_k - base)``: :func:`merge` with ``method="task_arithmetic"``.

    Example:
        >>> fastsoup.task_arithmetic(["a.safetensors", "b.safetensors"], "base.safetensors", lam=0.8,
        ...                          out="ta.safetensors")  # doctest: +SKIP
    """
    return merge(ingredients, "task_arithmetic", base=base, weights=weights, lam=lam, normalize=normalize, **options)


def slerp(a: Any, b: Any, t: Any, *, base: Any = None, **options: Any):
    """Spherical interpolation of two models per tensor (t = 0 gives ``a``), lerp where the tensors
    are nearly parallel (|cos| > 0.9995); with ``base``, of their task vectors. :func:`merge` with
    ``method="slerp"``.

    Example:
        >>> fastsoup.slerp("a.safetensors", "b.safetensors", 0.5, out="slerp.safetensors")  # doctest: +SKIP
    """
    return merge([a, b], "slerp", base=base, t=t, **options)


def model_stock(ingredients: Sequence[Any], base: Any, **options: Any):
    """Model Stock (Jang et al. 2024): per tensor, ``t * mean_k theta_k + (1 - t) * base`` with t from
    the mean pairwise cosine of the task vectors (clamped to [0, 1]). :func:`merge` with
    ``method="model_stock"``; at least two ingredients.

    Example:
        >>> fastsoup.model_stock(["ft1.safetensors", "ft2.safetensors", "ft3.safetensors"], "init.safetensors",
        ...                      out="stock.safetensors")  # doctest: +SKIP
    """
    return merge(ingredients, "model_stock", base=base, **options)


def ties(ingredients: Sequence[Any], base: Any, weights: Sequence[Any] | None = None, *, density: Any = 1.0,
         lam: Any = None, normalize: bool | None = None, **options: Any):
    """TIES-Merging: :func:`merge` with ``method="ties"``.

    Example:
        >>> fastsoup.ties(["a.safetensors", "b.safetensors"], "base.safetensors", density=0.5,
        ...               out="ties.safetensors")  # doctest: +SKIP
    """
    return merge(ingredients, "ties", base=base, weights=weights, density=density, lam=lam, normalize=normalize,
                 **options)


def dare(ingredients: Sequence[Any], base: Any, weights: Sequence[Any] | None = None, *, density: Any = 1.0,
         seed: int = 0, ties: bool = True, **options: Any):
    """DARE: :func:`merge` with ``method="dare_ties"`` (``ties=False``: ``"dare_linear"``).

    Example:
        >>> fastsoup.dare(["a.safetensors", "b.safetensors"], "base.safetensors", density=0.3, seed=0,
        ...               out="dare.safetensors")  # doctest: +SKIP
    """
    return merge(ingredients, "dare_ties" if ties else "dare_linear", base=base, weights=weights, density=density,
                 seed=seed, **options)


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64):
        raise ArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _name(src: Any, default: str) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else default


def _jsonable(setting: Any) -> Any:
    """A parameter setting as JSON: numbers as they are, gradients as lists, filters as entries."""
    if isinstance(setting, P.Gradient):
        return list(setting.values)
    if isinstance(setting, P.Filters):
        return [{"filter": e.filter, "value": _jsonable(e.value)} for e in setting.entries]
    return setting


def _run(cfg: MergeConfig, resolve: Callable[[str], Any], *, record: dict, task_base: Any = None,
         sparse: dict | None = None, out, dtype, device, threads, shard_size, progress, overwrite, fsync, key_map,
         strip_prefix, key, config_from):
    method = cfg.method
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
    out_override = parse_float_dtype(dtype) if dtype is not None else None
    models = [resolve(m.path) for m in cfg.models]
    if method == "linear":
        srcs = models
    elif method == "slerp":
        srcs = models if task_base is None else [task_base, *models]
    else:
        srcs = [resolve(cfg.base), *models]
    srcs = with_key(srcs, key)
    opened = [open_checkpoint(s) for s in srcs]
    try:
        name_map = NameMap.build(key_map=key_map, strip_prefix=strip_prefix)
        mapped = name_map.apply(opened)
        check_compatible(mapped)
        note = _sidefiles.mixed_dtypes_note(mapped, out_override)
        if note is not None:
            _sidefiles.note(note)
        donor = _sidefiles.donor_for(out, config_from, srcs[0])  # read before any work
        layout = mapped[0]
        n_layers = P.num_layers(list(layout))
        if cfg.layer_range is not None and cfg.layer_range[1] != n_layers:
            raise ArgumentError(f"{cfg.source}: layer_range {list(cfg.layer_range)} does not cover the models' "
                                f"{n_layers} layers (fastsoup merges whole models)")
        floats = [n for n, ref in layout.items() if dtype_info(ref.dtype).kind == "float"]
        if method in SPARSE:
            kernel, per = _sparse_kernel(cfg, mapped, n_layers, out_override, sparse or {}, threads or 0, dev)
            # one weight per ingredient, as the other methods record: the base takes none here (null)
            info = SoupInfo(method, _sidefiles.ingredient_names(srcs), {n: [None, *w] for n, w in per.items()},
                            parameters=record)
            return run(MergeSpec(mapped, per, out, dtype=out_override, device=dev, threads=threads or 0,
                                 shard_size=shard_size, progress=progress, overwrite=overwrite, fsync=fsync,
                                 desc=method, aliases=name_map.aliases, info=info, donor=donor, kernel=kernel))
        weights, divisor = _coefficients(cfg, mapped, floats, n_layers, task_base is not None, threads or 0)
        info = SoupInfo(method, _sidefiles.ingredient_names(srcs), weights if isinstance(weights, dict)
                        else [w / divisor[0] for w in weights], parameters=record)
        return run(MergeSpec(mapped, weights, out, dtype=out_override, divisor=divisor, device=dev,
                             threads=threads or 0, shard_size=shard_size, progress=progress, overwrite=overwrite,
                             fsync=fsync, desc=method, aliases=name_map.aliases, info=info, donor=donor))
    finally:
        for src, ck in zip(srcs, opened):
            if ck is not src:
                ck.close()


def _sparse_kernel(cfg: MergeConfig, ckpts: list, n_layers: int, override: str | None, sparse: dict, threads: int,
                   device: Device = CPU):
    """The per-tensor kernel of a sparse method (``MergeSpec.kernel``) over ``ckpts`` (the base first),
    and every float tensor's per-model weights (the metadata's ``fastsoup.weights``). On a CUDA
    ``device`` the kernel is ``sparse_merge_cuda`` (tensors on that GPU used in place, the others
    copied in tensor by tensor; the output address is the GPU's for an in-memory result)."""
    cuda = device.index if device.is_cuda else None
    method = cfg.method
    first = ckpts[0]
    args = {n: cfg.arguments(n, n_layers) for n, ref in first.items() if dtype_info(ref.dtype).kind == "float"}
    per = {n: [float(w) for w in a["weights"]] for n, a in args.items()}

    def kernel(name: str, address: int) -> None:
        a = dict(args[name])
        a.update(sparse)  # the Python API's rescale and DARE's seed
        if not method.startswith("dare"):
            a.pop("seed", None)
        keep = []
        refs = []
        for ck in ckpts:
            ref = ck[name]
            addr, _loc, obj = ck.buffer(ref, device)
            keep.append(obj)
            refs.append((addr, ref.dtype))
        ref0 = first[name]
        try:
            _native.sparse_merge(method, refs[0], refs[1:], (address, override or ref0.dtype), n=ref0.numel,
                                 name=name if method.startswith("dare") else None, threads=threads, device=cuda,
                                 **a)
        except ValueError as e:
            raise ArgumentError(f"{first.where(name)}: {e}") from None
        del keep

    return kernel, per


def _coefficients(cfg: MergeConfig, ckpts: list, floats: list[str], n_layers: int, with_base: bool, threads: int):
    """Every float tensor's coefficients over ``ckpts``: ``(K weights, divisor)`` when they are the same
    for every tensor, else ``({name: K weights}, (1, 0))``."""
    method = cfg.method
    per: dict[str, list[float]] = {}
    if method == "linear":
        for name in floats:
            a = cfg.arguments(name, n_layers)
            per[name] = [float(w) for w in a["weights"]]
        rows = {tuple(v) for v in per.values()}
        if cfg.parameters.get("normalize", True) is not False and len(rows) <= 1:
            return normalization(list(rows.pop()) if rows else [1.0] * len(ckpts), len(ckpts))  # as average()
        for name in floats:
            if cfg.arguments(name, n_layers).get("normalize", True):
                total = sum(per[name])
                if total == 0.0:
                    raise ArgumentError(f"{cfg.source}: the weights of tensor {name} sum to zero: cannot normalize")
                per[name] = [w / total for w in per[name]]
    elif method == "task_arithmetic":
        for name in floats:
            a = cfg.arguments(name, n_layers)
            per[name] = C.task_arithmetic_coefficients(a["weights"], a["lam"], a["normalize"])
    elif method == "model_stock":
        grams = TensorGram(ckpts[1:], ckpts[0], threads=threads)
        n = len(ckpts) - 1
        for name in floats:
            t = C.model_stock_t(grams(name)) if ckpts[0][name].numel else 0.0
            per[name] = [1.0 - t] + [t / n] * n
    elif method == "slerp":
        grams = TensorGram(ckpts[1:], ckpts[0], threads=threads) if with_base else TensorGram(ckpts, threads=threads)
        for name in floats:
            tt = cfg.arguments(name, n_layers)["t"]
            g = grams(name) if ckpts[0][name].numel else [[0.0, 0.0], [0.0, 0.0]]
            try:
                s0, s1 = C.slerp_coefficients(g[0][0], g[0][1], g[1][1], tt)
            except ValueError as e:
                raise ArgumentError(str(e)) from None
            per[name] = [C.base_coefficient([s0, s1]), s0, s1] if with_base else [s0, s1]
    else:  # pragma: no cover -- check_method guards this
        check_method(method)
    rows = {tuple(v) for v in per.values()}
    if len(rows) == 1:
        return list(rows.pop()), (1.0, 0.0)
    if not rows:
        return [0.0] * len(ckpts), (1.0, 0.0)
    return per, (1.0, 0.0)


__all__ = ["AVAILABLE", "NEXT", "SPARSE", "check_method", "dare", "merge", "merge_config", "model_stock", "slerp",
           "task_arithmetic", "ties"]
