"""The safetensors file format: header parsing (with every check) and header building.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the data. The JSON maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data,
which starts at byte 8 + N), plus an optional ``"__metadata__"`` map of strings.
"""

from __future__ import annotations

import json
import math
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


def parse_header(path: str, buf: memoryview) -> tuple[list[Entry], dict | None]:
    """Parses and checks the header of a safetensors file whose bytes are ``buf``.

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
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: garbled safetensors header (not UTF-8 JSON): {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: garbled safetensors header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + n
    data_size = size - data_start
    entries = []
    for name, spec in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets")
        st = spec.get("dtype")
        if not isinstance(st, str) or st not in BY_ST:
            raise CheckpointError(f"{where}: unknown dtype {st!r}")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offs = spec.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r}")
        info = BY_ST[st]
        nbytes = math.prod(shape) * info.itemsize
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes, but shape {shape} of {info.name} needs {nbytes}"
            )
        if offs[1] > data_size:
            raise CheckpointError(
                f"{where}: data ends at byte {offs[1]} of the data section, but the file holds only {data_size} data bytes: "
                "the file is truncated"
            )
        entries.append(Entry(name, info.name, tuple(shape), data_start + offs[0], nbytes))

    entries.sort(key=lambda e: (e.offset, e.nbytes, e.name))
    prev = None
    for e in entries:
        if e.nbytes == 0:
            continue
        if prev is not None and e.offset < prev.offset + prev.nbytes:
            raise CheckpointError(f"{path}: tensors {prev.name!r} and {e.name!r} overlap in the file")
        prev = e
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
