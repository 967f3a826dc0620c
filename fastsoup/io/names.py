"""How the tensor names of one layout meet another's: key maps, a prefix to strip, tied weights.

The same weights come under different names for three reasons, each handled here, in one place:

- the module and its files disagree: transformers 5 renames tensors on load (ViT's
  ``attention.attention.key`` on disk is ``attention.k_proj`` in the module), or a user's own code
  does. A **key map** gives the module's name of each name on disk (:func:`compile_key_map`); for a
  transformers model it is derived from the model itself (:func:`transformers_key_map`), through
  the conversion transformers applies when it saves, never from a list of names;
- a wrapper adds a **prefix**: DDP and open_clip's training script save ``module.``-prefixed
  names (:func:`strip_prefix_map`, and :func:`prefix_hint` to suggest it);
- **tied weights**: one tensor under two names (a language model's input embedding and its output
  head). ``save_pretrained`` writes the first name only, ``model.state_dict()`` both, safetensors'
  ``save_model`` the second. :func:`reconcile` finds the pairs (shared storage in memory; on disk, a
  name one layout has and another lacks while its partner is there, confirmed by the other layouts
  or the donor's ``tie_word_embeddings``) and gives every layout the same names.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from .._errors import ArgumentError, ArgumentTypeError, CheckpointError

KeyMap = Union[Callable[[str], str], Mapping[str, str], Sequence[tuple]]


def compile_key_map(key_map: KeyMap | None) -> Callable[[str], str] | None:
    """A function of a name on disk to the module's name, from what users give:

    - a callable ``name -> new name``;
    - a dict ``{name on disk: module name}`` (names it does not list stay as they are);
    - a list of ``(regex, replacement)`` pairs, applied in order with ``re.sub`` (so every matching
      rule rewrites the name in turn), e.g. ``[(r"^module\\.", "")]``.
    """
    if key_map is None:
        return None
    if callable(key_map):
        def call(name: str) -> str:
            new = key_map(name)
            if not isinstance(new, str):
                raise ArgumentTypeError(f"key_map({name!r}) returned {type(new).__name__}, expected a str")
            return new

        return call
    if isinstance(key_map, Mapping):
        table = dict(key_map)
        bad = [k for k, v in table.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ArgumentTypeError(f"key_map must map names to names (str -> str); got {bad[0]!r}: {table[bad[0]]!r}")
        return lambda name: table.get(name, name)
    rules = []
    for item in key_map:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ArgumentTypeError(f"key_map rules are (regex, replacement) pairs of strings; got {item!r}")
        try:
            rules.append((re.compile(item[0]), item[1]))
        except re.error as e:
            raise ArgumentError(f"key_map: {item[0]!r} is not a regular expression: {e}") from None

    def apply(name: str) -> str:
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        return name

    return apply


def strip_prefix_map(prefix: str | None) -> Callable[[str], str] | None:
    """Removes ``prefix`` from the names that start with it (``"module."`` for DDP checkpoints)."""
    if not prefix:
        return None
    if not isinstance(prefix, str):
        raise ArgumentTypeError(f"strip_prefix must be a string, got {type(prefix).__name__}")
    return lambda name: name[len(prefix):] if name.startswith(prefix) else name


def chain(*fns: Callable[[str], str] | None) -> Callable[[str], str] | None:
    """The functions applied in order (None ones skipped); None when there are none."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def apply(name: str) -> str:
        for f in fns:
            name = f(name)
        return name

    return apply


def rename(ck, fn: Callable[[str], str] | None):
    """``ck`` with every name ``n`` as ``fn(n)`` (a new Checkpoint on the same data); ``ck`` itself
    when ``fn`` is None or changes nothing. Two names that would become one are an error."""
    if fn is None:
        return ck
    mapping = {name: fn(name) for name in ck}
    if all(k == v for k, v in mapping.items()):
        return ck
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise CheckpointError(
                f"{ck.source}: the key map gives {seen[new]!r} and {old!r} the same name {new!r}")
        seen[new] = old
    return ck.with_names(mapping)


# ---------------------------------------------------------------------------------------------------
# Hints


def prefix_hint(missing: Sequence[str], extra: Sequence[str]) -> str | None:
    """When two layouts' names differ only by a common prefix (the names one lacks are the other's
    with a prefix added), the options that fix it; else None."""
    if not missing or not extra or len(missing) != len(extra):
        return None
    for have, want in ((list(extra), set(missing)), (list(missing), set(extra))):
        common = os.path.commonprefix(have)
        cuts = [i + 1 for i, c in enumerate(common) if c == "."]
        for cut in cuts:  # the shortest dotted prefix first
            prefix = common[:cut]
            if {n[cut:] for n in have} == want:
                return (f"the names differ only by the prefix {prefix!r}, as DDP and open_clip training checkpoints "
                        f"add 'module.': strip_prefix={prefix!r} (CLI: --strip-prefix {prefix}) removes it from the "
                        f"checkpoints that have it; key_map=[('^', {prefix!r})] (CLI: --rename '^={prefix}') adds it "
                        "to those that lack it")
    return None


# ---------------------------------------------------------------------------------------------------
# transformers: the names on disk of a model's tensors


_KEY_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FusedLayoutError(CheckpointError):
    """The model's tensors and the files' tensors do not correspond one to one (transformers fuses or
    splits them on load, e.g. Mixtral's experts)."""


def transformers_key_map(model: Any) -> dict[str, str] | None:
    """``{name on disk: module name}`` for a transformers model whose names differ from the names
    ``save_pretrained`` writes, derived from the model: each tensor, as a shape-only (meta) tensor,
    goes through the conversion transformers applies when it saves the model
    (``transformers.core_model_loading.revert_weight_conversion``). None when the model is not a
    transformers model, or its names are the names on disk.

    Raises:
        FusedLayoutError: some module tensors are several tensors on disk (or the other way round):
            averaging them through the module is not supported; the message says what to do.
    """
    import sys

    if "transformers" not in sys.modules:  # a transformers model means transformers is imported: never import it
        return None
    import torch
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x renames nothing on load
        return None
    shapes = tuple((n, tuple(t.shape)) for n, t in model.state_dict().items())
    hit = _KEY_MAPS.get(model)
    if hit is not None and hit[0] == shapes:
        return hit[1]
    disk_of: dict[str, str] = {}
    fused = []
    for name, t in model.state_dict().items():
        out = revert_weight_conversion(model, {name: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")})
        if len(out) == 1:
            (disk, v), = out.items()
            if tuple(v.shape) == tuple(t.shape):
                disk_of[name] = disk
                continue
        fused.append((name, sorted(out)))
    if fused:
        name, parts = fused[0]
        raise FusedLayoutError(
            f"{type(model).__name__}: {len(fused)} of its tensors are not one tensor each on disk (e.g. {name!r} is saved "
            f"as {len(parts)}: {parts[:3]}{' ...' if len(parts) > 3 else ''}), because transformers fuses them on load. "
            "Soups through the module cannot map them: average the checkpoint folders file to file "
            "(fastsoup.average / `fastsoup average`, names as on disk), then load the soup with from_pretrained"
        )
    module_of = None
    if not all(k == v for k, v in disk_of.items()):
        module_of = {disk: name for name, disk in disk_of.items()}
        if len(module_of) != len(disk_of):
            raise FusedLayoutError(f"{type(model).__name__}: two module tensors are saved under one name on disk")
    _KEY_MAPS[model] = (shapes, module_of)  # a search forms many soups of one model: derived once
    return module_of


def tied_pairs_of_module(model: Any) -> dict[str, str]:
    """``{alias: canonical}`` from a transformers model's declaration of its tied weights (the name
    ``save_pretrained`` drops -> the name it keeps); {} for other modules."""
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        return {str(k): str(v) for k, v in tied.items()}
    return {}


# ---------------------------------------------------------------------------------------------------
# Tied weights


def donor_ties_embeddings(ck) -> bool:
    """Whether the checkpoint's folder has a ``config.json`` saying ``tie_word_embeddings: true``
    (also in a nested ``text_config``)."""
    for f in list(ck.files)[:1] or ([ck.source] if isinstance(ck.source, str) else []):
        path = os.path.join(os.path.dirname(f) if not os.path.isdir(f) else f, "config.json")
        try:
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if not isinstance(cfg, dict):
            continue
        for c in (cfg, cfg.get("text_config")):
            if isinstance(c, dict) and c.get("tie_word_embeddings") is True:
                return True
    return False


def reconcile(ckpts: Sequence, prefer: Any = None) -> tuple[list, dict]:
    """The checkpoints with tied weights named alike (see the module docstring), ready for
    ``check_compatible``, and the pairs found as ``{alias: canonical}``.

    Each pair of tied names becomes one tensor under its *canonical* name: the one ``prefer`` (the
    layout the others must fit, e.g. a module's) uses, else the one a folder with a ``config.json``
    uses (as ``save_pretrained`` writes it), else the first checkpoint's. A checkpoint that has both
    names of a pair as tensors of their own keeps both. Every checkpoint returned carries the pairs
    in ``aliases``; those whose names change are new Checkpoint objects on the same data.
    """
    ckpts = list(ckpts)
    layouts = ckpts + ([prefer] if prefer is not None else [])
    # Known pairs: aliases declared by in-memory sources (shared storage, a module's declaration).
    pairs: list[set] = []

    def add(a: str, b: str) -> None:
        hit = [g for g in pairs if a in g or b in g]
        g = set().union({a, b}, *hit)
        for h in hit:
            pairs.remove(h)
        pairs.append(g)

    for ck in layouts:
        for alias, canon in ck.aliases.items():
            add(alias, canon)
    # On disk: a name some layouts lack while a partner of the same shape is there in exactly the
    # others, confirmed by a known pair or by tie_word_embeddings in a donor's config.
    names = [set(ck) for ck in layouts]
    union = set().union(*names) if names else set()
    partial = sorted(n for n in union if not all(n in s for s in names))
    if partial and not pairs and any(donor_ties_embeddings(ck) for ck in ckpts):
        for i, a in enumerate(partial):
            for b in partial[i + 1:]:
                if all((a in s) != (b in s) for s in names) and _same_spec(layouts, a, b):
                    add(a, b)
    if not pairs:
        return ckpts, {}
    ref = prefer if prefer is not None else next((ck for ck in ckpts if donor_ties_embeddings(ck)), ckpts[0])
    aliases: dict[str, str] = {}
    for g in pairs:
        canon = next((n for n in sorted(g) if n in ref), None) or sorted(g)[0]
        if isinstance(ref.aliases.get(canon), str):  # the layout itself calls it an alias
            canon = ref.aliases[canon]
        for n in g:
            if n != canon:
                aliases[n] = canon
    out = []
    for ck in ckpts:
        mapping = {}
        for g in pairs:
            have = [n for n in g if n in ck]
            if len(have) == 1 and have[0] in aliases:
                mapping[have[0]] = aliases[have[0]]
            elif len(have) > 1:  # the tied matrix stored twice: the canonical copy stands for both
                lacking = [n for n in have if n in aliases and not all(n in set(other) for other in layouts)]
                for n in lacking:
                    mapping[n] = None
        out.append(ck.with_names({n: mapping.get(n, n) for n in ck}, aliases=aliases))
    return out, aliases


class NameMap:
    """How the ingredients' names become the layout's: ``fn`` (a prefix stripped, a key map) maps each
    name on disk to the layout's name, then :func:`reconcile` names tied weights alike.

    :meth:`apply` marks what it returns (``Checkpoint.name_map``), so a checkpoint passed on (from a
    search to a Soup) is not renamed twice; :attr:`disk_names` remembers each layout name's name on
    disk, so a soup can be written with the names of its ingredients' files."""

    def __init__(self, fn: Callable[[str], str] | None = None, layout: Any = None):
        self.fn = fn
        self.layout = layout
        self.disk_names: dict[str, str] = {}
        self.aliases: dict[str, str] = {}

    @classmethod
    def build(cls, *, key_map: KeyMap | None = None, strip_prefix: str | None = None, model: Any = None,
              layout: Any = None) -> NameMap:
        """From the user's options; for a transformers ``model`` without ``key_map``, the map its own
        save/load conversion implies (:func:`transformers_key_map`)."""
        km = compile_key_map(key_map)
        if key_map is None and model is not None:
            auto = transformers_key_map(model)
            km = compile_key_map(auto) if auto else None
        return cls(chain(strip_prefix_map(strip_prefix), km), layout)

    def apply(self, ckpts: Sequence) -> list:
        ckpts = list(ckpts)
        fresh = [getattr(ck, "name_map", None) is None for ck in ckpts]
        out = []
        for ck, new in zip(ckpts, fresh):
            if not new:
                out.append(ck)
                continue
            r = rename(ck, self.fn)
            for old, name in zip(ck, r):
                if old != name:
                    self.disk_names.setdefault(name, old)
            out.append(r)
        out, aliases = reconcile(out, prefer=self.layout)
        self.aliases.update(aliases)
        for ck in out:
            if ck.name_map is None:
                ck.name_map = self
        return out


def _same_spec(ckpts, a: str, b: str) -> bool:
    specs = set()
    for ck in ckpts:
        for n in (a, b):
            if n in ck:
                specs.add(tuple(ck[n].shape))
    return len(specs) == 1


__all__ = ["FusedLayoutError", "KeyMap", "NameMap", "chain", "compile_key_map", "prefix_hint", "reconcile", "rename",
           "strip_prefix_map", "transformers_key_map", "tied_pairs_of_module"]
