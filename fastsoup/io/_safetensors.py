"""The safetensors file format: header parsing (with every check) and header building.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the data. The JSON maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data,
which starts at byte 8 + N), plus an optional ``"__metadata__"`` map of strings.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

from .._dtypes import BY_ST
from .._errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit


class Entry(NamedTuple):
    name: str
    dtype: str  # canonical name
    shape: tuple
    offset: int  # absolute byte offset in the file
    nbytes: int


MAX_DIMS = 64  # dimensions of one tensor (torch allows 64 too)
MAX_DIM = 2**63 - 1  # largest dimension (an int64, as every framework stores shapes)
_USIZE = 2**64  # the safetensors reader computes element counts and bytes in u64: larger overflows


def _no_duplicates(pairs):
    """``object_pairs_hook`` of the header's JSON: a key twice in one object is an error (Python's
    json keeps the last one, the safetensors reader refuses the file)."""
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _Duplicate(k)
        obj[k] = v
    return obj


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _valid_text(name: str) -> bool:
    """True for a string that is valid Unicode text (no lone surrogates from ``\\ud800`` escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(path: str, buf: memoryview) -> tuple[list[Entry], dict | None]:
    """Parses and checks the header of a safetensors file whose bytes are ``buf``.

    As strict as the safetensors reader, and stricter where it is lax: the header length fits the
    file; the JSON is one object, valid UTF-8, without a duplicate key in any object; every name is
    valid text; dtypes are those safetensors knows; shapes have at most 64 dimensions, each below
    2**63, whose element and byte counts fit in 64 bits; and the tensors' data_offsets tile the data
    buffer exactly (sorted by offset, each begins where the previous ends, the first at 0, the last
    at the end of the file: no hole, no overlap, no trailing byte).

    Returns the entries in file (offset) order and the ``__metadata__`` map (or None).
    Raises CheckpointError naming the file (and tensor) for anything malformed.
    """
    size = len(buf)
    if size < 8:
        raise CheckpointError(f"{path}: truncated: {size} bytes, but a safetensors file starts with an 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > size - 8:
        raise CheckpointError(
            f"{path}: header length {n} is larger than the file ({size} bytes): the file is truncated or not safetensors"
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise CheckpointError(f"{path}: garbled safetensors header: the key {e.key!r} appears twice in one object") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: garbled safetensors header (not UTF-8 JSON): {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: garbled safetensors header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    if metadata is not None and not all(_valid_text(k) and _valid_text(v) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ holds a string that is not valid Unicode text (a lone surrogate)")

    data_start = 8 + n
    data_size = size - data_start
    entries = []
    spans = []  # (begin, end, name) relative to the data buffer
    for name, spec in header.items():
        if not _valid_text(name):
            raise CheckpointError(f"{path}: tensor name {name!r} is not valid Unicode text (a lone surrogate escape)")
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets")
        st = spec.get("dtype")
        if not isinstance(st, str) or st not in BY_ST:
            raise CheckpointError(f"{where}: unknown dtype {st!r} (not a safetensors dtype)")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if len(shape) > MAX_DIMS:
            raise CheckpointError(f"{where}: {len(shape)} dimensions, more than the {MAX_DIMS} a tensor may have")
        if any(d > MAX_DIM for d in shape):
            raise CheckpointError(f"{where}: dimension {max(shape)} of shape {shape} is not below 2**63")
        numel = 1
        for d in shape:
            numel *= d
            if numel >= _USIZE:
                raise CheckpointError(f"{where}: shape {shape} has more elements than a 64-bit count holds")
        offs = spec.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r}")
        info = BY_ST[st]
        nbytes = info.nbytes(numel)
        if nbytes is None:
            raise CheckpointError(f"{where}: {numel} elements of {st} ({info.bits} bits each) do not fill whole bytes")
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes, but shape {shape} of {st} needs {nbytes}"
            )
        if offs[1] > data_size:
            raise CheckpointError(
                f"{where}: data ends at byte {offs[1]} of the data section, but the file holds only {data_size} data bytes: "
                "the file is truncated"
            )
        entries.append(Entry(name, info.name, tuple(shape), data_start + offs[0], nbytes))
        spans.append((offs[0], offs[1], name))

    # The data buffer must be tiled exactly, as the safetensors reader demands.
    spans.sort()
    cursor, before = 0, None
    for begin, end, name in spans:
        if begin != cursor:
            if begin < cursor:
                what = f"inside tensor {before!r}, which ends at {cursor}: they overlap"
            else:
                what = (f"but {before!r} ends at {cursor}" if before is not None else "but the data begins at 0") + \
                    f": {begin - cursor} bytes belong to no tensor"
            raise CheckpointError(
                f"{path}: tensor {name!r} begins at data byte {begin}, {what} (a safetensors file's tensors must "
                "cover its data exactly, in order)"
            )
        cursor, before = end, name
    if cursor != data_size:
        raise CheckpointError(
            f"{path}: the tensors cover {cursor} data bytes, but the file holds {data_size} after the {n}-byte header "
            f"({data_size - cursor} bytes unaccounted for): the header length or the file is wrong"
        )
    entries.sort(key=lambda e: (e.offset, e.nbytes, e.name))
    return entries, metadata


def build_header(specs, metadata: dict | None) -> bytes:
    """Header bytes (length prefix included) for tensors packed in the given order.

    ``specs``: iterable of (name, dtype name, shape, nbytes). The JSON is padded with spaces to a
    multiple of 8 bytes, as the safetensors package writes it.
    """
    from .._dtypes import BY_NAME

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape, nbytes in specs:
        header[name] = {"dtype": BY_NAME[dtype].st, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
