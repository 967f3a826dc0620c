"""``Soup``: a running float32 sum of weighted ingredients that can be loaded into a model.

The soup keeps ``S = sum_k w_k * theta_k`` in one flat float32 buffer and the weight total
``W = sum_k w_k``; its value is ``round(S / W)`` (the division in float64, one rounding to the
template's dtypes). Every operation is one call of the engine's
streaming executor (prefetch from the mapped files, fused kernel, release what was read):

- ``add``/``remove``: ``S += w * theta`` (one read of the ingredient);
- ``candidate``: ``T = S + w * theta`` into a scratch buffer (one read), then the model's parameters
  ``= round(T / (W + w))`` in place; ``accept`` keeps it by swapping ``S`` and ``T`` (no read);
- ``value``/``load_into``/``save``: ``round(S / W)`` into new tensors, a model's parameters, or files,
  all through the same kernel call, so a candidate and the soup saved after ``accept`` have the
  same bits.

So a greedy search over N checkpoints reads each of them once. The sum is kept on the CPU; a model on
a GPU receives its parameters through a host staging copy.
"""

from __future__ import annotations

import os
from typing import Any

from ._dtypes import BY_NAME, parse_float_dtype
from ._dtypes import info as dtype_info
from ._errors import ArgumentError, FastsoupError, InputChangedError
from .engine import Device, MergeSpec, Segments, collective, resolve_device, run, source
from .io import _sidefiles
from .io.checkpoint import Checkpoint, check_compatible, open_checkpoint
from .io.names import NameMap
from .mixing import write_model

_F32 = BY_NAME["float32"].code


class Soup:
    """A weighted sum of checkpoints kept in float32, with the weight total.

    Args:
        template: anything :func:`~fastsoup.open_checkpoint` takes (a path, state dict or
            ``nn.Module``): the tensor names, shapes and dtypes of the soup, and its file layout
            when saved. A module given here is the default target of :meth:`load_into` and
            :meth:`candidate`.
        device: where the sum lives and the kernels run: "cpu", or "cuda"/"cuda:N" (the CUDA engine:
            checkpoints stream through pinned memory to the GPU; a model on that GPU is written in
            place).
        threads: CPU threads of the kernels (default: all).
        key_map: renames the ingredients' tensors to the template's names (a callable, a dict or
            ``(regex, replacement)`` pairs; see :mod:`fastsoup.io.names`). For a transformers model
            as template it defaults to the map transformers itself applies between its files and
            its modules (ViT, DINOv2, Swin ... rename tensors on load), so ``save_pretrained``
            folders can be added as they are; the soup is saved under the files' names.
        strip_prefix: removes this prefix from ingredient names (``"module."``: DDP, open_clip).

    Tied weights (one tensor under two names) are recognised in the template and the ingredients
    alike (see :func:`fastsoup.average`).

    Example:
        >>> soup = fastsoup.Soup.like(model)  # doctest: +SKIP
        >>> for path in paths:  # doctest: +SKIP
        ...     soup.add(path)
        >>> soup.load_into(model)  # the uniform soup, written into model's parameters  # doctest: +SKIP
    """

    def __init__(self, template: Any, *, device: Any = "cpu", threads: int | None = None, key_map: Any = None,
                 strip_prefix: str | None = None, _names: NameMap | None = None):
        self._device = resolve_device(device)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
        self._threads = threads or 0
        self._model = template if _is_module(template) else None
        self._template = template if _sidefiles.is_path(template) else None  # the default donor of side files
        layout = open_checkpoint(template)
        names = _names if _names is not None else layout.name_map
        if names is None:
            names = NameMap.build(key_map=key_map, strip_prefix=strip_prefix, model=self._model)
        if self._model is None and layout.name_map is None:  # a file as template: its names mapped too
            layout = names.apply([layout])[0]
        if names.layout is None:
            names.layout = layout
        self._names = names
        self._layout = layout
        check_compatible([self._layout])
        self._floats: dict[str, tuple[int, int]] = {}  # name -> (element offset in the flat sum, numel)
        self._others: list[str] = []  # integer/bool tensors: copied from the first ingredient
        n = 0
        for name, ref in self._layout.items():
            if dtype_info(ref.dtype).kind == "float":
                self._floats[name] = (n, ref.numel)
                n += ref.numel
            else:
                self._others.append(name)
        self._numel = n
        self._sum = None  # flat float32 torch tensor, allocated on first use
        self._scratch = None
        self._extras: dict[str, Any] = {}
        self._pending: tuple[float, str] | None = None
        self._staging: dict[str, Any] = {}  # host buffers for model tensors on a GPU or not contiguous
        self.total_weight = 0.0
        self.ingredients: list[tuple[str, float]] = []  # (source, weight) in the order added
        self._members: list[Checkpoint] = []  # the opened ingredients, in the same order
        self._given: list[Any] = []  # the ingredients as given, in the same order (remove() matches them)
        self._broken: str | None = None  # why the sum can no longer be trusted (an input changed under a read)

    @classmethod
    def like(cls, template: Any, *, device: Any = "cpu", threads: int | None = None, key_map: Any = None,
             strip_prefix: str | None = None, _names: NameMap | None = None) -> Soup:
        """An empty soup with the tensors of ``template`` (a checkpoint source or an ``nn.Module``)."""
        return cls(template, device=device, threads=threads, key_map=key_map, strip_prefix=strip_prefix,
                   _names=_names)

    # ------------------------------------------------------------------------------------------
    # Changing the sum

    def add(self, ingredient: Any, weight: float = 1.0) -> Soup:
        """``S += weight * ingredient`` (one read of the ingredient); returns the soup."""
        w = _finite(weight)
        ck = self._open(ingredient)
        self._accumulate(ck, w, "adding it to the soup")
        if not self.ingredients:
            self._keep_extras(ck)
        self.total_weight += w
        self.ingredients.append((ck.source, w))
        self._members.append(ck)
        self._given.append(ingredient)
        self._pending = None
        return self

    def remove(self, ingredient: Any, weight: float = 1.0) -> Soup:
        """``S -= weight * ingredient``: takes out an ingredient added (or accepted) with that weight.

        The ingredient is recognised by identity, not by its label (every in-memory ingredient is
        ``<state dict>``): the same object (state dict, module, Checkpoint), the same tensors in
        memory, or the same file(s) (device and inode, and the same ``key``); a path to a file that
        fastsoup did not keep open (a torch file read whole) by its path. Added several times, the
        last one added goes first. Integer tensors come from the first ingredient left.

        Raises:
            ArgumentError: the ingredient is not in the soup, or not with that weight (to subtract
                something that was never added, ``add(ingredient, -weight)``); nothing is changed.
        """
        w = _finite(weight)
        ck = self._open(ingredient)
        same = [i for i in range(len(self._members)) if _same_ingredient(self._given[i], self._members[i], ingredient, ck)]
        with_weight = [i for i in same if self.ingredients[i][1] == w]
        if not with_weight:
            if same:
                weights = ", ".join(f"{self.ingredients[i][1]:g}" for i in same)
                raise ArgumentError(f"remove(): {ck.source} is in the soup with weight {weights}, not {w:g}: pass "
                                    "weight= as it was added")
            raise ArgumentError(f"remove(): {ck.source} is not in the soup (an ingredient is recognised by identity: "
                                f"the object, the tensors or the file it was added as); to subtract it, use "
                                f"add(ingredient, {-w:g})")
        i = with_weight[-1]
        self._accumulate(ck, -w, "taking it out of the soup")
        self.total_weight -= w
        del self.ingredients[i]
        del self._members[i]
        del self._given[i]
        if i == 0 and self._members:  # integer tensors come from the first ingredient
            self._keep_extras(self._members[0])
        self._pending = None
        return self

    def candidate(self, ingredient: Any, model: Any = None, *, weight: float = 1.0) -> None:
        """Loads ``(S + weight * ingredient) / (W + weight)`` into ``model`` without changing the soup.

        One read of the ingredient into a float32 scratch sum, and one write of the model's float
        parameters and buffers (integer buffers: the soup's first ingredient's). :meth:`accept` then
        adds the ingredient without reading it again.
        """
        w = _finite(weight)
        self._need_ingredients("form a candidate")
        total = self.total_weight + w
        if total == 0.0:
            raise ArgumentError("the candidate's weights sum to zero: cannot normalize")
        ck = self._open(ingredient)
        model = self._target(model)
        if self._scratch is None:
            from . import _torch

            self._scratch = _torch.empty((self._numel,), "float32", device=str(self._device))
        base, scratch = self._sum.data_ptr(), self._scratch.data_ptr()
        segs = Segments(2)
        keep = []
        for name, (off, numel) in self._floats.items():
            segs.weighted(numel, -1, scratch + 4 * off, _F32,
                          [(base + 4 * off, _F32, self._loc), source(ck, name, self._device, keep)])
        segs.run([1.0, w], threads=self._threads, device=self._device)
        del keep
        ck.verify("the candidate's read")  # before the model sees it: a changed input is never scored
        self._write(model, self._scratch, total, extras=True)
        self._pending = (w, ck, ingredient)

    def accept(self) -> Soup:
        """Keeps the last :meth:`candidate` in the soup (no read: its sum is already computed)."""
        if self._pending is None:
            raise FastsoupError("accept(): no candidate pending (call candidate() first; add/remove discard it)")
        w, ck, given = self._pending
        self._sum, self._scratch = self._scratch, self._sum
        self.total_weight += w
        self.ingredients.append((ck.source, w))
        self._members.append(ck)
        self._given.append(given)
        self._pending = None
        return self

    # ------------------------------------------------------------------------------------------
    # Reading the value

    def value(self, dtype: Any = None) -> dict:
        """The soup ``round(S / W)`` as a new state dict (dtypes of the template, or ``dtype``)."""
        self._need_ingredients("take its value")
        from . import _torch

        override = parse_float_dtype(dtype) if dtype is not None else None
        out, segs = {}, Segments(1)
        base = self._sum.data_ptr()
        for name, ref in self._layout.items():
            if name in self._floats:
                t = _torch.empty(ref.shape, override or ref.dtype, device=str(self._device))
                off, numel = self._floats[name]
                segs.weighted(numel, -1, t.data_ptr(), dtype_info(override or ref.dtype).code,
                              [(base + 4 * off, _F32, self._loc)])
            else:
                t = self._extras[name].clone()
            out[name] = t
        segs.run([1.0], threads=self._threads, device=self._device, divisor=self.total_weight)
        for alias, canon in self._layout.aliases.items():  # tied weights: both names, one tensor
            if canon in out and alias not in out:
                out[alias] = out[canon]
        return out

    def load_into(self, model: Any = None) -> Any:
        """Writes the soup into ``model``'s parameters and buffers in place (no state-dict copy).

        ``model`` defaults to the module given as the template. Returns the model.
        """
        self._need_ingredients("load it")
        model = self._target(model)
        self._write(model, self._sum, self.total_weight, extras=True)
        return model

    def save(
        self,
        out: str | os.PathLike,
        *,
        dtype: Any = None,
        shard_size: int | str | None = None,
        overwrite: bool = False,
        fsync: bool = False,
        progress: bool | None = None,
        config_from: Any = None,
        _extras: dict | None = None,
        _info: _sidefiles.SoupInfo | None = None,
    ) -> str:
        """Writes the soup with the rules of ``average(out=...)`` (layout of the template; a ``.pt``
        path: one torch file). A folder output gets the side files of ``config_from`` (default: the
        template's folder, else the first ingredient's; False: none) and a model card; the
        safetensors metadata records the ingredients (``Soup.ingredients``) and their weights.
        (``_extras``: files written into a folder output with it, e.g. a recipe's sidecar; ``_info``:
        a recipe's own record of the soup.)"""
        self._need_ingredients("save it")
        if _info is None:
            _info = _sidefiles.SoupInfo("soup", [src for src, _ in self.ingredients],
                                        [w / self.total_weight for _, w in self.ingredients])
        flat = {}
        for name, ref in self._layout.items():
            if name in self._floats:
                off, numel = self._floats[name]
                flat[name] = self._sum[off:off + numel].view(ref.shape)
            else:
                flat[name] = self._extras[name]
        src = open_checkpoint(flat)
        layout = self._layout
        disk = self._names.disk_names  # written under the names of the ingredients' files
        if disk:
            mapping = {n: disk.get(n, n) for n in layout}
            src, layout = src.with_names(mapping), layout.with_names(mapping)
        override = parse_float_dtype(dtype) if dtype is not None else None
        default = self._template if self._template is not None else self.ingredients[0][0]
        donor = _sidefiles.donor_for(out, config_from, default)  # read before any work
        aliases = {disk.get(a, a): disk.get(c, c) for a, c in self._layout.aliases.items()}
        # Collective under torch.distributed (a torch file: rank 0 alone).
        return collective(out, overwrite, "Soup.save", lambda: run(MergeSpec(
            [src], [1.0], out, dtype=override, divisor=(self.total_weight, 0.0), layout=layout, device=self._device,
            threads=self._threads, shard_size=shard_size, progress=progress, overwrite=overwrite, fsync=fsync,
            desc="save", extras=_extras, info=_info, donor=donor, aliases=aliases)))

    def __len__(self) -> int:
        return len(self.ingredients)

    def __repr__(self) -> str:
        return f"Soup({len(self.ingredients)} ingredients, weight {self.total_weight:g}, {self._numel} float32 values)"

    # ------------------------------------------------------------------------------------------

    def _open(self, ingredient: Any) -> Checkpoint:
        if self._broken is not None:
            raise FastsoupError(f"this soup is no longer usable: {self._broken}; build a new one")
        ck = self._names.apply([open_checkpoint(ingredient)])[0]
        check_compatible([self._layout, ck])
        if self._sum is None:
            from . import _torch

            self._sum = _torch.empty((self._numel,), "float32", device=str(self._device)).zero_()
        return ck

    @property
    def device(self) -> Device:
        return self._device

    @property
    def _loc(self) -> int:  # where the sums are, for the engine's segment lists
        return 2 if self._device.is_cuda else 0

    def _accumulate(self, ck: Checkpoint, w: float, during: str) -> None:
        base = self._sum.data_ptr()
        segs, keep = Segments(1), []
        for name, (off, numel) in self._floats.items():
            segs.weighted(numel, -1, base + 4 * off, _F32, [source(ck, name, self._device, keep)])
        try:
            segs.run([w], threads=self._threads, accumulate=True, device=self._device)
            ck.verify(during)
        except InputChangedError as e:  # the sum took in data that is not the file's: it cannot be undone
            self._broken = f"{ck.source} changed while it was summed ({e})"
            raise

    def _keep_extras(self, ck: Checkpoint) -> None:
        self._extras = {name: ck.tensor(name) for name in self._others}

    def _need_ingredients(self, what: str) -> None:
        if self._broken is not None:
            raise FastsoupError(f"this soup is no longer usable: {self._broken}; build a new one")
        if not self.ingredients:
            raise FastsoupError(f"the soup is empty: add an ingredient before you {what}")
        if self.total_weight == 0.0:
            raise FastsoupError(f"the soup's weights sum to zero: cannot {what}")

    def _target(self, model: Any) -> Any:
        model = model if model is not None else self._model
        if model is None:
            raise ArgumentError("no model: pass one (the soup was made from a checkpoint, not a module)")
        return model

    def _write(self, model: Any, flat, total: float, *, extras: bool) -> None:
        """model's float tensors = round(flat / total), as value() and save() compute them."""
        base = flat.data_ptr()
        sources = {name: [(base + 4 * off, _F32, self._loc)] for name, (off, _) in self._floats.items()}
        write_model(model, self._layout, sources, [1.0], self._staging, self._extras if extras else None,
                     self._threads, self._device, divisor=total)


def _same_ingredient(given: Any, ck: Checkpoint, other: Any, other_ck: Checkpoint) -> bool:
    """Whether ``other`` (opened as ``other_ck``) is the ingredient added as ``given`` (opened as ``ck``)."""
    if other is given:
        return True
    files, other_files = ck.identities(), other_ck.identities()
    if files or other_files:  # read from files kept open: the same inodes (under any path), the same entry
        return (ck.key == other_ck.key
                and {ident[:2] for ident in files.values()} == {ident[:2] for ident in other_files.values()})
    memory, other_memory = _tensors_of(ck), _tensors_of(other_ck)
    if memory is not None and memory == other_memory:  # in memory: the same tensors (a module's state dict anew)
        return True
    # a path whose tensors were read into memory (no file kept open): its label, for paths alone
    return (_sidefiles.is_path(given) and _sidefiles.is_path(other) and ck.source == other_ck.source
            and ck.key == other_ck.key)


def _tensors_of(ck: Checkpoint) -> frozenset | None:
    """(name, address, dtype, shape, strides) of every non-empty tensor of an in-memory checkpoint
    (empty tensors have no address of their own); None if a tensor is not in memory, or none holds data."""
    out = []
    for name, ref in ck.items():
        t = ref.tensor
        if t is None:
            return None
        if not ref.nbytes:
            continue
        if hasattr(t, "data_ptr"):
            addr, strides = t.data_ptr(), tuple(t.stride())
        else:  # a numpy array
            addr, strides = t.__array_interface__["data"][0], tuple(t.strides)
        out.append((name, addr, ref.dtype, tuple(ref.shape), strides))
    return frozenset(out) or None


def _is_module(x: Any) -> bool:
    return callable(getattr(x, "state_dict", None)) and callable(getattr(x, "parameters", None))


def _finite(w: Any) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ArgumentError(f"weight must be a number, got {w!r}") from None
    if w != w or w in (float("inf"), float("-inf")):
        raise ArgumentError(f"weight must be finite, got {w}")
    return w


__all__ = ["Soup"]
