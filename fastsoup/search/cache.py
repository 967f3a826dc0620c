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

A cache is a hint (DESIGN §5): every record and file carries a checksum, and a damaged or stale one
is recomputed, never trusted. A logits file carries, in its ``__metadata__``, a hash of its key,
shape and bytes, checked on every read; a journal record a hash of its fields; a manifest entry a
hash of its fingerprint. A damaged entry or record (torn, edited, overwritten, not UTF-8, not JSON,
a field missing or of the wrong type) is ignored with one warning per cache and run, and the
search computes it again (and rewrites it); the stored held-out set is checked against its
fingerprint when it is read back, and refused if it differs. Every file is written under a
temporary name (:mod:`fastsoup.io._tempfiles`) and renamed into place; opening a cache reaps the
temporary files of processes that are gone.

A cache written before these checksums (no ``"format"`` in its manifest) is not trusted: its keys
are of another format, so its logits and decisions are never found; everything is recomputed once
(with one warning) and written beside the old files, its journal is set aside as
``journal-unchecked.jsonl`` (delete the directory to reclaim the space); its stored held-out set is
still checked against its fingerprint as any other.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

from .._errors import ArgumentError, CacheMismatchError, CheckpointError
from ..io import _tempfiles
from ..io.checkpoint import Checkpoint

WHOLE_BYTES = 64 << 10  # tensors up to this size are hashed whole
SAMPLES = 8  # larger tensors: this many evenly spaced samples ...
SAMPLE_BYTES = 512  # ... of this many bytes
FULL_CHUNK = 8 << 20  # verify="full": bytes hashed at a time (then released from the mapping)

VERIFY = ("sample", "full")
CACHE_FORMAT = "fastsoup-cache-2"  # manifest "format": checksummed entries, identity-keyed fingerprints
LOGITS_FORMAT = "fastsoup-logits-2"  # a logits file's __metadata__ "fastsoup"


def _hasher():
    return hashlib.blake2b(digest_size=16)


def check_verify(verify: str) -> str:
    """``verify`` if it is one of :data:`VERIFY`; else an ArgumentError naming them."""
    if verify not in VERIFY:
        raise ArgumentError(f"verify must be 'sample' (file identity and sampled content) or 'full' (every byte), "
                         f"got {verify!r}")
    return verify


def file_identity(ck: Checkpoint) -> list | None:
    """The identity of the files a checkpoint was read from, or None for an in-memory source: for
    each file its device, inode, size, modification and change times (``os.stat``). An edit in
    place changes the times (the change time even when a tool sets the modification time back);
    so do ``touch``, ``chmod`` and copies, which then only cost a recomputation.

    The one place the search asks what a file source is: the identity each file had when it was
    opened (``Checkpoint.identities``, from ``fstat`` of the descriptor the data is read through),
    or ``os.stat`` for a file read whole at open (a legacy torch file)."""
    recorded = ck.identities()
    paths = list(ck.files) or list(recorded)
    if not paths and isinstance(ck.source, str) and os.path.isfile(ck.source):
        paths = [ck.source]  # a legacy torch file: its tensors were loaded into memory
    if not paths:
        return None
    out = []
    for path in paths:
        if path in recorded:
            dev, ino, size, mtime, ctime = recorded[path][:5]
        else:
            try:
                st = os.stat(path)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot stat the checkpoint file: {e.strerror or e}") from None
            dev, ino, size, mtime, ctime = st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
        out.append([os.path.basename(path), dev, ino, size, mtime, ctime])
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
    ck.verify("fingerprinting")  # a file truncated or rewritten under the read gets no fingerprint
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


def record_checksum(record: dict) -> str:
    """The checksum of a JSON record: a hash of its fields but ``"checksum"``, in a canonical form
    (keys sorted), so a record read back from its JSON text gives the same value."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    h = _hasher()
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def checked(record: Any) -> str | None:
    """None when ``record`` is a dict whose ``"checksum"`` matches its fields; else what is wrong."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    c = record.get("checksum")
    if c is None:
        return "no checksum (written by an earlier fastsoup)"
    try:
        ok = c == record_checksum(record)
    except (TypeError, ValueError):
        ok = False
    return None if ok else "checksum mismatch (edited or damaged)"


def seal(record: dict) -> dict:
    """``record`` with its ``"checksum"`` (see :func:`record_checksum`)."""
    out = {k: v for k, v in record.items() if k != "checksum"}
    out["checksum"] = record_checksum(out)
    return out


def _bytes_of(t):
    """The bytes of a contiguous CPU tensor, without a copy."""
    import torch

    return t.reshape(-1).view(torch.uint8).numpy().data


def _logits_checksum(k: str, t) -> str:
    """A hash of a logits entry: its key, shape and bytes (float32)."""
    h = _hasher()
    h.update(json.dumps([LOGITS_FORMAT, k, "float32", list(t.shape)]).encode())
    if t.numel():
        h.update(_bytes_of(t))
    return h.hexdigest()


class Cache(Protocol):
    """What a search asks of its cache (:class:`LogitCache`; under torch.distributed
    :class:`~fastsoup.distributed.cache.Rank0Cache`, which asks rank 0's).

    ``root`` is the cache folder; ``journal`` the decision log (``records()``, ``append(record)``)."""

    root: str
    journal: Any

    def get(self, k: str) -> Any:
        """The logits stored under key ``k``, or None (a miss: absent, or damaged)."""

    def put(self, k: str, logits: Any) -> None:
        """Stores ``logits`` under ``k``."""

    def check(self, what: str, fingerprint: str, *, describe: str) -> None:
        """Records ``what``'s fingerprint on first use; raises :class:`CacheMismatchError` when it differs."""

    def data_prefix(self, name: str) -> str:
        """Where the prepared data set ``name`` is stored."""


class LogitCache(Cache):
    """Logits on disk, one checksummed safetensors file per (model, data set, soup).

    Opening it reaps the temporary files that killed processes left in it. A damaged or unchecked
    entry is a miss (one warning per cache and run); the search rewrites it."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        os.makedirs(os.path.join(self.root, "logits"), exist_ok=True)
        self._manifest_path = os.path.join(self.root, "manifest.json")
        self.journal = Journal(os.path.join(self.root, "journal.jsonl"))
        self._warned: set = set()
        self._legacy = False  # the manifest read last is of a cache before checksums
        for folder in (self.root, os.path.join(self.root, "logits"), os.path.join(self.root, "data")):
            _tempfiles.reap(folder)
        _tempfiles.reap_legacy_store(os.path.join(self.root, "data"), "heldout")

    def _path(self, k: str) -> str:
        return os.path.join(self.root, "logits", k + ".safetensors")

    def data_prefix(self, name: str) -> str:
        """Where the prepared data set ``name`` is stored (``PREFIX.bin`` and ``PREFIX.json``, see
        :class:`~fastsoup.search.store.Store`)."""
        return os.path.join(self.root, "data", name)

    def _ignore(self, path: str, why: str, kind: str = "damaged", drop: bool = False) -> None:
        """Warns that ``path`` is not trusted (once per kind of problem and cache); ``drop``: removes
        it too (a logits entry: a later run then finds no entry instead of warning again)."""
        if drop:
            try:
                os.unlink(path)  # a file only (a folder there is not one of ours)
            except OSError:
                pass
        if kind in self._warned:
            return
        self._warned.add(kind)
        if why.startswith(path + ": "):
            why = why[len(path) + 2:]
        warnings.warn(f"ignoring the unreadable cache entry {path} ({why}): recomputing it (and any other such entry "
                      "of this cache in this run, without another warning)", stacklevel=3)

    def get(self, k: str):
        """The cached float32 logits under k, or None (also for an entry whose checksum does not
        match: damaged, or written by an earlier fastsoup)."""
        path = self._path(k)
        if not os.path.exists(path):
            return None
        from ..io.checkpoint import open_checkpoint

        try:
            ck = open_checkpoint(path)
            meta = ck.metadata or {}
            ref = ck["logits"] if list(ck) == ["logits"] else None
            if ref is None or ref.dtype != "float32":
                raise ValueError("not a float32 'logits' tensor alone")
            if meta.get("fastsoup") != LOGITS_FORMAT or "checksum" not in meta:
                self._ignore(path, "no checksum (written by an earlier fastsoup)", "old", drop=True)
                return None
            t = ck.tensor("logits")
            ck.close()
        except Exception as e:  # a damaged entry is a miss, and is rewritten
            self._ignore(path, str(e), drop=True)
            return None
        if meta.get("key") != k or meta["checksum"] != _logits_checksum(k, t):
            self._ignore(path, "checksum mismatch (edited or damaged)", drop=True)
            return None
        return t

    def put(self, k: str, logits) -> None:
        """Stores logits under k, with a checksum of its key, shape and bytes (written whole under a
        temporary name and renamed into place: a crash or an interrupt leaves no half-written entry)."""
        from ..io._safetensors import build_header

        t = logits.detach().float().cpu().contiguous()
        nbytes = t.numel() * 4
        meta = {"format": "pt", "fastsoup": LOGITS_FORMAT, "key": k, "checksum": _logits_checksum(k, t)}
        header = build_header([("logits", "float32", tuple(t.shape), nbytes)], meta)
        with _tempfiles.replacing(self._path(k)) as f:
            f.write(header)
            if nbytes:
                f.write(_bytes_of(t))

    def check(self, what: str, fingerprint: str, *, describe: str) -> None:
        """Records ``what`` (e.g. "model", "data:heldout") on first use; refuses a different fingerprint later."""
        manifest = self._read_manifest()
        entry = manifest.get(what)
        if entry is not None and entry["fingerprint"] != fingerprint:
            self._refuse(describe, fingerprint, entry)
        if entry is not None and manifest.get("format") == CACHE_FORMAT:
            return
        if self._legacy:  # its records can never match (other keys): set aside, so no run warns of them
            self._legacy = False
            if os.path.exists(self.journal.path):
                os.replace(self.journal.path, os.path.join(self.root, "journal-unchecked.jsonl"))
        out = {"format": CACHE_FORMAT}
        out.update((w, seal(e)) for w, e in manifest.items() if w != "format")
        if entry is None:
            out[what] = seal({"fingerprint": fingerprint, "written": time.strftime("%Y-%m-%d %H:%M:%S")})
        self._write_manifest(out)

    def _refuse(self, describe: str, fingerprint: str, entry: dict) -> None:
        raise CacheMismatchError(
            f"{describe} has changed since the cache {self.root} was written ({entry['written']}): "
            f"fingerprint {fingerprint}, the cache has {entry['fingerprint']}. Results cached for the old one "
            "would be wrong here: use a new cache_dir, or delete this one to start over"
        )

    def _read_manifest(self) -> dict:
        """The manifest's well-formed entries; a damaged file or entry is dropped with a warning (it is
        rewritten from this run's fingerprints: every other entry of the cache is keyed by them).
        Entries without a checksum (a cache of an earlier fastsoup) are kept to refuse a change."""
        path = self._manifest_path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        try:
            manifest = json.loads(raw.decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except (ValueError, RecursionError) as e:
            self._ignore(path, f"not a manifest ({e})", "manifest")
            return {}
        fmt = manifest.get("format")
        self._legacy = fmt is None
        if fmt is None and "old" not in self._warned:
            self._warned.add("old")
            warnings.warn(f"the cache {self.root} was written by an earlier fastsoup (no checksums): none of its "
                          "logits or decisions are used; they are recomputed and rewritten (delete the directory to "
                          "reclaim the space of the old files)", stacklevel=3)
        out = {}
        for what, entry in manifest.items():
            if what == "format":
                continue
            ok = (isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str)
                  and isinstance(entry.get("written"), str))
            why = None if ok else "an entry of the wrong structure"
            if ok and fmt is not None:
                why = checked(entry)
            if why is not None:
                self._ignore(path, f"entry {what!r}: {why}", "manifest")
                continue
            out[what] = entry
        if fmt is not None:
            out["format"] = fmt
        return out

    def _write_manifest(self, manifest: dict) -> None:
        with _tempfiles.replacing(self._manifest_path, text=True) as f:
            json.dump(manifest, f, indent=1)


# The fields of a journal record of kind "candidate" (greedy search), and their types.
_NUMBER = (int, float)
CANDIDATE_FIELDS = {
    "search": (str,), "step": (int,), "index": (int,), "name": (str,), "fingerprint": (str,),
    "score": _NUMBER + (type(None),), "correct": (int, type(None)), "accepted": (bool,), "batches": (int,),
    "of": (int,), "time": _NUMBER,
}


def _candidate_problem(r: dict) -> str | None:
    for name, types in CANDIDATE_FIELDS.items():
        if name not in r:
            return f"no field {name!r}"
        v = r[name]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            return f"field {name!r} is {v!r}"
    if r["step"] < 1 or r["index"] < 0 or not 0 <= r["batches"] <= r["of"]:
        return "step, index or batches out of range"
    if r["accepted"] and (r["score"] is None or r["batches"] != r["of"]):
        return "accepted without a complete evaluation"
    return None


class Journal:
    """An append-only JSONL log of decisions, one checksummed record per line.

    :meth:`records` skips what it cannot trust (a line not UTF-8 or not JSON, not a record, a
    checksum that does not match, a candidate record with a field missing or of the wrong type) with
    one warning per call, and drops it from the file; a torn last line (a killed process) is skipped
    silently, and dropped by the next :meth:`append`."""

    def __init__(self, path: str):
        self.path = path

    def records(self) -> list[dict]:
        """The records that check out, in file order. Damaged lines are dropped from the file (it is
        rewritten without them, whole or not at all) with one warning, so later runs do not warn
        of them again; their decisions are recomputed (and journaled) by the search."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        out, keep, bad, first = [], [], 0, None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            r, why = _parse(line)
            if why is None:
                out.append(r)
                keep.append(line)
            else:
                bad += 1
                first = first or f"line {n}: {why}"
        if torn.strip():
            r, why = _parse(torn)
            if why is None:  # a whole record whose newline is missing
                out.append(r)
                keep.append(torn)
        if bad:
            warnings.warn(f"{self.path}: ignoring {bad} damaged record(s) ({first}); dropped from the journal, their "
                          "decisions are recomputed", stacklevel=2)
            with _tempfiles.replacing(self.path, fsync=True) as f:
                f.write(b"".join(line + b"\n" for line in keep))
        return out

    def append(self, record: dict) -> None:
        """Appends ``record`` with its checksum (and fsyncs). A torn last line is dropped first (a
        whole record that only lacks its newline gets one)."""
        line = (json.dumps(seal(record)) + "\n").encode()
        with open(self.path, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    start = _line_start(f, end)
                    f.seek(start)
                    if _parse(f.read(end - start))[1] is None:
                        line = b"\n" + line
                    else:
                        f.truncate(start)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _parse(line: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for a line holding a checksummed record; (None, what is wrong) otherwise."""
    try:
        r = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except (ValueError, RecursionError):
        return None, "not JSON"
    why = checked(r)
    if why is None and not isinstance(r.get("kind"), str):
        why = "no kind"
    if why is None and r["kind"] == "candidate":
        why = _candidate_problem(r)
    return (r, None) if why is None else (None, why)


def _line_start(f, end: int) -> int:
    """The offset just after the last newline before ``end`` (0 if none)."""
    pos = end
    while pos > 0:
        step = min(4096, pos)
        f.seek(pos - step)
        chunk = f.read(step)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return pos - step + i + 1
        pos -= step
    return 0


__all__ = [
    "VERIFY",
    "CacheMismatchError",
    "Journal",
    "LogitCache",
    "check_verify",
    "file_identity",
    "fingerprint_checkpoint",
    "fingerprint_model",
    "key",
    "record_checksum",
    "soup_key",
]
