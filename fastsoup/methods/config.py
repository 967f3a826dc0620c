"""mergekit YAML configs: the subset that covers fastsoup's merge methods, read into a plain
:class:`MergeConfig` that ``fastsoup.merge`` runs.

The subset (mergekit ``mergekit/config.py`` ``MergeConfiguration``, HEAD a6e4028)::

    merge_method: ties                   # one of fastsoup.methods.METHODS
    base_model: path/to/base             # the methods with a base
    models:                              # the inputs (the base may be listed too, without parameters)
      - model: path/to/a
        parameters: {weight: 0.5, density: [0.3, 0.7]}   # per-model: scalar, gradient or filters
    parameters:                          # global: method parameters, and per-model ones for every model
      lambda: 1.0
      density: [{filter: mlp, value: 0.5}, {value: 0.7}]
    dtype: bfloat16                      # output dtype (out_dtype, if given, wins)
    tokenizer_source: base

``slices`` is read in its simple form only, one slice of whole models (what slerp configs use)::

    slices:
      - sources:
          - {model: path/to/a, layer_range: [0, 32]}
          - {model: path/to/b, layer_range: [0, 32]}

Every other key (``modules``, ``tokenizer``, ``chat_template``, several slices, a slice's own
``parameters`` or ``base_model``...) is an error that names the key and the file, never ignored: a
config that fastsoup would merge differently from mergekit is refused.

Differences from mergekit, on purpose: model paths are taken as written (local paths; a ``+`` LoRA
suffix is refused); ``dtype`` is the output dtype only (mergekit also casts the inputs to it before
merging; fastsoup computes from the stored dtypes in float64); a parameter on the base model, a global
parameter under a model, or one the method does not use is an error (mergekit ignores them); densities
and gammas must lie in [0, 1]; ``rescale: true`` keeps mergekit's meaning (the L1-norm rescale).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._dtypes import parse_float_dtype
from .._errors import MergeConfigError
from . import params as P
from .spec import METHODS, REQUIRED, MethodSpec, ParamSpec

__all__ = ["MergeConfig", "MergeConfigError", "ModelEntry", "parse_config", "read_config"]

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
_REFUSED = {
    "modules": "multi-module merges (modules:) are not supported; use models:",
    "tokenizer": "tokenizer configuration (tokenizer:) is not supported; use tokenizer_source: base",
    "chat_template": "chat_template is not supported",
}
# YAML 1.2 floats with an exponent and no dot (1e-3): PyYAML (YAML 1.1) reads them as strings,
# mergekit's pydantic models turn such strings into floats. Read them as floats too.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class ModelEntry(NamedTuple):
    """One input model: its path as written and its per-model parameter settings."""
    path: str
    parameters: Mapping[str, P.Setting]


@dataclass(frozen=True)
class MergeConfig:
    """A merge, as a config describes it.

    Attributes:
        method: the merge method's name (a key of ``fastsoup.methods.METHODS``).
        base: the base model's path, or None (methods without a base).
        models: the inputs other than the base, in the config's order (their position is the DARE
            model index). For slerp: both models, the base first (t = 0 gives the base).
        parameters: the global parameter settings (method parameters, and per-model ones that apply
            to every model).
        dtype: the output dtype's canonical name, or None (each tensor keeps the base's dtype).
        tokenizer_source: "base" or None.
        layer_range: the slices form's layer range (the merge checks it covers every layer), or None.
        source: the file it was read from (for messages).
    """
    method: str
    base: str | None
    models: tuple[ModelEntry, ...]
    parameters: Mapping[str, P.Setting] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None
    layer_range: tuple[int, int] | None = None
    source: str = "<config>"

    @property
    def spec(self) -> MethodSpec:
        """The method's declaration."""
        return METHODS[self.method]

    def tensor_parameters(self, name: str, n_layers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The parameters of one tensor: ``(global, per_model)`` with every value resolved (gradient
        at the tensor's layer position, filters matched) and defaults filled in.

        Args:
            name: the tensor's name.
            n_layers: the model's number of layers (``fastsoup.methods.params.num_layers`` of its names).

        Raises:
            MergeConfigError: a required parameter (a model's ``weight``, slerp's ``t``) has no value
                for this tensor.
        """
        t = P.layer_position(name, n_layers)
        out_global: dict[str, Any] = {}
        per_model: list[dict[str, Any]] = [{} for _ in self.models]
        for p in self.spec.params:
            if p.scope == "global":
                out_global[p.name] = self._value(p, [self.parameters], name, t, None)
            else:
                for k, m in enumerate(self.models):
                    per_model[k][p.name] = self._value(p, [m.parameters, self.parameters], name, t, m.path)
        return out_global, per_model

    def _value(self, p: ParamSpec, levels: list, name: str, t: float, model: str | None) -> Any:
        """One parameter's value along ``levels``, else its default (a required one: an error)."""
        v = P.lookup(levels, p.name, name, t)
        if v is None:
            if p.default is REQUIRED:
                who = f" of model {model}" if model else ""
                raise MergeConfigError(f"{self.source}: parameter {p.name!r}{who} has no value for tensor {name}")
            return p.default
        return v

    def arguments(self, name: str, n_layers: int) -> dict[str, Any]:
        """One tensor's keyword arguments for the method's function in ``fastsoup._reference`` (and
        the engine): ``weights``, ``density``, ``gamma`` as per-model lists, ``lam``, ``normalize``,
        ``rescale`` ("l1" or None: mergekit's ``rescale: true`` is the L1 rescale), ``t``."""
        g, per = self.tensor_parameters(name, n_layers)
        out: dict[str, Any] = {}
        spec = self.spec
        if spec.param("weight"):
            out["weights"] = [m["weight"] for m in per]
        for key in ("density", "gamma"):
            if spec.param(key):
                out[key] = [m[key] for m in per]
        if "lambda" in g:
            out["lam"] = g["lambda"]
        if "normalize" in g:
            out["normalize"] = g["normalize"]
        if "rescale" in g:
            out["rescale"] = "l1" if g["rescale"] else None
        if "t" in g:
            out["t"] = g["t"]
        return out


def read_config(path: str | os.PathLike) -> MergeConfig:
    """Reads a mergekit YAML config (the subset fastsoup runs).

    Example:
        >>> cfg = read_config("examples/ties.yml")  # doctest: +SKIP
        >>> cfg.method, cfg.base, [m.path for m in cfg.models]  # doctest: +SKIP

    Raises:
        MergeConfigError: the file cannot be read or parsed, or holds a key outside the subset.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeConfigError(f"{source}: cannot read the config: {e}") from None
    return parse_config(text, source=source)


def _load_yaml(text: str, source: str) -> Any:
    """YAML text parsed safely (no tags but the standard ones), a duplicate key an error, YAML 1.2
    exponent floats read as floats."""
    try:
        import yaml  # lazily: only configs need it
    except ImportError:
        raise MergeConfigError(f"{source}: reading a YAML config needs PyYAML (pip install pyyaml)") from None

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Loader, node: yaml.MappingNode) -> dict:
        """A mapping, refusing a key given twice (PyYAML keeps the last silently)."""
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise MergeConfigError(f"{source}: line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return loader.construct_mapping(node, deep=True)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise MergeConfigError(f"{source}: not valid YAML: {e}") from None


def parse_config(config: str | Mapping[str, Any], *, source: str = "<config>") -> MergeConfig:
    """A config from YAML text or from an already-parsed mapping; see :func:`read_config`."""
    data = _load_yaml(config, source) if isinstance(config, str) else config
    return _Parser(source).parse(data)


class _Parser:
    """Checks a parsed config against the subset, section by section; errors name the file and key."""

    def __init__(self, source: str):
        self.source = source

    def error(self, where: str, message: str) -> MergeConfigError:
        """The error for the key at ``where`` (``models[1].parameters.density``...)."""
        return MergeConfigError(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def mapping(self, value: Any, where: str) -> Mapping[str, Any]:
        """``value`` as a mapping with string keys."""
        if not isinstance(value, Mapping):
            raise self.error(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.error(where, f"key {key!r} is not a string")
        return value

    def model_path(self, value: Any, where: str) -> str:
        """A model reference: a non-empty path, without mergekit's ``+lora`` suffix."""
        if not isinstance(value, str) or not value:
            raise self.error(where, f"expected a model path, got {value!r}")
        if "+" in value:
            raise self.error(where, f"{value!r}: a model with a LoRA ('+') is not supported")
        return value

    def parse(self, data: Any) -> MergeConfig:
        """The whole config."""
        data = self.mapping(data if data is not None else {}, "")
        for key in data:
            if key in _REFUSED:
                raise self.error(key, _REFUSED[key])
            if key not in TOP_KEYS:
                raise self.error(key, f"unknown key {key!r} (fastsoup reads: {', '.join(TOP_KEYS)})")
        if "merge_method" not in data:
            raise self.error("", "no merge_method")
        method = data["merge_method"]
        if method not in METHODS:
            raise self.error("merge_method", f"{method!r} is not one of {', '.join(METHODS)}")
        spec = METHODS[method]
        base = data.get("base_model")
        if base is not None:
            base = self.model_path(base, "base_model")

        if ("models" in data) == ("slices" in data):
            raise self.error("", "give exactly one of 'models' and 'slices'")
        if "models" in data:
            entries, layer_range = self.models(data["models"], spec), None
        else:
            entries, layer_range = self.slices(data["slices"], spec)

        paths = [p for p, _ in entries]
        dup = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        if dup is not None:
            raise self.error("models", f"model {dup!r} is listed twice")
        models = self.place_base(method, spec, base, entries)
        parameters = self.parameters(data.get("parameters"), spec, "parameters", per_model=False)

        dtype = None
        for key in ("dtype", "out_dtype"):  # out_dtype, when given, is the output dtype
            if data.get(key) is not None:
                try:
                    dtype = parse_float_dtype(data[key])
                except ValueError as e:
                    raise self.error(key, str(e)) from None
        tok = data.get("tokenizer_source")
        if tok is not None and tok != "base":
            raise self.error("tokenizer_source", f"{tok!r}: only 'base' is supported (the base model's tokenizer)")
        return MergeConfig(method=method, base=base, models=models, parameters=parameters, dtype=dtype,
                           tokenizer_source=tok, layer_range=layer_range, source=self.source)

    def models(self, raw: Any, spec: MethodSpec) -> list[tuple[str, dict]]:
        """The ``models`` list: (path, parameter settings) pairs."""
        if not isinstance(raw, list) or not raw:
            raise self.error("models", "expected a non-empty list of {model: PATH, parameters: ...}")
        out = []
        for i, item in enumerate(raw):
            where = f"models[{i}]"
            item = self.mapping(item, where)
            for key in item:
                if key not in ("model", "parameters"):
                    raise self.error(f"{where}.{key}", f"unknown key {key!r} (a model has 'model' and 'parameters')")
            if "model" not in item:
                raise self.error(where, "no 'model'")
            path = self.model_path(item["model"], f"{where}.model")
            out.append((path, self.parameters(item.get("parameters"), spec, f"{where}.parameters", per_model=True)))
        return out

    def slices(self, raw: Any, spec: MethodSpec) -> tuple[list[tuple[str, dict]], tuple[int, int]]:
        """The simple ``slices`` form: one slice whose sources all span [0, N): the models and N."""
        if not isinstance(raw, list) or len(raw) != 1:
            n = len(raw) if isinstance(raw, list) else raw
            raise self.error("slices", f"only one slice of whole models is supported, got {n!r} "
                                       "(several slices build a model from layer ranges: not a merge fastsoup does)")
        sl = self.mapping(raw[0], "slices[0]")
        for key in sl:
            if key != "sources":
                raise self.error(f"slices[0].{key}", f"{key!r} in a slice is not supported (only 'sources'; "
                                                     "put parameters and base_model at the top level)")
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise self.error("slices[0].sources", "expected a non-empty list")
        out, ranges = [], set()
        for i, src in enumerate(sources):
            where = f"slices[0].sources[{i}]"
            src = self.mapping(src, where)
            for key in src:
                if key not in ("model", "layer_range", "parameters"):
                    raise self.error(f"{where}.{key}", f"unknown key {key!r} (a source has 'model', 'layer_range' "
                                                       "and 'parameters')")
            if "model" not in src or "layer_range" not in src:
                raise self.error(where, "a source needs 'model' and 'layer_range'")
            lr = src["layer_range"]
            ints = isinstance(lr, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            if not ints or len(lr) != 2 or lr[0] != 0 or lr[1] <= 0:
                raise self.error(f"{where}.layer_range",
                                 f"{lr!r}: only [0, N], every layer of the models, is supported")
            ranges.add(tuple(lr))
            path = self.model_path(src["model"], f"{where}.model")
            out.append((path, self.parameters(src.get("parameters"), spec, f"{where}.parameters", per_model=True)))
        if len(ranges) != 1:
            raise self.error("slices[0].sources", f"the sources' layer ranges differ: {sorted(ranges)}")
        return out, ranges.pop()

    def place_base(self, method: str, spec: MethodSpec, base: str | None,
                   entries: list[tuple[str, dict]]) -> tuple[ModelEntry, ...]:
        """The inputs besides the base (slerp: the base first), checked against the method's counts."""
        if spec.base == "none":
            if base is not None:
                raise self.error("base_model", f"{method} takes no base model")
            models = [ModelEntry(p, ps) for p, ps in entries]
        else:
            if base is None:
                raise self.error("base_model", f"{method} needs a base_model")
            for p, ps in entries:
                if p == base and ps:
                    raise self.error("models", f"the base model {base!r} has parameters ({', '.join(ps)}): "
                                               f"{method} uses none for the base")
            models = [ModelEntry(p, ps) for p, ps in entries if p != base]
            if method == "slerp":
                if len(entries) != 2 or len(models) != 1:
                    listed = "listed" if len(models) < len(entries) else "not listed"
                    raise self.error("models", "slerp takes two models, one of them the base_model "
                                               f"(got {len(entries)} models, base {listed})")
                models = [ModelEntry(base, {})] + models
        n = len(models) - (1 if method == "slerp" else 0)
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = f"at least {spec.min_models}" if spec.max_models is None else f"exactly {spec.max_models}"
            raise self.error("models", f"{method} takes {want} model(s) besides the base, got {n}")
        return tuple(models)

    def parameters(self, raw: Any, spec: MethodSpec, where: str, *, per_model: bool) -> dict[str, P.Setting]:
        """A ``parameters`` mapping (a model's or the global one): known names, valid settings, ranges."""
        if raw is None:
            return {}
        raw = self.mapping(raw, where)
        out = {}
        for key, value in raw.items():
            p = spec.param(key)
            if p is None:
                known = ", ".join(q.name for q in spec.params if per_model is False or q.scope == "model")
                raise self.error(f"{where}.{key}", f"{spec.name} has no parameter {key!r} (its parameters: {known})")
            if per_model and p.scope == "global":
                raise self.error(f"{where}.{key}", f"{key!r} is a global parameter of {spec.name}: put it in the "
                                                   "top-level parameters")
            try:
                setting = P.parse_setting(value, f"{self.source}: {where}.{key}", numeric=p.kind != "bool")
            except ValueError as e:
                raise MergeConfigError(str(e)) from None
            for v in P.setting_numbers(setting):
                if p.kind == "fraction" and not 0.0 <= v <= 1.0:
                    raise self.error(f"{where}.{key}", f"{v!r} is outside [0, 1]")
                if p.kind == "number" and not math.isfinite(v):
                    raise self.error(f"{where}.{key}", f"{v!r} is not finite")
                if p.kind == "bool" and not isinstance(v, bool):
                    raise self.error(f"{where}.{key}", f"expected true or false, got {v!r}")
                if key == "filter_wise" and v:
                    raise self.error(f"{where}.{key}", "filter_wise: true (per-row Model Stock) is not supported")
            out[key] = setting
        return out
