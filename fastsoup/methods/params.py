"""Per-tensor parameters as mergekit users write them: a scalar, a list interpolated over the layer
index (a "gradient"), or a list of ``filter`` entries matched against the tensor's name.

The rules follow mergekit (``mergekit/config.py`` ``evaluate_setting``, ``mergekit/plan.py``
``plan_slice``/``plan_module``, HEAD a6e4028), so a config means here what it means there:

* **Layer position** ``t`` of a tensor: ``idx / (num_layers - 1)`` for a tensor of layer ``idx``
  (``t = 1`` when the model has one layer); ``t = 0`` for every tensor outside the layers (embeddings,
  final norm, head: mergekit plans them with ``t = 0``, so they take a gradient's first value).
  fastsoup reads the layer index from the name (the first ``.layers.N.``, ``.layer.N.``, ``.blocks.N.``,
  ``.block.N.``, ``.h.N.`` or ``.resblocks.N.``, at the start of the name or after a dot) and the number
  of layers as the largest index + 1 over the model's names; mergekit reads both from the architecture.
* **Gradient** of n numbers at t: ``s = t * (n - 1)``, ``i0 = int(s)``, ``i1 = min(n - 1, i0 + 1)``,
  ``f = s - i0``, value ``(1 - f) * v[i0] + f * v[i1]`` (float64, in that order).
* **Filters**: entries ``{filter: STRING, value: SCALAR_OR_GRADIENT}`` in order; the first whose filter
  is a substring of the tensor name (or is absent, or ``"*"``) gives the value. When none matches, the
  setting gives nothing and the lookup goes on to the next level (per model -> global -> default).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["Conditional", "Filters", "Gradient", "Scalar", "Setting", "evaluate", "gradient_value",
           "layer_index", "layer_position", "lookup", "num_layers", "parse_setting", "setting_numbers"]

Scalar = Union[float, int, bool, str]
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h|resblocks)\.(\d+)\.")


@dataclass(frozen=True)
class Gradient:
    """A list of numbers interpolated over the layer position."""
    values: tuple[float, ...]


@dataclass(frozen=True)
class Conditional:
    """One ``filter`` entry: ``filter`` None matches every tensor (so does ``"*"``)."""
    filter: str | None
    value: Scalar | Gradient


@dataclass(frozen=True)
class Filters:
    """A list of ``filter`` entries; the first that matches gives the value."""
    entries: tuple[Conditional, ...]


Setting = Union[Scalar, Gradient, Filters]


def _is_number(x: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_value(raw: Any, where: str, numeric: bool) -> Scalar | Gradient:
    """A plain value: a number or a gradient (``numeric``), else a bool or a string."""
    if isinstance(raw, list):
        if not raw:
            raise ValueError(f"{where}: an empty list")
        if not numeric:
            raise ValueError(f"{where}: takes a single value, not a list")
        bad = [x for x in raw if not _is_number(x)]
        if bad:
            raise ValueError(f"{where}: a gradient is a list of numbers, got {bad[0]!r}")
        return Gradient(tuple(float(x) for x in raw))
    if isinstance(raw, bool):
        if numeric:
            raise ValueError(f"{where}: expected a number, got {raw!r}")
        return raw
    if _is_number(raw):
        if not numeric:
            raise ValueError(f"{where}: expected true/false or a name, got {raw!r}")
        return float(raw)
    if isinstance(raw, str):
        if numeric:
            raise ValueError(f"{where}: expected a number, got {raw!r}")
        return raw
    raise ValueError(f"{where}: expected a number, a list of numbers or a list of filters, got {raw!r}")


def parse_setting(raw: Any, where: str, *, numeric: bool = True) -> Setting:
    """One parameter's setting as written in a config, checked.

    Args:
        raw: the value from YAML: a scalar, a list of numbers, or a list of mappings with ``value``
            and optional ``filter``.
        where: what to name in errors, e.g. ``"ties.yml: parameters.density"``.
        numeric: a number-valued parameter (gradients allowed); else a single bool or string.

    Raises:
        ValueError: anything else (empty list, mixed list, a filter entry with other keys...).
    """
    if isinstance(raw, list) and raw and all(isinstance(e, Mapping) for e in raw):
        entries = []
        for j, e in enumerate(raw):
            extra = sorted(set(e) - {"filter", "value"})
            if extra:
                raise ValueError(f"{where}[{j}]: unknown key {extra[0]!r} (a filter entry has 'filter' and 'value')")
            if "value" not in e:
                raise ValueError(f"{where}[{j}]: a filter entry needs a 'value'")
            f = e.get("filter")
            if f is not None and not isinstance(f, str):
                raise ValueError(f"{where}[{j}].filter: expected a string, got {f!r}")
            entries.append(Conditional(f, _parse_value(e["value"], f"{where}[{j}].value", numeric)))
        return Filters(tuple(entries))
    if isinstance(raw, list) and any(isinstance(e, Mapping) for e in raw):
        raise ValueError(f"{where}: a list mixes filter entries and plain values")
    return _parse_value(raw, where, numeric)


def setting_numbers(setting: Setting) -> Iterable[Any]:
    """Every literal value a setting can give (to range-check a parameter once, at parse time: a
    gradient's values lie between its literals)."""
    if isinstance(setting, Filters):
        for e in setting.entries:
            yield from setting_numbers(e.value)
    elif isinstance(setting, Gradient):
        yield from setting.values
    else:
        yield setting


def layer_index(name: str) -> int | None:
    """The layer index of a tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3), or None."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def num_layers(names: Iterable[str]) -> int:
    """The number of layers of a model: the largest layer index of its names + 1 (0 without layers)."""
    return max((i for i in map(layer_index, names) if i is not None), default=-1) + 1


def layer_position(name: str, n_layers: int) -> float:
    """mergekit's ``t`` of a tensor: ``idx / (n_layers - 1)``, 1 for a one-layer model, 0 outside the
    layers."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    if idx >= n_layers:
        raise ValueError(f"{name}: layer {idx} of a model of {n_layers} layers")
    return 1.0 if n_layers <= 1 else idx / (n_layers - 1)


def gradient_value(values: Sequence[float], t: float) -> float:
    """A gradient at position t in [0, 1], interpolated as mergekit does."""
    n = len(values)
    s = t * (n - 1)
    i0 = int(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


def evaluate(setting: Setting, name: str, t: float) -> Scalar | None:
    """A setting's value for one tensor (None: no filter entry matches)."""
    if isinstance(setting, Gradient):
        return gradient_value(setting.values, t)
    if isinstance(setting, Filters):
        for e in setting.entries:
            if e.filter is None or e.filter == "*" or e.filter in name:
                return evaluate(e.value, name, t)
        return None
    return setting


def lookup(levels: Sequence[Mapping[str, Setting] | None], key: str, name: str, t: float) -> Scalar | None:
    """The first value a parameter gets along ``levels`` (e.g. a model's parameters, then the global
    ones): a level without the key, or whose filters do not match the name, passes it on."""
    for level in levels:
        if level and key in level:
            v = evaluate(level[key], name, t)
            if v is not None:
                return v
    return None
