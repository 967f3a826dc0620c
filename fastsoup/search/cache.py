"""Fingerprints, the on-disk logit cache and the step journal of a search.

A cache directory holds::

    manifest.json     the fingerprints of the model and of every data set evaluated with this cache
    logits/KEY.safetensors   float32 logits of one evaluated model (an ingredient or a soup) on one data set
    journal.jsonl     one JSON record per decision of every search run with this cache
    data/heldout.bin, data/heldout.json   the held-out set as the data pipeline gave it (its
                      batches' tensors, memory-mapped while a search runs on the CPU), so a rerun or
                      a resume can skip the pipeline (``heldout=None``)

A logit key is a hash of the model's fingerprint, the data set's fingerprint and the soup's recipe
(the fingerprints and weights of its ingredients, in the order they were summed).

Every file is written under a temporary name (:mod:`fastsoup.io._tempfiles`) and renamed into
place; opening a cache reaps the temporary files of processes that are gone.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .._errors import CheckpointError, FastsoupError
from ..io import _tempfiles
from ..io.checkpoint import Checkpoint

WHOLE_BYTES = 64 << 10  # tensors up to this size are hashed whole
SAMPLES = 8  # larger tensors: this many evenly spaced samples ...
SAMPLE_BYTES = 512  # ... of this many bytes
FULL_CHUNK = 8 << 20  # verify="full": bytes hashed at a time (then released from the mapping)

VERIFY = ("sample", "full")


class CacheMismatchError(FastsoupError, ValueError):
    """The model or a data set is not the one a cache directory was written for."""


def _hasher():
    return hashlib.blake2b(digest_size=16)


def check_verify(verify: str) -> str:
    """``verify`` if it is one of :data:`VERIFY`; else a ValueError naming them."""
    if verify not in VERIFY:
        raise ValueError(f"verify must be 'sample' (file identity and sampled content) or 'full' (every byte), "
                         f"got {verify!r}")
    return verify


def file_identity(ck: Checkpoint) -> list | None:
    """The identity of the files a checkpoint was read from, or None for an in-memory source: for
    each file its device, inode, size, modification and change times (``os.stat``). An edit in
    place changes the times (the change time even when a tool sets the modification time back);
    so do ``touch``, ``chmod`` and copies, which then only cost a recomputation.

    The one place the search asks what a file source is (so that a recorded open-time identity can
    replace the ``os.stat`` here)."""
    paths = list(ck.files)
    if not paths and isinstance(ck.source, str) and os.path.isfile(ck.source):
        paths = [ck.source]  # a torch .pt/.bin file: its tensors were loaded into memory
    if not paths:
        return None
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot stat the checkpoint file: {e.strerror or e}") from None
        out.append([os.path.basename(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def fingerprint_checkpoint(ck: Checkpoint, verify: str = "sample") -> str:
    """A fingerprint of a checkpoint, the name of its logits in a cache.

    ``verify="sample"`` (default): every tensor's name, dtype and shape, the bytes of small tensors
    (up to 64 KiB, e.g. biases and norms), 8 evenly spaced 512-byte samples of larger ones, and for
    a file source the files' identity (:func:`file_identity`: inode, size, times), so a file edited
    in place or replaced gets a new fingerprint. Reads about 4 KiB per tensor. An in-memory source
    (a state dict, a module) has no identity: changed in a few places of one large tensor, it can
    keep its fingerprint.

    ``verify="full"``: names, dtypes, shapes and every byte of every tensor (streamed from the
    mapped files, a chunk at a time; no identity, so touched or copied files keep it). Reads the
    whole checkpoint: for sources edited in place, or changed in memory between searches.
    """
    check_verify(verify)
    h = _hasher()
    h.update(f"{verify}\n".encode())
    if verify == "sample":
        h.update(json.dumps(file_identity(ck)).encode())
    refs = list(ck.values())
    digests = _full_digests(ck, refs) if verify == "full" else None
    for n, ref in enumerate(refs):
        h.update(json.dumps([ref.name, ref.dtype, list(ref.shape)]).encode())
        if ref.nbytes == 0:
            continue
        if digests is not None:
            h.update(digests[n])
            continue
        addr, _, keep = ck.buffer(ref)
        if ref.nbytes <= WHOLE_BYTES:
            h.update(ctypes.string_at(addr, ref.nbytes))
        else:
            span = ref.nbytes - SAMPLE_BYTES
            for i in range(SAMPLES):
                h.update(ctypes.string_at(addr + span * i // (SAMPLES - 1), SAMPLE_BYTES))
        del keep
    return h.hexdigest()


def _full_digests(ck: Checkpoint, refs: list) -> list[bytes]:
    """The hash of every byte of each tensor (threads over tensors: hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def digest(ref) -> bytes:
        h = _hasher()
        if ref.nbytes == 0:
            return h.digest()
        addr, where, keep = ck.buffer(ref)
        view = memoryview((ctypes.c_ubyte * ref.nbytes).from_address(addr)).cast("B")
        for off in range(0, ref.nbytes, FULL_CHUNK):
            n = min(FULL_CHUNK, ref.nbytes - off)
            h.update(view[off:off + n])
            if where == 1:  # a file mapping: drop the pages read, so resident memory stays bounded
                keep.advise(addr - keep.address + off, n, "dontneed")
        view.release()
        return h.digest()

    workers = max(1, min(4, os.cpu_count() or 1, len(refs)))
    if workers == 1:
        return [digest(r) for r in refs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(digest, refs))


def fingerprint_model(model: Any) -> str:
    """The architecture of a model: its class, its ``repr`` and its state dict's names, dtypes and shapes."""
    h = _hasher()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n{model!r}\n".encode())
    for name, t in model.state_dict().items():
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
    return h.hexdigest()


def key(*parts: Any) -> str:
    """A hash of JSON-serializable parts."""
    h = _hasher()
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()


def soup_key(model_fp: str, data_fp: str, members: Sequence[tuple[str, float]]) -> str:
    """The logit key of a soup: (ingredient fingerprint, weight) in the order summed. One member: an ingredient."""
    return key("soup", model_fp, data_fp, [[fp, float(w)] for fp, w in members])


class LogitCache:
    """Logits on disk, one safetensors file per (model, data set, soup).

    Opening it reaps the temporary files that killed processes left in it."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        os.makedirs(os.path.join(self.root, "logits"), exist_ok=True)
        self._manifest_path = os.path.join(self.root, "manifest.json")
        self.journal = Journal(os.path.join(self.root, "journal.jsonl"))
        for folder in (self.root, os.path.join(self.root, "logits"), os.path.join(self.root, "data")):
            _tempfiles.reap(folder)
        _tempfiles.reap_legacy_store(os.path.join(self.root, "data"), "heldout")

    def _path(self, k: str) -> str:
        return os.path.join(self.root, "logits", k + ".safetensors")

    def data_prefix(self, name: str) -> str:
        """Where the prepared data set ``name`` is stored (``PREFIX.bin`` and ``PREFIX.json``, see
        :class:`~fastsoup.search.heldout.Store`)."""
        return os.path.join(self.root, "data", name)

    def get(self, k: str):
        """The cached float32 logits under k, or None."""
        path = self._path(k)
        if not os.path.exists(path):
            return None
        from ..io.checkpoint import open_checkpoint

        try:
            ck = open_checkpoint(path)
            t = ck.tensor("logits")
        except Exception as e:  # a damaged entry is a miss, and is rewritten
            import warnings

            warnings.warn(f"ignoring the unreadable cache entry {path}: {e}", stacklevel=2)
            return None
        return t

    def put(self, k: str, logits) -> None:
        """Stores logits under k (written whole under a temporary name and renamed into place: a
        crash or an interrupt leaves no half-written entry)."""
        from ..io._safetensors import build_header

        t = logits.detach().float().cpu().contiguous()
        nbytes = t.numel() * 4
        header = build_header([("logits", "float32", tuple(t.shape), nbytes)], {"format": "pt"})
        with _tempfiles.replacing(self._path(k)) as f:
            f.write(header)
            if nbytes:
                f.write(t.reshape(-1).view(__import__("torch").uint8).numpy().data)

    def check(self, what: str, fingerprint: str, *, describe: str) -> None:
        """Records ``what`` (e.g. "model", "data:heldout") on first use; refuses a different fingerprint later."""
        manifest = self._read_manifest()
        entry = manifest.get(what)
        if entry is None:
            manifest[what] = {"fingerprint": fingerprint, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
            self._write_manifest(manifest)
            return
        if entry["fingerprint"] != fingerprint:
            raise CacheMismatchError(
                f"{describe} has changed since the cache {self.root} was written ({entry['written']}): "
                f"fingerprint {fingerprint}, the cache has {entry['fingerprint']}. Results cached for the old one "
                "would be wrong here: use a new cache_dir, or delete this one to start over"
            )

    def _read_manifest(self) -> dict:
        try:
            with open(self._manifest_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise FastsoupError(f"{self._manifest_path} is unreadable ({e}): delete the cache directory {self.root}") from None

    def _write_manifest(self, manifest: dict) -> None:
        with _tempfiles.replacing(self._manifest_path, text=True) as f:
            json.dump(manifest, f, indent=1)


class Journal:
    """An append-only JSONL log of decisions; a torn last line (a killed process) is ignored."""

    def __init__(self, path: str):
        self.path = path

    def records(self) -> Iterable[dict]:
        try:
            with open(self.path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line (a killed run): end it, so this record stands alone
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


__all__ = ["CacheMismatchError", "Journal", "LogitCache", "VERIFY", "check_verify", "file_identity",
           "fingerprint_checkpoint", "fingerprint_model", "key", "soup_key"]
