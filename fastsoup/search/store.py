"""A prepared held-out set on disk (:class:`Store`), and back (:func:`load_heldout`): written batch by
batch as the pipeline yields them, read back as copy-on-write mappings, never whole in RAM."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .._errors import DataError
from ..io import _tempfiles
from ..io.files import FileWatch, map_file
from .batches import storable

STORE_FORMAT = "fastsoup-heldout-1"
_ALIGN = 64  # byte alignment of every tensor in a store's .bin


class Store:
    """A prepared data set on disk: ``PREFIX.bin`` holds the tensors' bytes (each 64-byte aligned,
    written as the batches come, so the set never has to be in memory at once) and ``PREFIX.json``
    the batches' structure, every tensor's dtype, shape and offset, the set's name and fingerprint.

    Written under temporary names of :mod:`fastsoup.io._tempfiles` (``.BASE.tmp-PID-TOKEN.bin`` and
    ``.json``, locked while this process has them), which a later Store of the same prefix reaps
    once their process is gone (a kill that no handler saw); :meth:`install` renames them into
    place (the .json last, so a complete .json always describes a complete .bin), :meth:`discard`
    removes them.
    """

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        folder = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(folder, exist_ok=True)
        _tempfiles.reap(folder, os.path.basename(self.prefix))
        self.tmp = _tempfiles.temp_path(self.prefix)  # the files are self.tmp + ".bin" / ".json"
        self._file = open(self.tmp + ".bin", "xb")
        self._locks = [_tempfiles.hold(self.tmp + ".bin")]
        self.tensors: list = []  # [dtype, shape, offset, nbytes]
        self.batches: list = []  # [x structure, y structure]; leaves index self.tensors
        self.offset = 0

    def add(self, x, y) -> bool:
        """Appends one batch; False (nothing appended) when it holds anything but tensors."""
        if not (storable(x) and storable(y)):
            return False
        self.batches.append([self._put(x), self._put(y)])
        return True

    def _put(self, x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            pad = -self.offset % _ALIGN
            if pad:
                self._file.write(b"\0" * pad)
                self.offset += pad
            nbytes = t.numel() * t.element_size()
            if nbytes:
                self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
            self.tensors.append([str(t.dtype).replace("torch.", ""), list(t.shape), self.offset, nbytes])
            self.offset += nbytes
            return len(self.tensors) - 1
        if isinstance(x, dict):
            return {"dict": [[k, self._put(v)] for k, v in x.items()]}
        return {type(x).__name__: [self._put(v) for v in x]}

    def finish(self, name: str, fingerprint: str) -> None:
        """Closes the .bin and writes the (temporary) .json."""
        self._file.close()
        with open(self.tmp + ".json", "x") as f:
            self._locks.append(_tempfiles.hold(self.tmp + ".json"))
            json.dump({"format": STORE_FORMAT, "name": name, "fingerprint": fingerprint, "bytes": self.offset,
                       "tensors": self.tensors, "batches": self.batches}, f)

    def mapped(self) -> list:
        """The batches written so far, as copy-on-write views of the .bin (no copy in RAM)."""
        if not self._file.closed:
            self._file.flush()
        return _batches_of(self.tmp + ".bin", self.tensors, self.batches, self.offset)

    def install(self) -> None:
        """Moves the files into place (replacing an earlier store of the same prefix: its .json goes
        first, so no moment pairs the old .json with the new .bin)."""
        try:
            os.remove(self.prefix + ".json")
        except FileNotFoundError:
            pass
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".json", self.prefix + ".json")
        self._release()

    def discard(self) -> None:
        """Removes the temporary files (again: nothing)."""
        if not self._file.closed:
            self._file.close()
        for ext in (".bin", ".json"):
            _tempfiles.remove(self.tmp + ext)
        self._release()

    def _release(self) -> None:
        locks, self._locks = self._locks, []
        for fd in locks:
            _tempfiles.release(fd)


def load_heldout(prefix: str) -> tuple[list, str]:
    """The batches a :class:`Store` at ``prefix`` holds (CPU tensors, copy-on-write views of its .bin)
    and the fingerprint it was stored with.

    Raises:
        FastsoupError: nothing is stored there, or the files are not (or no longer) a stored set.
    """
    path = prefix + ".json"
    if not os.path.exists(path):
        raise DataError(f"{path}: no stored held-out data (a search with this cache_dir stores it; give the data "
                            "set itself instead)")
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {STORE_FORMAT!r}")
        batches = _batches_of(prefix + ".bin", meta["tensors"], meta["batches"], int(meta["bytes"]))
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{prefix}.bin/.json: the stored held-out set is damaged ({e}): give the data set to "
                            "store it again") from None
    return batches, meta.get("fingerprint", "")


class _MappedBatches(list):
    """Batches whose tensors are views of one mapped file; ``watch`` checks that file after use."""

    watch: Any = None


def _batches_of(path: str, tensors: list, batches: list, size: int) -> list:
    # Copy-on-write (private pages: a model that writes into its inputs never writes the file), and
    # guarded: a read past the end of a file truncated meanwhile reads zeros, which watch.check() refuses.
    mapped = map_file(path, writable=True)
    have = mapped.size
    if have < size:
        raise ValueError(f"{path} has {have} bytes, the set needs {size}: truncated")
    mm = mapped if have else None

    def tensor(i):
        dtype, shape, offset, nbytes = tensors[i]
        dt = getattr(torch, dtype)
        if not isinstance(dt, torch.dtype) or offset + nbytes > have:
            raise ValueError(f"tensor {i}: dtype {dtype!r} or bytes [{offset}, {offset + nbytes}) out of range")
        if nbytes == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize, offset=offset).view(shape)

    def build(spec):
        if isinstance(spec, int):
            return tensor(spec)
        (kind, items), = spec.items()
        if kind == "dict":
            return {k: build(v) for k, v in items}
        values = [build(v) for v in items]
        return tuple(values) if kind == "tuple" else values

    out = _MappedBatches((build(sx), build(sy)) for sx, sy in batches)
    out.watch = FileWatch(path, mapped.fileno(), mapped, mapped)
    return out



__all__ = ["STORE_FORMAT", "Store", "load_heldout"]
