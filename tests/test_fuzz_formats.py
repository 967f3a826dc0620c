"""Property-based fuzzing of the safetensors header reader and the sharded-index reader (bounded,
derandomized: the same examples every run, well under a minute).

Properties:
- any bytes: ``parse_header`` returns a layout that tiles the data exactly, or raises CheckpointError
  naming the file; nothing else (no other exception, no crash);
- valid files and mutations of them (flipped bytes, a header length off by a few, trailing or
  missing bytes, duplicated keys): whatever fastsoup accepts, the safetensors reader accepts too, with
  the same names, dtypes, shapes and bytes (fastsoup is at least as strict);
- index files (names, shard names and JSON types drawn at random, over real shards): a Checkpoint
  whose tensors are those of the weight map, or a CheckpointError naming the index or a shard.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

pytest.importorskip("hypothesis")
import tempfile  # noqa: E402

import hypothesis.configuration  # noqa: E402
import safetensors  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastsoup  # noqa: E402
from fastsoup import CheckpointError  # noqa: E402
from fastsoup._dtypes import BY_ST  # noqa: E402
from fastsoup.io._safetensors import parse_header  # noqa: E402

# Hypothesis keeps files (its example database, constants) in ./.hypothesis: under the tests' temporary
# folder instead (conftest points TMPDIR there), so no run leaves files in the checkout.
hypothesis.configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "hypothesis"))
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
PATH = "/fuzz/model.safetensors"  # a label only: parse_header reads the bytes it is given

DTYPES = sorted(BY_ST)
NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@st.composite
def valid_files(draw):
    """A well-formed safetensors file: tensors of random dtypes and small shapes, packed in a random
    order, optional metadata."""
    n = draw(st.integers(0, 6))
    names = draw(st.lists(NAMES.filter(lambda s: s != "__metadata__"), min_size=n, max_size=n, unique=True))
    header, data, offset = {}, b"", 0
    for name in names:
        dt = BY_ST[draw(st.sampled_from(DTYPES))]
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        if dt.nbytes(numel) is None:
            shape, numel = [2 * 4], 8  # sub-byte types: a whole number of bytes
        nb = dt.nbytes(numel)
        header[name] = {"dtype": dt.st, "shape": shape, "data_offsets": [offset, offset + nb]}
        data += draw(st.binary(min_size=nb, max_size=nb))
        offset += nb
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(NAMES, NAMES, max_size=3))
    items = list(header.items())
    order = draw(st.permutations(range(len(items))))
    raw = json.dumps(dict(items[i] for i in order)).encode()
    raw += b" " * draw(st.integers(0, 9))
    return struct.pack("<Q", len(raw)) + raw + data


def _layout(entries, buf):
    return {e.name: (e.dtype, list(e.shape), bytes(buf[e.offset : e.offset + e.nbytes])) for e in entries}


def _safetensors_layout(buf: bytes):
    try:
        got = safetensors.deserialize(bytes(buf))
    except Exception:  # noqa: BLE001  (its errors are of several types)
        return None
    return {name: (BY_ST[v["dtype"]].name, list(v["shape"]), bytes(v["data"])) for name, v in got}


def _check_tiling(entries, size):
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries)
    if not spans:
        return
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin == end
    assert spans[-1][1] == size


@settings(FUZZ, max_examples=1500)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_cleanly(buf):
    try:
        entries, _ = parse_header(PATH, memoryview(buf))
    except CheckpointError as e:
        assert PATH in str(e)
        return
    _check_tiling(entries, len(buf))


@pytest.mark.slow
@settings(FUZZ, max_examples=500)
@given(valid_files())
def test_valid_files_are_read_as_the_safetensors_reader_reads_them(buf):
    entries, _ = parse_header(PATH, memoryview(buf))
    assert _layout(entries, buf) == _safetensors_layout(buf)


@st.composite
def mutated_files(draw):
    buf = bytearray(draw(valid_files()))
    how = draw(st.sampled_from(["flip", "length", "trailing", "truncate", "duplicate"]))
    n = struct.unpack("<Q", buf[:8])[0]
    if how == "flip" and len(buf) > 8:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(8, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
    elif how == "length":
        buf[:8] = struct.pack("<Q", max(0, n + draw(st.integers(-9, 9))))
    elif how == "trailing":
        buf += draw(st.binary(min_size=1, max_size=9))
    elif how == "truncate" and len(buf) > 8:
        del buf[draw(st.integers(0, len(buf) - 1)):]
    elif how == "duplicate":
        header = bytes(buf[8:8 + n]).rstrip()
        if header.startswith(b'{"') and header.endswith(b"}}") and b"}," in header:
            first = header[1:header.index(b"},") + 1]
            header = b"{" + first + b"," + header[1:]
            buf = bytearray(struct.pack("<Q", len(header)) + header + buf[8 + n:])
    return bytes(buf)


@pytest.mark.slow
@settings(FUZZ, max_examples=1200)
@given(mutated_files())
def test_what_fastsoup_accepts_the_safetensors_reader_accepts(buf):
    try:
        entries, _ = parse_header(PATH, memoryview(buf))
    except CheckpointError as e:
        assert PATH in str(e)
        return
    _check_tiling(entries, len(buf))
    assert _layout(entries, buf) == _safetensors_layout(buf)


# ---------------------------------------------------------------------------------------------------
# The sharded index


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    """Two real shards (a, b in the first; c in the second) to point index files at."""
    import torch

    folder = tmp_path_factory.mktemp("idx")
    fastsoup.save({"a": torch.ones(2), "b": torch.zeros(3)}, folder / "s1.safetensors")
    fastsoup.save({"c": torch.arange(4.0)}, folder / "s2.safetensors")
    return folder


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                       max_leaves=6)
SHARDS = st.sampled_from(["s1.safetensors", "s2.safetensors", "missing.safetensors", "../s1.safetensors",
                          "s1.safetensors/x", "", "s2.safetensors\x00"])


@st.composite
def indexes(draw):
    if draw(st.integers(0, 4)) == 0:  # any JSON at all
        return draw(JSONISH)
    weight_map = draw(st.dictionaries(st.sampled_from(["a", "b", "c", "d", ""]), SHARDS | JSONISH, max_size=5))
    index = {"weight_map": weight_map}
    if draw(st.booleans()):
        index["metadata"] = draw(JSONISH)
    return index


@settings(FUZZ, max_examples=300)
@given(index=indexes())
def test_index_files_give_their_weight_map_or_fail_cleanly(shard_folder, index):
    path = os.path.join(shard_folder, "model.safetensors.index.json")
    with open(path, "w") as f:
        json.dump(index, f)
    try:
        ck = fastsoup.open_checkpoint(path)
    except CheckpointError as e:
        assert str(shard_folder) in str(e)
        return
    assert isinstance(index, dict) and set(ck) == set(index["weight_map"])
    for name in ck:
        assert os.path.basename(ck[name].file) == index["weight_map"][name]
        ck.tensor(name)
