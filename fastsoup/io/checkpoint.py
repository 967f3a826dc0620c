"""Checkpoint readers: every source becomes an ordered mapping name -> :class:`TensorRef`.

File sources are mapped read-only by the native core (no copy, no torch); in-memory sources keep a
reference to their tensors (torch tensors or numpy arrays).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from .._dtypes import info as dtype_info
from .._errors import (
    ArgumentError,
    ArgumentTypeError,
    CheckpointError,
    InputChangedError,
    StateDictChoiceWarning,
)
from ._safetensors import parse_header
from .files import FileWatch, _OpenFile, _check_regular, _open_regular, map_file

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pth.tar")  # .pth.tar: timm's train.py
# The state dict of a training checkpoint when no key is given: the first of these entries that is one.
DEFAULT_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a checkpoint lives.

    Attributes:
        name: the tensor's key in the state dict.
        dtype: canonical dtype name ("float16", "bfloat16", "float32", "int64", ...).
        shape: the tensor's shape.
        nbytes: bytes of data.
        file: the file that holds the bytes (None for in-memory sources).
        offset: byte offset of the data in ``file`` (None for in-memory sources).
        tensor: the in-memory tensor or array (None for file sources).
    """

    name: str
    dtype: str
    shape: tuple
    nbytes: int
    file: str | None = None
    offset: int | None = None
    tensor: Any = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Checkpoint(Mapping):
    """An opened checkpoint: an ordered, read-only mapping ``name -> TensorRef``.

    The order is the file order (for sharded checkpoints: shard by shard), or the dict's order for
    in-memory sources. ``source`` names the checkpoint in every message. For a training checkpoint
    (a torch file holding the state dict among other entries, as ``{"state_dict": ..., "optimizer":
    ..., "epoch": ...}``), ``key`` is the entry the tensors come from and ``entries`` describes every
    top-level entry (name -> what it holds); both are None for a plain state dict.
    """

    def __init__(
        self,
        refs: dict[str, TensorRef],
        *,
        source: str,
        files: Sequence[str] = (),
        metadata: dict | None = None,
        maps: dict | None = None,
        watches: Sequence[FileWatch] = (),
        aliases: dict | None = None,
        key: str | None = None,
        entries: dict | None = None,
    ):
        self._refs = refs
        self.source = source
        self.files = list(files)
        self.metadata = metadata
        # A training checkpoint: the entry the state dict was taken from ("state_dict", or
        # "model/state_dict" when nested), and every top-level entry -> what it holds.
        self.key = key
        self.entries = entries
        self._maps = maps or {}
        # Files whose data is read lazily (mapped): their identity at open and their read faults.
        self._watches = list(watches) or [FileWatch(path, m.fileno(), m) for path, m in self._maps.items()]
        # Tied weights: {alias: canonical} for names that are one tensor (the alias is not in the
        # mapping; see fastsoup.io.names). name_map: the NameMap that named this view, if any.
        self.aliases: dict[str, str] = dict(aliases or {})
        self.name_map: Any = None

    def with_names(self, mapping: dict[str, str | None], *, aliases: dict | None = None) -> Checkpoint:
        """A view of the same data with tensor ``n`` named ``mapping[n]`` (None drops it), in the
        same order; ``aliases`` replaces the tied-weight pairs. See :mod:`fastsoup.io.names`."""
        refs = {}
        for name, ref in self._refs.items():
            new = mapping.get(name, name)
            if new is None:
                continue
            refs[new] = ref if new == name else dataclasses.replace(ref, name=new)
        ck = Checkpoint(refs, source=self.source, files=self.files, metadata=self.metadata, maps=self._maps,
                        watches=self._watches, aliases=self.aliases if aliases is None else aliases, key=self.key,
                        entries=self.entries)
        ck.name_map = self.name_map
        return ck

    def __getitem__(self, name: str) -> TensorRef:
        return self._refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self)} tensors, {self.nbytes / 1e9:.3f} GB)"

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._refs.values())

    @property
    def is_file(self) -> bool:
        """True when every tensor lives in a file that fastsoup mapped."""
        return bool(self._maps)

    def where(self, name: str) -> str:
        """``source: tensor 'name'`` (with the shard file when the source is a folder)."""
        ref = self._refs.get(name)
        if ref is not None and ref.file is not None and ref.file != self.source:
            return f"{self.source} ({os.path.basename(ref.file)}): tensor {name!r}"
        return f"{self.source}: tensor {name!r}"

    def release(self, name: str) -> None:
        """Drops tensor ``name``'s mapped file pages from this process's resident memory (they stay in
        the page cache; a later read maps them again). Passes that read whole tensors one at a time
        call it after each, so their resident memory stays one tensor's, whatever K and the model's
        size (the merge executor does the same within its steps). In-memory tensors: nothing."""
        ref = self._refs[name]
        if ref.file is not None and ref.nbytes:
            self._maps[ref.file].advise(ref.offset, ref.nbytes, "dontneed")

    def buffer(self, ref: TensorRef, device: Any = None) -> tuple[int, int, Any]:
        """(address of the data, where it is, object to keep alive). Where: 1 a native file
        mapping, 0 host memory, 2 the memory of ``device`` (an engine ``Device``; only when given).

        In-memory tensors on another device or not contiguous are copied to a contiguous CPU
        tensor here; keep the returned object alive while the address is used.
        """
        if ref.file is not None:
            m = self._maps[ref.file]
            return m.address + ref.offset, 1, m
        if device is not None and device.is_cuda:
            from .. import _torch

            if _torch.on_device(ref.tensor, device):
                return ref.tensor.data_ptr(), 2, ref.tensor
        addr, keep = host_buffer(ref.tensor)
        return addr, 0, keep

    def tensor(self, name: str):
        """A torch tensor holding a copy of one tensor (imports torch)."""
        from .. import _torch

        ref = self._refs[name]
        if ref.file is None:
            return _torch.as_tensor(ref.tensor).clone()
        t = _torch.tensor_from_address(self._maps[ref.file].address + ref.offset, ref.dtype, ref.shape)
        for w in self._watches:
            if w.path == ref.file:
                w.check(f"a read of tensor {name!r}")
        return t

    def verify(self, during: str = "the merge") -> None:
        """Checks that the files read lazily (mapped) are the ones opened: same inode, size,
        modification and change times, and no read of them faulted (a truncation under a read, or
        an I/O error). Call it after reading and before trusting what was read.

        Raises:
            InputChangedError: naming the file, e.g. "a.safetensors changed during the merge".
        """
        for w in self._watches:
            w.check(during)

    def identities(self) -> dict[str, tuple]:
        """``{file: (device, inode, size, mtime_ns, ctime_ns, links)}`` of the files as they were opened."""
        return {w.path: w.identity for w in self._watches}

    def close(self) -> None:
        """Drops this checkpoint's mappings (they are unmapped once nothing else uses them)."""
        self._maps = {}
        self._watches = []


class KeyedPath(os.PathLike):
    """A checkpoint file and the entry of it to take as the state dict: ``KeyedPath("last.pth.tar",
    "state_dict_ema")`` is the EMA weights of a timm training checkpoint.

    It is path-like (``os.fspath`` gives the path, so it names the ingredient in tables and
    messages) and carries the key wherever the ingredient goes: every function that takes
    ingredients (``Soup.add``, the ingredients a ``GreedyResult`` re-reads, ...) opens it with that
    key. ``key=`` of :func:`average`, :func:`greedy_soup` and the others wraps their path
    ingredients this way.

    Example:
        >>> soup = fastsoup.Soup.like(fastsoup.KeyedPath("run1/last.pth.tar", "state_dict_ema"))  # doctest: +SKIP
    """

    __slots__ = ("key", "path")

    def __init__(self, path: str | os.PathLike, key: str):
        _check_key(key)
        self.path = os.fspath(path)
        self.key = key

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"KeyedPath({self.path!r}, key={self.key!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, KeyedPath) and (self.path, self.key) == (other.path, other.key)

    def __hash__(self) -> int:
        return hash((self.path, self.key))


def with_key(ingredients: Sequence[Any], key: str | None) -> list:
    """The ingredients with ``key`` applied: paths become :class:`KeyedPath`, state dicts (mappings)
    are opened with it; other ingredients (Checkpoints, modules, KeyedPaths) are taken as they are.
    ``key=None``: the ingredients unchanged."""
    if key is None:
        return list(ingredients)
    _check_key(key)
    out = []
    for src in ingredients:
        if isinstance(src, (str, os.PathLike)) and not isinstance(src, KeyedPath):
            out.append(KeyedPath(src, key))
        elif isinstance(src, Mapping) and not isinstance(src, Checkpoint):
            out.append(_from_state_dict(src, "<state dict>", key))
        else:
            out.append(src)
    return out


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ArgumentTypeError(f"key must be a non-empty string (an entry of the training checkpoint), got {key!r}")


Source = Union[str, os.PathLike, Checkpoint, Mapping, Any]


def open_checkpoint(src: Source, *, key: str | None = None) -> Checkpoint:
    """Opens a checkpoint from any source fastsoup reads.

    Args:
        src: a ``.safetensors`` file; a sharded folder or its ``*.safetensors.index.json``; a torch
            ``.pt``/``.bin``/``.pth``/``.ckpt``/``.pth.tar`` file (or a folder with one, or with
            ``pytorch_model.bin.index.json``), also a training checkpoint that holds the state dict
            among other entries (timm's and open_clip's training scripts, ``{"state_dict": ...,
            "optimizer": ..., "epoch": ...}``); a state dict (``dict[str, Tensor]``, torch tensors or
            numpy arrays, or wrapped in the same way); an ``nn.Module``; a :class:`KeyedPath`; or a
            Checkpoint (returned as it is).
        key: the entry of a training checkpoint to take as the state dict, e.g. ``"state_dict_ema"``
            (``"model/ema"`` for a nested one, when no entry is named so). Default: ``"state_dict"``, else ``"model"``; when the checkpoint holds other state dicts
            too, a :class:`~fastsoup.StateDictChoiceWarning` says which was taken. An optimizer
            state is never taken.

    Torch files are read with ``torch.load(weights_only=True)``: tensors and plain containers only
    (the standard ones, and ``argparse.Namespace``, which timm's ``train.py`` saves its arguments
    as); a file that needs any other type is refused, naming it; fastsoup never runs code from a
    checkpoint.

    Returns:
        The :class:`Checkpoint`.

    Raises:
        CheckpointError: the source is missing, malformed or of an unknown kind, or ``key`` is not
            one of its state dicts (the message names it).

    Example:
        >>> ckpt = fastsoup.open_checkpoint("runs/lr3e-5/model.safetensors")  # doctest: +SKIP
        >>> ckpt["head.weight"].shape  # doctest: +SKIP
        >>> ema = fastsoup.open_checkpoint("output/train/run1/last.pth.tar", key="state_dict_ema")  # doctest: +SKIP
    """
    if key is not None:
        _check_key(key)
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, KeyedPath):
        if key is not None and key != src.key:
            raise ArgumentError(f"{src!r}: already has key {src.key!r}; key={key!r} given too")
        return _open_path(src.path, src.key)
    if isinstance(src, (str, os.PathLike)):
        return _open_path(os.fspath(src), key)
    if isinstance(src, Mapping):
        return _from_state_dict(src, "<state dict>", key)
    if key is not None:
        raise CheckpointError(f"key={key!r} picks a state dict in a training checkpoint (a torch file or a dict); "
                              f"a {type(src).__name__} has one state dict")
    state_dict = getattr(src, "state_dict", None)
    if callable(state_dict):  # an nn.Module (or anything with a state dict)
        from .names import tied_pairs_of_module

        return _from_state_dict(state_dict(), f"<{type(src).__name__} state dict>", declared=tied_pairs_of_module(src))
    raise CheckpointError(
        f"cannot open a checkpoint from {type(src).__name__}: give a path, a state dict, an nn.Module or a Checkpoint"
    )


# ---------------------------------------------------------------------------------------------------
# Files


def _open_path(path: str, key: str | None = None) -> Checkpoint:
    if os.path.isdir(path):
        return _open_folder(path, key)
    _check_regular(path)
    if path.endswith(".index.json"):
        return _no_key(_open_index(path), key)
    if path.endswith(".safetensors"):
        return _no_key(_open_safetensors(path), key)
    if path.endswith(TORCH_SUFFIXES):
        return _open_torch_file(path, key)
    fd = _open_regular(path)
    try:
        head = os.pread(fd, 9, 0)
    finally:
        os.close(fd)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return _open_torch_file(path, key)
    if len(head) == 9 and head[8:9] == b"{":
        return _no_key(_open_safetensors(path), key)
    raise CheckpointError(f"{path}: not a safetensors file, a safetensors index or a torch checkpoint")


def _no_key(ck: Checkpoint, key: str | None) -> Checkpoint:
    """Refuses ``key`` for a source that holds one plain state dict (safetensors, a sharded index)."""
    if key is not None:
        ck.close()
        raise CheckpointError(
            f"{ck.source}: key={key!r} picks one state dict of a training checkpoint (a torch file holding several "
            "entries), but this is a plain state dict: it has no entries to pick from"
        )
    return ck


def _open_folder(path: str, key: str | None = None) -> Checkpoint:
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        indexes = [n for n in indexes if n == "model.safetensors.index.json"] or indexes
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several safetensors index files ({', '.join(indexes)}); pass the one to use")
    if indexes:
        return _no_key(_open_index(os.path.join(path, indexes[0])), key)
    files = [n for n in names if n.endswith(".safetensors")]
    if len(files) == 1:
        return _no_key(_open_safetensors(os.path.join(path, files[0])), key)
    if len(files) > 1:
        raise CheckpointError(
            f"{path}: {len(files)} .safetensors files but no *.safetensors.index.json to say how they form one "
            "checkpoint; pass the files one by one if they are separate checkpoints"
        )
    torch_indexes = [n for n in names if n.endswith(".bin.index.json")]
    if len(torch_indexes) == 1:
        return _no_key(_open_index(os.path.join(path, torch_indexes[0])), key)
    torch_files = [n for n in names if n.endswith(TORCH_SUFFIXES) and not os.path.isdir(os.path.join(path, n))]
    if len(torch_files) == 1:
        return _open_torch_file(os.path.join(path, torch_files[0]), key)
    if torch_files:
        # E.g. the output folder of timm's train.py: last.pth.tar, model_best.pth.tar, checkpoint-N.pth.tar.
        pick = next((n for n in ("model_best.pth.tar", "last.pth.tar") if n in torch_files), torch_files[-1])
        raise CheckpointError(
            f"{path}: {len(torch_files)} torch checkpoint files ({_some(torch_files)}) and no index "
            "(pytorch_model.bin.index.json) to say how they form one checkpoint: pass the file to use, e.g. "
            f"{os.path.join(path, pick)}"
        )
    raise CheckpointError(
        f"{path}: no checkpoint in this folder (no .safetensors file, safetensors or .bin index, or torch file "
        f"{'/'.join(TORCH_SUFFIXES)})"
    )



def _read_safetensors(path: str):
    mapped = map_file(path)
    faults = mapped.faults
    entries, metadata = parse_header(path, memoryview(mapped))
    if mapped.faults != faults:  # truncated under the header's read: what was parsed is not the file
        raise InputChangedError(f"{path} changed while its header was read (it was truncated); try again once it is complete")
    return mapped, entries, metadata


def _open_safetensors(path: str) -> Checkpoint:
    mapped, entries, metadata = _read_safetensors(path)
    refs = {e.name: TensorRef(e.name, e.dtype, e.shape, e.nbytes, path, e.offset) for e in entries}
    return Checkpoint(refs, source=path, files=[path], metadata=metadata, maps={path: mapped})


def _open_index(index_path: str) -> Checkpoint:
    folder = os.path.dirname(index_path) or "."
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: cannot read the index: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: not a sharded-checkpoint index (no \"weight_map\" of tensor name -> shard file)")
    by_shard: dict[str, set] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    shards = sorted(by_shard)
    for shard in shards:
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a file name in the index's folder")
        shard_path = os.path.join(folder, shard)
        if not os.path.lexists(shard_path):
            raise CheckpointError(f"{index_path}: lists shard {shard!r}, which does not exist in {folder}")
        _check_regular(shard_path)

    source = folder if os.path.basename(index_path).startswith(("model.", "pytorch_model.")) else index_path
    refs: dict[str, TensorRef] = {}
    seen_in: dict[str, str] = {}
    maps = {}
    watches = []
    metadata = None
    files = []
    for shard in shards:
        path = os.path.join(folder, shard)
        files.append(path)
        if shard.endswith(".safetensors"):
            mapped, entries, meta = _read_safetensors(path)
            maps[path] = mapped
            watches.append(FileWatch(path, mapped.fileno(), mapped))
            metadata = metadata if metadata is not None else meta
            shard_refs = [TensorRef(e.name, e.dtype, e.shape, e.nbytes, path, e.offset) for e in entries]
        else:
            sd, watch = _load_torch_state_dict(path)
            if watch is not None:
                watches.append(watch)
            shard_refs = list(memory_refs(_unwrap(sd, path)[0], path).values())
        names = set()
        for ref in shard_refs:
            if ref.name in seen_in:
                raise CheckpointError(f"{index_path}: tensor {ref.name!r} is in both {seen_in[ref.name]!r} and {shard!r}")
            seen_in[ref.name] = shard
            names.add(ref.name)
            refs[ref.name] = ref
        extra = sorted(names - by_shard[shard])
        if extra:
            raise CheckpointError(
                f"{path}: shard has tensors the index {os.path.basename(index_path)} does not list: {_some(extra)}"
            )
        missing = sorted(by_shard[shard] - names)
        if missing:
            raise CheckpointError(f"{index_path}: maps {_some(missing)} to shard {shard!r}, which does not contain them")
    return Checkpoint(refs, source=source, files=files, metadata=metadata, maps=maps, watches=watches)


# ---------------------------------------------------------------------------------------------------
# torch files and in-memory state dicts


def _load_torch_state_dict(path: str) -> tuple[Mapping, FileWatch | None]:
    """The state dict of a torch file, and the watch of its mapping (None when torch read the
    file whole into memory: nothing is read from the file later)."""
    from .. import _torch

    opened = _OpenFile(path)  # the identity of the file torch is about to map
    try:
        obj, mapped = _torch.load_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot load as a torch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not mapped:
        return obj, None
    try:
        st = os.stat(path)
    except OSError:
        st = None
    watch = FileWatch(path, opened.fd, None, opened)
    if st is None or (st.st_dev, st.st_ino) != watch.identity[:2]:
        raise InputChangedError(f"{path} was replaced while it was being opened; try again once it is complete")
    guard = _torch.guard_mapped_storages(obj, path)
    if guard is not None:
        watch._faults_of = guard
        watch._owner = (opened, guard)
    return obj, watch


def _open_torch_file(path: str, key: str | None = None) -> Checkpoint:
    obj, watch = _load_torch_state_dict(path)
    sd, taken, entries = _unwrap(obj, path, key)
    refs, aliases = tied(memory_refs(sd, path))
    return Checkpoint(refs, source=path, watches=[watch] if watch is not None else [], key=taken,
                      entries=entries, aliases=aliases)


def _from_state_dict(sd: Mapping, source: str, key: str | None = None,
                     declared: Mapping[str, str] | None = None) -> Checkpoint:
    sd, taken, entries = _unwrap(sd, source, key)
    refs, aliases = tied(memory_refs(sd, source), declared)
    return Checkpoint(refs, source=source, key=taken, entries=entries, aliases=aliases)


def tied(refs: dict[str, TensorRef], declared: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """Tied weights of an in-memory state dict: names whose tensors are one (same storage, offset,
    shape, strides and dtype, as ``model.state_dict()`` and ``torch.load`` give tied parameters).
    Each group keeps one name (the one ``declared`` as kept, ``{dropped: kept}`` as transformers
    declares its tied weights, else the first) and the others become ``{alias: kept}``."""
    groups: dict[tuple, list[str]] = {}
    for name, ref in refs.items():
        t = ref.tensor
        if type(t).__module__.startswith("torch") and hasattr(t, "untyped_storage") and ref.nbytes:
            try:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrappers)
                continue
            groups.setdefault(key, []).append(name)
    aliases = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = names[0]
        for n in names:
            if declared and n in declared.values() and any(declared.get(m) == n for m in names):
                keep = n
                break
        for n in names:
            if n != keep:
                aliases[n] = keep
    if not aliases:
        return refs, {}
    return {n: r for n, r in refs.items() if n not in aliases}, aliases


def _is_array(x: Any) -> bool:
    mod = type(x).__module__
    return (mod.startswith("torch") and hasattr(x, "data_ptr")) or (mod == "numpy" and hasattr(x, "__array_interface__"))


def _is_state_dict(x: Any) -> bool:
    """A non-empty mapping of string names to tensors."""
    return (isinstance(x, Mapping) and len(x) > 0 and all(isinstance(k, str) for k in x)
            and all(_is_array(v) for v in x.values()))


def _is_optimizer_state(x: Any) -> bool:
    """``optimizer.state_dict()``: ``{"state": {index: {...}}, "param_groups": [...]}``."""
    return isinstance(x, Mapping) and "param_groups" in x and "state" in x


def _describe(v: Any) -> str:
    """What an entry of a training checkpoint holds, in a few words (for ``fastsoup inspect``)."""
    if _is_state_dict(v):
        return f"state dict ({len(v)} tensors)"
    if _is_optimizer_state(v):
        return "optimizer state"
    if _is_array(v):
        return f"tensor {list(v.shape)}"
    if isinstance(v, Mapping):
        return f"dict ({len(v)} entries)"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} ({len(v)} items)"
    if v is None or isinstance(v, (bool, int, float)):
        return repr(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 60 else repr(v[:57]) + "..."
    return type(v).__name__


def _unwrap(sd: Mapping, source: str, key: str | None = None) -> tuple[Mapping, str | None, dict | None]:
    """The state dict of a plain state dict or of a training checkpoint (``{"state_dict": ...,
    "optimizer": ..., "epoch": ...}`` as training loops save them): ``(state dict, the entry taken or
    None, {entry: description} or None)``.

    ``key`` names the entry to take; without it, the first of :data:`DEFAULT_KEYS`, with a
    :class:`~fastsoup.StateDictChoiceWarning` when other state dicts sit beside it (timm's
    ``state_dict_ema``). An optimizer state is never taken."""
    if all(_is_array(v) for v in sd.values()):
        if key is not None:
            raise CheckpointError(
                f"{source}: key={key!r} picks one state dict of a training checkpoint, but this is a plain state dict "
                f"({len(sd)} tensors): it has no entries to pick from"
            )
        return sd, None, None
    entries = {str(k): _describe(v) for k, v in sd.items()}
    path: list[str] = []
    if key is not None:
        # An entry of the checkpoint, or a path to a nested one: "model/ema" is sd["model"]["ema"].
        parts = [key] if key in sd or "/" not in key else key.split("/")
        for part in parts:
            where = "/".join(path + [part])
            if not isinstance(sd, Mapping) or part not in sd:
                raise CheckpointError(f"{source}: no entry {where!r} to take as the state dict; {_holdings(sd)}")
            inner = sd[part]
            if _is_optimizer_state(inner):
                raise CheckpointError(
                    f"{source}: entry {where!r} is an optimizer state (its moments and step counts), not model "
                    f"weights; {_holdings(sd)}"
                )
            if not isinstance(inner, Mapping):
                raise CheckpointError(
                    f"{source}: entry {where!r} is not a state dict (it holds {_describe(inner)}); {_holdings(sd)}")
            sd = inner
            path.append(part)
    while not all(_is_array(v) for v in sd.values()):
        names = [k for k, v in sd.items() if _is_state_dict(v)]
        pick = next((k for k in DEFAULT_KEYS if isinstance(sd.get(k), Mapping) and not _is_optimizer_state(sd[k])), None)
        if pick is None:
            if names:
                raise CheckpointError(
                    f"{source}: a training checkpoint without a {' or '.join(map(repr, DEFAULT_KEYS))} entry; "
                    f"{_holdings(sd)}: pass key= (CLI: --key) to say which to take"
                )
            bad = next(k for k, v in sd.items() if not _is_array(v))
            raise CheckpointError(
                f"{source}: entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor (expected a state dict, or a "
                "training checkpoint holding one as {'state_dict': ...} or {'model': ...}; key= picks another entry)"
            )
        others = tuple("/".join(path + [n]) for n in names if n != pick)
        if others:
            what = f"{others[0]!r}" if len(others) == 1 else ", ".join(map(repr, others))
            taken = "/".join(path + [pick])
            warnings.warn(StateDictChoiceWarning(
                f"a training checkpoint holds several state dicts: took {taken!r}; it also holds {what} (pass "
                f"key={others[0]!r} to take {'that one' if len(others) == 1 else 'another'})",
                source=source, taken=taken, others=others,
            ), stacklevel=2)
        sd = sd[pick]
        path.append(pick)
    return sd, "/".join(path), entries


def _holdings(sd: Mapping) -> str:
    """``"its state dicts: 'state_dict', 'state_dict_ema'; other entries: 'epoch', ..."`` of a training checkpoint."""
    names = [k for k, v in sd.items() if _is_state_dict(v)]
    rest = [str(k) for k in sd if k not in names]
    parts = [f"its state dicts: {_some(names)}" if names else "it holds no state dict (a mapping of names to tensors)"]
    if rest:
        parts.append(f"other entries: {_some(rest)}")
    return "; ".join(parts)


def memory_refs(sd: Mapping, source: str) -> dict[str, TensorRef]:
    """The refs of a plain state dict (name -> tensor)."""
    refs = {}
    for name, t in sd.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{source}: key {name!r} is not a string")
        if not _is_array(t):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(t).__name__}, not a tensor")
        dtype, shape, nbytes = array_meta(t, source, name)
        refs[name] = TensorRef(name, dtype, shape, nbytes, tensor=t)
    return refs


def array_meta(t: Any, source: str = "<state dict>", name: str = "?") -> tuple[str, tuple, int]:
    if type(t).__module__ == "numpy":
        return t.dtype.name, tuple(t.shape), int(t.nbytes)
    layout = str(getattr(t, "layout", "torch.strided"))
    if layout != "torch.strided":
        raise CheckpointError(
            f"{source}: tensor {name!r} is a {layout.replace('torch.', '')} tensor; only dense tensors are averaged "
            "(save it dense: t.to_dense())"
        )
    if getattr(t, "is_meta", False):
        raise CheckpointError(f"{source}: tensor {name!r} is on the meta device: it holds no data")
    dtype = str(t.dtype)
    dtype = dtype.removeprefix("torch.")
    return dtype, tuple(t.shape), t.numel() * t.element_size()


def host_buffer(t: Any) -> tuple[int, Any]:
    """(address, keep-alive) of a contiguous CPU copy or view of an in-memory tensor."""
    if type(t).__module__ == "numpy":
        import numpy as np

        a = np.ascontiguousarray(t)
        if not a.dtype.isnative:  # stored little-endian, as safetensors and the kernels read it
            a = a.astype(a.dtype.newbyteorder("="))
        return a.__array_interface__["data"][0], a
    from .. import _torch

    h = _torch.host_contiguous(t)
    return h.data_ptr(), h


def _some(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_compatible(ingredients: Sequence[Source], *, key: str | None = None) -> None:
    """Checks that checkpoints can be averaged, before any work is done.

    Same key set (the missing and extra names of each checkpoint are listed, at most 10 each), same
    shapes, and the same kind of tensor (float, or integer/bool which is copied from the first);
    float types that cannot be averaged (fp8, complex) are refused.

    Args:
        ingredients: what :func:`average` takes: paths, state dicts, modules or opened Checkpoints
            (a path is opened for the check and closed after it).
        key: the state dict to take from training checkpoints (as in :func:`open_checkpoint`).

    Raises:
        CheckpointError: listing every problem found, each naming the file and the tensor.

    Example:
        >>> fastsoup.check_compatible(["a.safetensors", "b.safetensors"])  # doctest: +SKIP
    """
    ingredients = list(ingredients)
    if not ingredients:
        raise CheckpointError("no ingredients: give at least one checkpoint")
    opened = []
    try:
        for src in with_key(ingredients, key):
            opened.append(open_checkpoint(src))
        _check_compatible(opened)
    finally:
        for src, ck in zip(ingredients, opened):
            if ck is not src:
                ck.close()


def _check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """:func:`check_compatible` of opened checkpoints."""
    if not checkpoints:
        raise CheckpointError("no ingredients: give at least one checkpoint")
    first = checkpoints[0]
    problems: list[str] = []
    for ck in checkpoints:
        for name, ref in ck.items():
            info = dtype_info(ref.dtype)
            if info.kind == "unsupported":
                label = f"{info.st} ({ref.dtype})" if info.st != "?" else ref.dtype  # the safetensors name first
                problems.append(
                    f"{ck.where(name)}: unsupported dtype {label} (float16, bfloat16, float32 and float64 are "
                    "averaged; integer and bool tensors are copied from the first ingredient)"
                )
    for ck in checkpoints[1:]:
        missing = [n for n in first if n not in ck]
        extra = [n for n in ck if n not in first]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {_some(missing)}")
            if extra:
                parts.append(f"extra {len(extra)}: {_some(extra)}")
            from .names import prefix_hint

            hint = prefix_hint(missing, extra)
            if hint is None and missing and extra:
                hint = ("if the same tensors are named otherwise (e.g. a module's names and its files'), pass "
                        "key_map= (CLI: --rename REGEX=REPLACEMENT)")
            problems.append(f"{ck.source}: tensor names differ from {first.source}: " + "; ".join(parts)
                            + (f" ({hint})" if hint else ""))
        shown = 0
        for name, ref in ck.items():
            ref0 = first._refs.get(name)
            if ref0 is None or shown >= 10:
                continue
            if ref.shape != ref0.shape:
                problems.append(f"{ck.where(name)}: shape {list(ref.shape)}, but {list(ref0.shape)} in {first.source}")
                shown += 1
                continue
            k0, k1 = dtype_info(ref0.dtype).kind, dtype_info(ref.dtype).kind
            if "unsupported" not in (k0, k1) and k0 != k1:
                problems.append(f"{ck.where(name)}: dtype {ref.dtype}, but {ref0.dtype} in {first.source} (float vs non-float)")
                shown += 1
    if problems:
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise CheckpointError(
            f"the {len(checkpoints)} checkpoints cannot be averaged:\n  " + "\n  ".join(problems[:30]) + more
        )
