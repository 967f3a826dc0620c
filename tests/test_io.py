"""Tests of fastsoup's checkpoint I/O: readers for every source, header checks, index checks,
``check_compatible``, the atomic (sharded) safetensors writer and ``parse_size``.

All data is generated here (small random tensors) under ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastsoup
import fastsoup.io.writer as writer_mod
from fastsoup import CheckpointError, FastsoupError, OutputExistsError
from fastsoup.io import parse_size

from conftest import tree_bytes

DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
INDEX = "model.safetensors.index.json"
MANIFEST = ".fastsoup.json"


# ---------------------------------------------------------------------------------------------------
# helpers


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def rand_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        flat = t.view(-1)
        specials = [float("nan"), float("inf"), -0.0, -float("inf")]
        for i, v in enumerate(specials[: flat.numel()]):  # bit patterns a value compare would miss
            flat[i] = v
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype, generator=gen)


def make_sd(seed: int = 0, dtypes=DTYPES) -> dict[str, torch.Tensor]:
    """One tensor of every dtype, plus a 0-dim and an empty (0, 3) tensor of every dtype.

    The names are deliberately not in alphabetical order."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, dt in enumerate(dtypes):
        sd[f"z{9 - i}.layer.{dname(dt)}"] = rand_tensor(dt, (3, 5 + i), gen)
        sd[f"scalar.{dname(dt)}"] = rand_tensor(dt, (), gen)
        sd[f"a.empty.{dname(dt)}"] = rand_tensor(dt, (0, 3), gen)
    return sd


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert torch.equal(bits(a), bits(b))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def st_file_order(path) -> list[str]:
    """Tensor names of a safetensors file in data (offset) order, read straight from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: (header[k]["data_offsets"][0], header[k]["data_offsets"][1], k))


def check_ckpt(ckpt, expected: dict[str, torch.Tensor], order: list[str]) -> None:
    assert list(ckpt) == order
    assert len(ckpt) == len(expected)
    assert set(order) == set(expected)
    for name in order:
        t = expected[name]
        ref = ckpt[name]
        assert ref.name == name
        assert ref.dtype == dname(t.dtype)
        assert ref.shape == tuple(t.shape)
        assert ref.nbytes == nbytes(t)
        assert ref.numel == t.numel()
        assert_same(ckpt.tensor(name), t)
    assert ckpt.nbytes == sum(nbytes(t) for t in expected.values())


def write_sharded(folder, shards: list[dict[str, torch.Tensor]], *, weight_map=None, index_extra=None, metadata=None):
    """Writes an HF-style sharded folder with safetensors.torch.save_file. Returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    paths, wm, total = [], {}, 0
    for i, sd in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        p = folder / name
        save_file(sd, str(p), metadata=metadata)
        paths.append(p)
        for k, v in sd.items():
            wm[k] = name
            total += nbytes(v)
    if weight_map is None:
        weight_map = dict(sorted(wm.items(), reverse=True))  # index order differs from the file order
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if index_extra is not None:
        index = index_extra
    (folder / INDEX).write_text(json.dumps(index))
    return paths


def write_raw_st(path, header, data: bytes = b"", *, length=None) -> None:
    """A safetensors file from raw parts: 8-byte little-endian header length, header, data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(hb) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + hb + data)


def no_temp_files(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.startswith(".") and (".tmp-" in n or ".old-" in n)]


def read_st(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---------------------------------------------------------------------------------------------------
# 1. round trips for every source type and dtype


def test_safetensors_file_roundtrip(tmp_path):
    sd = make_sd(1)
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p), metadata={"format": "pt", "note": "x"})
    ckpt = fastsoup.open_checkpoint(str(p))
    order = st_file_order(p)
    assert order != list(sd)  # file order is not the dict order: the check below means something
    check_ckpt(ckpt, sd, order)
    assert ckpt.metadata == {"format": "pt", "note": "x"}
    assert ckpt.is_file
    assert ckpt.files == [str(p)]
    assert ckpt.source == str(p)
    # os.PathLike works too; the tensor is a copy, not a view of the file
    ckpt2 = fastsoup.open_checkpoint(p)
    name = next(n for n in ckpt2 if ckpt2[n].dtype == "float32" and ckpt2[n].numel > 1)
    t = ckpt2.tensor(name)
    t.fill_(7)
    assert_same(ckpt2.tensor(name), sd[name])
    # an already opened Checkpoint is returned as is
    assert fastsoup.open_checkpoint(ckpt) is ckpt


def test_safetensors_file_without_suffix_is_sniffed(tmp_path):
    sd = make_sd(2)
    p = tmp_path / "weights.data"
    save_file(sd, str(p))
    check_ckpt(fastsoup.open_checkpoint(str(p)), sd, st_file_order(p))


def test_raw_file_order_follows_offsets_not_json_order(tmp_path):
    a = torch.arange(4, dtype=torch.float32)
    z = torch.arange(4, 8, dtype=torch.float32)
    header = {
        "__metadata__": {"k": "v"},
        "z": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }
    p = tmp_path / "raw.safetensors"
    write_raw_st(p, header, z.numpy().tobytes() + a.numpy().tobytes())
    ckpt = fastsoup.open_checkpoint(str(p))
    check_ckpt(ckpt, {"z": z, "a": a}, ["z", "a"])
    assert ckpt.metadata == {"k": "v"}
    header2 = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
        "z": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    }
    write_raw_st(p, header2, z.numpy().tobytes() + a.numpy().tobytes())
    ckpt = fastsoup.open_checkpoint(str(p))
    check_ckpt(ckpt, {"z": z, "a": a}, ["z", "a"])
    assert ckpt.metadata is None


@pytest.mark.parametrize("by", ["folder", "index"])
def test_sharded_folder_roundtrip(tmp_path, by):
    sd = make_sd(3)
    names = list(sd)
    shard1 = {k: sd[k] for k in names[::2]}
    shard2 = {k: sd[k] for k in names[1::2]}
    folder = tmp_path / "hf"
    paths = write_sharded(folder, [shard1, shard2], metadata={"format": "pt"})
    src = str(folder) if by == "folder" else str(folder / INDEX)
    ckpt = fastsoup.open_checkpoint(src)
    order = st_file_order(paths[0]) + st_file_order(paths[1])  # shard by shard, file order in each
    check_ckpt(ckpt, sd, order)
    assert ckpt.files == [str(p) for p in paths]
    assert ckpt.is_file
    assert ckpt.metadata == {"format": "pt"}
    # the shard file is named where a tensor is described
    assert os.path.basename(str(paths[1])) in ckpt.where(names[1])


def test_sharded_index_with_other_name_is_the_source(tmp_path):
    sd = make_sd(4, dtypes=[torch.float32, torch.int64])
    folder = tmp_path / "f"
    write_sharded(folder, [sd])
    os.rename(folder / INDEX, folder / "custom.safetensors.index.json")
    ckpt = fastsoup.open_checkpoint(str(folder))
    assert ckpt.source == str(folder / "custom.safetensors.index.json")
    check_ckpt(ckpt, sd, st_file_order(next(folder.glob("model-*.safetensors"))))


WRAPPERS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd},
    "model": lambda sd: {"model": sd},
    "epoch_state_dict": lambda sd: {"epoch": 3, "state_dict": sd},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_torch_file_roundtrip(tmp_path, suffix, wrapper):
    sd = make_sd(5)
    p = tmp_path / f"ckpt{suffix}"
    torch.save(WRAPPERS[wrapper](sd), str(p))
    ckpt = fastsoup.open_checkpoint(str(p))
    check_ckpt(ckpt, sd, list(sd))
    assert ckpt.source == str(p)


def test_torch_file_legacy_format_and_unknown_suffix(tmp_path):
    sd = make_sd(6, dtypes=[torch.float16, torch.bfloat16, torch.int8])
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, str(legacy), _use_new_zipfile_serialization=False)
    check_ckpt(fastsoup.open_checkpoint(str(legacy)), sd, list(sd))
    odd = tmp_path / "weights.blob"
    torch.save({"state_dict": sd}, str(odd))
    check_ckpt(fastsoup.open_checkpoint(str(odd)), sd, list(sd))


def test_folder_with_one_torch_file(tmp_path):
    sd = make_sd(7, dtypes=[torch.float32])
    (tmp_path / "d").mkdir()
    torch.save(sd, str(tmp_path / "d" / "pytorch_model.bin"))
    check_ckpt(fastsoup.open_checkpoint(str(tmp_path / "d")), sd, list(sd))


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_in_memory_state_dict_roundtrip(wrapper):
    sd = make_sd(8)
    ckpt = fastsoup.open_checkpoint(WRAPPERS[wrapper](sd))
    check_ckpt(ckpt, sd, list(sd))
    assert not ckpt.is_file
    # tensor() gives a copy: the caller's tensors are never written
    name = next(iter(sd))
    before = sd[name].clone()
    ckpt.tensor(name).zero_()
    assert_same(sd[name], before)


def test_numpy_state_dict_roundtrip():
    sd = make_sd(9, dtypes=[d for d in DTYPES if d != torch.bfloat16])  # numpy has no bfloat16
    arrays = {k: v.numpy() for k, v in sd.items()}
    ckpt = fastsoup.open_checkpoint(arrays)
    check_ckpt(ckpt, sd, list(sd))
    for k, a in arrays.items():
        assert ckpt[k].dtype == a.dtype.name
        assert ckpt[k].nbytes == a.nbytes


def test_non_contiguous_in_memory_tensor():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"t": base.t(), "np": base.numpy().T}
    ckpt = fastsoup.open_checkpoint(sd)
    assert_same(ckpt.tensor("t"), base.t().contiguous())
    assert_same(ckpt.tensor("np"), torch.from_numpy(base.numpy().T.copy()))
    addr, is_mapped, keep = ckpt.buffer(ckpt["t"])
    assert not is_mapped and keep.is_contiguous() and addr == keep.data_ptr()


class _Net(torch.nn.Module):
    def __init__(self, sd):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        for i, (k, v) in enumerate(sd.items()):
            self.register_buffer(f"buf{i}", v.clone())


def test_module_roundtrip():
    torch.manual_seed(0)
    net = _Net(make_sd(10))
    expected = net.state_dict()
    ckpt = fastsoup.open_checkpoint(net)
    check_ckpt(ckpt, expected, list(expected))
    assert {"lin.weight", "lin.bias", "buf0"} <= set(ckpt)
    assert_same(ckpt.tensor("lin.weight"), net.lin.weight.detach())
    assert "_Net" in ckpt.source


def test_unknown_source_type_and_bad_state_dicts():
    with pytest.raises(CheckpointError, match="int"):
        fastsoup.open_checkpoint(3)
    with pytest.raises(CheckpointError, match="'step'"):
        fastsoup.open_checkpoint({"w": torch.zeros(2), "step": 3})
    with pytest.raises(CheckpointError, match="not a string"):
        fastsoup.open_checkpoint({1: torch.zeros(2)})


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], str(p))
    with pytest.raises(CheckpointError) as ei:
        fastsoup.open_checkpoint(str(p))
    assert str(p) in str(ei.value)
    p2 = tmp_path / "garbage.pt"
    p2.write_bytes(b"PK\x03\x04 this is not a zip file at all")
    with pytest.raises(CheckpointError) as ei:
        fastsoup.open_checkpoint(str(p2))
    assert str(p2) in str(ei.value)
    p3 = tmp_path / "notes.txt"
    p3.write_text("hello world, not a checkpoint")
    with pytest.raises(CheckpointError) as ei:
        fastsoup.open_checkpoint(str(p3))
    assert str(p3) in str(ei.value)


# ---------------------------------------------------------------------------------------------------
# 2. sharded index edge cases


def _two_shards(seed=11):
    gen = torch.Generator().manual_seed(seed)
    s1 = {"a": rand_tensor(torch.float32, (2, 3), gen), "b": rand_tensor(torch.float16, (4,), gen)}
    s2 = {"c": rand_tensor(torch.float32, (5,), gen), "d": rand_tensor(torch.int64, (2,), gen)}
    return s1, s2


def _open_fails(src) -> str:
    with pytest.raises(CheckpointError) as ei:
        fastsoup.open_checkpoint(str(src))
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, FastsoupError)
    return str(ei.value)


@pytest.mark.parametrize("by", ["folder", "index"])
def test_index_missing_shard(tmp_path, by):
    folder = tmp_path / "hf"
    paths = write_sharded(folder, list(_two_shards()))
    os.remove(paths[1])
    msg = _open_fails(folder if by == "folder" else folder / INDEX)
    assert str(folder / INDEX) in msg
    assert paths[1].name in msg


def test_index_name_in_two_shards(tmp_path):
    s1, s2 = _two_shards()
    s2["b"] = s1["b"].clone()
    folder = tmp_path / "hf"
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    write_sharded(folder, [s1, s2], weight_map=wm)
    msg = _open_fails(folder)
    assert str(folder) in msg
    assert "'b'" in msg
    assert "model-00002-of-00002.safetensors" in msg


def test_index_shard_has_names_the_index_lacks(tmp_path):
    s1, s2 = _two_shards()
    s2["extra.weight"] = torch.ones(3)
    folder = tmp_path / "hf"
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    write_sharded(folder, [s1, s2], weight_map=wm)
    msg = _open_fails(folder)
    assert str(folder / "model-00002-of-00002.safetensors") in msg
    assert "'extra.weight'" in msg


def test_index_maps_name_to_shard_without_it(tmp_path):
    s1, s2 = _two_shards()
    folder = tmp_path / "hf"
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors",
          "ghost.bias": "model-00001-of-00002.safetensors"}
    write_sharded(folder, [s1, s2], weight_map=wm)
    msg = _open_fails(folder / INDEX)
    assert str(folder / INDEX) in msg
    assert "'ghost.bias'" in msg
    assert "model-00001-of-00002.safetensors" in msg


@pytest.mark.parametrize(
    "index",
    [
        {"metadata": {"total_size": 10}},
        {"metadata": {}, "weight_map": ["a", "b"]},
        {"weight_map": {"a": 1}},
        ["weight_map"],
    ],
    ids=["no-weight-map", "weight-map-list", "shard-not-string", "index-is-list"],
)
def test_index_without_weight_map(tmp_path, index):
    folder = tmp_path / "hf"
    write_sharded(folder, list(_two_shards()), index_extra=index)
    msg = _open_fails(folder)
    assert str(folder / INDEX) in msg
    assert "weight_map" in msg


@pytest.mark.parametrize("text", ["{not json", b"\xff\xfe\x00garbage"], ids=["bad-json", "not-utf8"])
def test_index_garbled(tmp_path, text):
    folder = tmp_path / "hf"
    write_sharded(folder, list(_two_shards()))
    if isinstance(text, bytes):
        (folder / INDEX).write_bytes(text)
    else:
        (folder / INDEX).write_text(text)
    msg = _open_fails(folder)
    assert str(folder / INDEX) in msg


def test_index_shard_outside_folder(tmp_path):
    s1, s2 = _two_shards()
    folder = tmp_path / "hf"
    save_file(s2, str(tmp_path / "outside.safetensors"))
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "../outside.safetensors", "d": "../outside.safetensors"}
    write_sharded(folder, [s1, s2], weight_map=wm)
    msg = _open_fails(folder)
    assert str(folder / INDEX) in msg
    assert "../outside.safetensors" in msg


def test_index_deeply_nested_json(tmp_path):
    folder = tmp_path / "hf"
    write_sharded(folder, list(_two_shards()))
    (folder / INDEX).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    msg = _open_fails(folder)
    assert str(folder / INDEX) in msg


def test_folder_with_several_safetensors_and_no_index(tmp_path):
    s1, s2 = _two_shards()
    save_file(s1, str(tmp_path / "one.safetensors"))
    save_file(s2, str(tmp_path / "two.safetensors"))
    msg = _open_fails(tmp_path)
    assert str(tmp_path) in msg
    assert "index" in msg


def test_folder_with_one_safetensors_and_no_index(tmp_path):
    s1, _ = _two_shards()
    save_file(s1, str(tmp_path / "only.safetensors"))
    check_ckpt(fastsoup.open_checkpoint(str(tmp_path)), s1, st_file_order(tmp_path / "only.safetensors"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _open_fails(tmp_path / "empty")
    assert str(tmp_path / "empty") in msg


@pytest.mark.parametrize("name", ["nope.safetensors", "nope", "nope.pt", "nope/model.safetensors.index.json"])
def test_nonexistent_path(tmp_path, name):
    msg = _open_fails(tmp_path / name)
    assert str(tmp_path / name) in msg


# ---------------------------------------------------------------------------------------------------
# 3. bad safetensors files


def _valid_st(tmp_path):
    gen = torch.Generator().manual_seed(12)
    sd = {"alpha": rand_tensor(torch.float32, (4, 4), gen), "beta": rand_tensor(torch.float16, (6,), gen)}
    p = tmp_path / "valid.safetensors"
    save_file(sd, str(p))
    return p


@pytest.mark.parametrize("cut", [1, 3, 12, 64, "header+1", "header", "header-1", "8", "7", "0"])
def test_truncated_safetensors(tmp_path, cut):
    p = _valid_st(tmp_path)
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    keep = {
        "header+1": 8 + n + 1, "header": 8 + n, "header-1": 8 + n - 1, "8": 8, "7": 7, "0": 0,
    }.get(cut, len(data) - cut if isinstance(cut, int) else None)
    q = tmp_path / "cut.safetensors"
    q.write_bytes(data[:keep])
    msg = _open_fails(q)
    assert str(q) in msg
    if isinstance(cut, int) or cut == "header+1":
        # the header is intact: the message names a tensor whose data is cut off
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        cut_off = [k for k, v in header.items() if v["data_offsets"][1] > keep - 8 - n]
        assert cut_off
        assert any(repr(k) in msg for k in cut_off)
        assert "truncated" in msg


def _hdr(**tensors):
    return tensors


BAD_FILES = {
    # id: (header (dict or raw bytes), data, header length override, tensor named in the message)
    "short-3-bytes": (None, b"abc", None, None),
    "garbled-json": (b'{"a": {"dtype": "F32", ', b"\0" * 4, None, None),
    "not-utf8": (b'{"a": "\xff\xfe\xfd"}   ', b"", None, None),
    "header-len-beyond-file": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10_000, None),
    "header-len-huge": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 2**64 - 1, None),
    "header-len-zero": (b"", b"\0" * 16, None, None),
    "header-is-list": (b'[{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}]', b"\0" * 4, None, None),
    "header-is-string": (b'"hello"', b"", None, None),
    "unknown-dtype": ({"w.q": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "w.q"),
    "missing-dtype": ({"w.q": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "w.q"),
    "spec-not-object": ({"w.q": [1, 2, 3]}, b"", None, "w.q"),
    "span-mismatch": ({"w.q": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, None, "w.q"),
    "span-mismatch-dtype": ({"w.q": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, None, "w.q"),
    "offsets-beyond-data": ({"w.q": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16, None, "w.q"),
    "offsets-begin-after-end": ({"w.q": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 16, None, "w.q"),
    "offsets-negative": ({"w.q": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 16, None, "w.q"),
    "offsets-three": ({"w.q": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 16, None, "w.q"),
    "offsets-float": ({"w.q": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 16, None, "w.q"),
    "offsets-bool": ({"w.q": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0" * 16, None, "w.q"),
    "offsets-missing": ({"w.q": {"dtype": "F32", "shape": [1]}}, b"\0" * 16, None, "w.q"),
    "shape-negative": ({"w.q": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}, b"\0" * 16, None, "w.q"),
    "shape-bool": ({"w.q": {"dtype": "F32", "shape": [True, 1], "data_offsets": [0, 4]}}, b"\0" * 16, None, "w.q"),
    "shape-float": ({"w.q": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 16, None, "w.q"),
    "shape-not-list": ({"w.q": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, b"\0" * 16, None, "w.q"),
    "metadata-not-strings": ({"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                             b"\0" * 4, None, None),
    "metadata-list": ({"__metadata__": ["a"]}, b"", None, None),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors(tmp_path, case):
    header, data, length, tensor = BAD_FILES[case]
    p = tmp_path / f"{case}.safetensors"
    if header is None:
        p.write_bytes(data)
    else:
        write_raw_st(p, header, data, length=length)
    msg = _open_fails(p)
    assert str(p) in msg
    if tensor is not None:
        assert repr(tensor) in msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    assert str(p) in _open_fails(p)


def test_overlapping_offsets(tmp_path):
    header = {
        "first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "second": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    p = tmp_path / "overlap.safetensors"
    write_raw_st(p, header, b"\0" * 24)
    msg = _open_fails(p)
    assert str(p) in msg
    assert "'first'" in msg and "'second'" in msg
    # one tensor inside another overlaps too
    header = {
        "outer": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
        "inner": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    write_raw_st(p, header, b"\0" * 24)
    msg = _open_fails(p)
    assert "'outer'" in msg and "'inner'" in msg


def test_zero_size_tensors_sit_between_tensors(tmp_path):
    # Zero-size tensors take no bytes, at the offset where the tensors before them end (as the
    # safetensors reader demands: one inside another tensor's bytes is refused).
    header = {
        "e0": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "e2": {"dtype": "I64", "shape": [0], "data_offsets": [8, 8]},
    }
    p = tmp_path / "zeros.safetensors"
    w = torch.tensor([1.5, -2.0])
    write_raw_st(p, header, w.numpy().tobytes())
    ckpt = fastsoup.open_checkpoint(str(p))
    assert set(ckpt) == {"e0", "w", "e2"}
    assert_same(ckpt.tensor("w"), w)
    assert_same(ckpt.tensor("e0"), torch.empty((0, 3)))
    assert_same(ckpt.tensor("e2"), torch.empty((0,), dtype=torch.int64))
    header["e1"] = {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}  # inside w
    write_raw_st(p, header, w.numpy().tobytes())
    msg = _open_fails(p)
    assert "'e1'" in msg and "'w'" in msg


@pytest.mark.parametrize("dtype", [["F32"], {"t": "F32"}])
def test_unhashable_dtype(tmp_path, dtype):
    p = tmp_path / "dt.safetensors"
    write_raw_st(p, {"w.q": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    msg = _open_fails(p)
    assert str(p) in msg and "'w.q'" in msg


def test_deeply_nested_header(tmp_path):
    p = tmp_path / "deep.safetensors"
    write_raw_st(p, b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"")
    assert str(p) in _open_fails(p)


def test_header_with_huge_integer(tmp_path):
    p = tmp_path / "bigint.safetensors"
    write_raw_st(p, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}", b"\0" * 4)
    assert str(p) in _open_fails(p)


# ---------------------------------------------------------------------------------------------------
# 4. check_compatible


def _st(tmp_path, name, sd):
    p = tmp_path / name
    save_file(sd, str(p))
    return fastsoup.open_checkpoint(str(p))


def test_check_compatible_ok(tmp_path):
    gen = torch.Generator().manual_seed(13)
    a = {"w": rand_tensor(torch.float32, (3, 2), gen), "step": torch.tensor(3), "mask": torch.ones(2, dtype=torch.bool)}
    b = {"w": rand_tensor(torch.bfloat16, (3, 2), gen), "step": torch.tensor(5, dtype=torch.int32),
         "mask": torch.zeros(2, dtype=torch.bool)}
    assert fastsoup.check_compatible([_st(tmp_path, "a.safetensors", a), fastsoup.open_checkpoint(b)]) is None
    assert fastsoup.check_compatible([fastsoup.open_checkpoint(a)]) is None


def test_check_compatible_key_sets(tmp_path):
    common = {f"common{i:02d}": torch.zeros(2) for i in range(3)}
    only_first = {f"gone{i:02d}": torch.zeros(2) for i in range(12)}
    only_second = {f"new{i:02d}": torch.zeros(2) for i in range(13)}
    a = _st(tmp_path, "a.safetensors", {**common, **only_first})
    b = _st(tmp_path, "b.safetensors", {**common, **only_second})
    with pytest.raises(CheckpointError) as ei:
        fastsoup.check_compatible([a, b])
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert str(tmp_path / "b.safetensors") in msg
    assert str(tmp_path / "a.safetensors") in msg
    assert "missing 12" in msg and "extra 13" in msg
    listed_missing = [n for n in only_first if repr(n) in msg]
    listed_extra = [n for n in only_second if repr(n) in msg]
    assert len(listed_missing) == 10 and len(listed_extra) == 10
    assert "and 2 more" in msg and "and 3 more" in msg
    assert not any(repr(n) in msg for n in common)


def test_check_compatible_shape_mismatch(tmp_path):
    a = _st(tmp_path, "a.safetensors", {"x": torch.zeros(2, 3), "head.weight": torch.zeros(4, 5)})
    b = _st(tmp_path, "b.safetensors", {"x": torch.zeros(2, 3), "head.weight": torch.zeros(5, 4)})
    with pytest.raises(CheckpointError) as ei:
        fastsoup.check_compatible([a, b])
    msg = str(ei.value)
    assert str(tmp_path / "b.safetensors") in msg
    assert "'head.weight'" in msg
    assert "[5, 4]" in msg and "[4, 5]" in msg
    assert "'x'" not in msg


def test_check_compatible_float_vs_int(tmp_path):
    a = _st(tmp_path, "a.safetensors", {"w": torch.zeros(3), "n": torch.zeros(2, dtype=torch.int64)})
    b = _st(tmp_path, "b.safetensors", {"w": torch.zeros(3, dtype=torch.int32), "n": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(CheckpointError) as ei:
        fastsoup.check_compatible([a, b])
    msg = str(ei.value)
    assert str(tmp_path / "b.safetensors") in msg
    assert "'w'" in msg and "int32" in msg and "float32" in msg
    assert "'n'" not in msg


def test_check_compatible_unsupported_dtype(tmp_path):
    sd = {"ok": torch.zeros(2), "q.weight": torch.zeros(4).to(torch.float8_e4m3fn)}
    ck_mem = fastsoup.open_checkpoint(sd)
    assert ck_mem["q.weight"].dtype == "float8_e4m3fn"
    with pytest.raises(CheckpointError) as ei:
        fastsoup.check_compatible([ck_mem])
    assert "'q.weight'" in str(ei.value) and "float8_e4m3fn" in str(ei.value)
    assert "'ok'" not in str(ei.value)
    ck_file = _st(tmp_path, "fp8.safetensors", sd)
    assert ck_file["q.weight"].dtype == "float8_e4m3fn"
    with pytest.raises(CheckpointError) as ei:
        fastsoup.check_compatible([_st(tmp_path, "a.safetensors", {"ok": torch.zeros(2), "q.weight": torch.zeros(4)}), ck_file])
    assert str(tmp_path / "fp8.safetensors") in str(ei.value) and "'q.weight'" in str(ei.value)


def test_check_compatible_sharded_names_the_shard(tmp_path):
    s1, s2 = _two_shards()
    write_sharded(tmp_path / "hf", [s1, s2])
    bad = dict(s1, **s2)
    bad["c"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as ei:
        fastsoup.check_compatible([fastsoup.open_checkpoint(bad), fastsoup.open_checkpoint(str(tmp_path / "hf"))])
    msg = str(ei.value)
    assert str(tmp_path / "hf") in msg and "model-00002-of-00002.safetensors" in msg and "'c'" in msg


def test_check_compatible_empty_list():
    with pytest.raises(CheckpointError):
        fastsoup.check_compatible([])


# ---------------------------------------------------------------------------------------------------
# 5. the writer


def test_save_single_file_every_dtype(tmp_path):
    sd = make_sd(14)
    p = tmp_path / "out" / "soup.safetensors"  # the parent folder is created
    assert fastsoup.save(sd, p) == os.fspath(p)
    got, meta = read_st(p)
    assert meta == {"format": "pt"}
    assert set(got) == set(sd)
    for k, t in sd.items():
        assert_same(got[k], t)
    # fastsoup reads it back in the order it was given; the header is padded to 8 bytes
    check_ckpt(fastsoup.open_checkpoint(str(p)), sd, list(sd))
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert n % 8 == 0
    assert os.listdir(tmp_path / "out") == ["soup.safetensors"]


def test_save_metadata_and_inputs(tmp_path):
    gen = torch.Generator().manual_seed(15)
    sd = {"b": rand_tensor(torch.float32, (3,), gen), "a": rand_tensor(torch.int8, (2, 2), gen)}
    p = tmp_path / "m.safetensors"
    fastsoup.save(sd, str(p), metadata={"format": "pt", "soup": "uniform"})
    got, meta = read_st(p)
    assert meta == {"format": "pt", "soup": "uniform"}
    assert fastsoup.open_checkpoint(str(p)).metadata == {"format": "pt", "soup": "uniform"}
    # an iterable of pairs (a generator), numpy arrays, non-contiguous tensors, with fsync
    q = tmp_path / "g.safetensors"
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    nc = torch.arange(6, dtype=torch.float64).reshape(2, 3).t()
    fastsoup.save(((k, v) for k, v in [("arr", arr), ("nc", nc)]), q, fsync=True)
    got, _ = read_st(q)
    assert_same(got["arr"], torch.from_numpy(arr))
    assert_same(got["nc"], nc.contiguous())
    assert list(fastsoup.open_checkpoint(str(q))) == ["arr", "nc"]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        fastsoup.save([("a", torch.zeros(1)), ("a", torch.zeros(1))], tmp_path / "d.safetensors")
    with pytest.raises(TypeError):
        fastsoup.save([["a", torch.zeros(1)]], tmp_path / "e.safetensors")
    with pytest.raises(FastsoupError, match="'c'"):
        fastsoup.save({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.safetensors")
    assert os.listdir(tmp_path) == []


def _sharded_sd(n=10, numel=100):
    gen = torch.Generator().manual_seed(16)
    return {f"layer.{i}.weight": rand_tensor(torch.float32, (numel,), gen) for i in range(n)}


def _check_sharded_output(folder, sd, n_shards, limit):
    files = sorted(os.listdir(folder))
    shard_names = [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    assert files == sorted(shard_names + [INDEX, MANIFEST])
    manifest = json.loads((folder / MANIFEST).read_text())  # what fastsoup wrote there, with the sizes
    assert manifest["files"] == {n: os.path.getsize(folder / n) for n in shard_names + [INDEX]}
    index = json.loads((folder / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    seen = {}
    for name in shard_names:
        got, meta = read_st(folder / name)
        assert meta == {"format": "pt"}
        assert {k for k, v in index["weight_map"].items() if v == name} == set(got)
        data = sum(nbytes(t) for t in got.values())
        assert data <= limit or len(got) == 1
        for k, t in got.items():
            seen[k] = t
    assert set(seen) == set(sd)
    for k, t in sd.items():
        assert_same(seen[k], t)
    ckpt = fastsoup.open_checkpoint(str(folder))
    check_ckpt(ckpt, sd, list(sd))
    return index


@pytest.mark.parametrize("shard_size", ["1KB", 1000, "1000", "1 kb", "0.001MB"])
def test_save_sharded(tmp_path, shard_size):
    sd = _sharded_sd()  # 10 x 400 bytes: two per 1000-byte shard
    out = tmp_path / "soup"
    assert fastsoup.save(sd, out, shard_size=shard_size) == os.fspath(out)
    _check_sharded_output(out, sd, 5, 1000)
    assert no_temp_files(tmp_path)


def test_save_sharded_kib_and_single_shard(tmp_path):
    sd = _sharded_sd()
    fastsoup.save(sd, tmp_path / "kib", shard_size="1KiB")  # 1024 bytes: still two per shard
    _check_sharded_output(tmp_path / "kib", sd, 5, 1024)
    fastsoup.save(sd, tmp_path / "one")  # a folder without shard_size: one shard
    _check_sharded_output(tmp_path / "one", sd, 1, 10**9)
    fastsoup.save(sd, tmp_path / "fs", shard_size="2KB", fsync=True)
    _check_sharded_output(tmp_path / "fs", sd, 2, 2000)


def test_save_big_tensor_gets_own_shard(tmp_path):
    gen = torch.Generator().manual_seed(17)
    sd = {
        "small.0": rand_tensor(torch.float32, (100,), gen),  # 400 B
        "big": rand_tensor(torch.float32, (1000,), gen),  # 4000 B > shard_size
        "small.1": rand_tensor(torch.float16, (100,), gen),  # 200 B
        "small.2": rand_tensor(torch.float16, (100,), gen),  # 200 B
    }
    out = tmp_path / "soup"
    fastsoup.save(sd, out, shard_size="1KB")
    index = _check_sharded_output(out, sd, 3, 1000)
    wm = index["weight_map"]
    assert wm["small.0"] == "model-00001-of-00003.safetensors"
    assert wm["big"] == "model-00002-of-00003.safetensors"
    assert wm["small.1"] == wm["small.2"] == "model-00003-of-00003.safetensors"


def test_save_copies_and_reshards_checkpoints(tmp_path):
    sd = make_sd(18)
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src), metadata={"format": "pt", "origin": "test"})
    ckpt = fastsoup.open_checkpoint(str(src))
    order = st_file_order(src)
    # file -> file: bit exact, same order, metadata kept
    fastsoup.save(ckpt, tmp_path / "copy.safetensors")
    copy = fastsoup.open_checkpoint(str(tmp_path / "copy.safetensors"))
    check_ckpt(copy, sd, order)
    assert copy.metadata == {"format": "pt", "origin": "test"}
    assert (tmp_path / "copy.safetensors").read_bytes()[8:] != b""  # sanity
    # file -> sharded folder -> file
    fastsoup.save(ckpt, tmp_path / "sharded", shard_size=200)
    sharded = fastsoup.open_checkpoint(str(tmp_path / "sharded"))
    check_ckpt(sharded, sd, order)
    assert len(sharded.files) > 2
    fastsoup.save(sharded, tmp_path / "back.safetensors")
    check_ckpt(fastsoup.open_checkpoint(str(tmp_path / "back.safetensors")), sd, order)
    # in-memory and torch-file checkpoints too
    torch.save({"state_dict": sd}, str(tmp_path / "t.pt"))
    fastsoup.save(fastsoup.open_checkpoint(str(tmp_path / "t.pt")), tmp_path / "from_pt.safetensors")
    check_ckpt(fastsoup.open_checkpoint(str(tmp_path / "from_pt.safetensors")), sd, list(sd))
    assert read_st(tmp_path / "from_pt.safetensors")[1] == {"format": "pt"}
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_save_refuses_existing_target(tmp_path, kind):
    sd = _sharded_sd(4)
    target = tmp_path / ("t.safetensors" if kind == "file" else "t")
    fastsoup.save(sd, target, shard_size=1000)
    before = tree_bytes(target)
    with pytest.raises(OutputExistsError) as ei:
        fastsoup.save({"x": torch.ones(3)}, target, shard_size=1000)
    assert isinstance(ei.value, FileExistsError)
    assert str(target) in str(ei.value)
    assert tree_bytes(target) == before
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_save_overwrite_replaces(tmp_path, kind):
    old = _sharded_sd(6)
    new = {"fresh": torch.arange(5, dtype=torch.int16), "w": torch.full((3,), 2.5, dtype=torch.bfloat16)}
    target = tmp_path / ("t.safetensors" if kind == "file" else "t")
    fastsoup.save(old, target, shard_size=1000)  # a folder: 3 shards
    fastsoup.save(new, target, overwrite=True)  # a folder: 1 shard; the old shards are gone
    if kind == "file":
        got, _ = read_st(target)
        assert set(got) == set(new)
    else:
        assert sorted(os.listdir(target)) == sorted([INDEX, MANIFEST, "model-00001-of-00001.safetensors"])
    check_ckpt(fastsoup.open_checkpoint(str(target)), new, list(new))
    assert sorted(os.listdir(tmp_path)) == [target.name]


def test_save_overwrite_file_with_folder_and_back(tmp_path):
    a = {"a": torch.arange(4, dtype=torch.float32)}
    b = {"b": torch.arange(3, dtype=torch.int64)}
    target = tmp_path / "x"
    target.write_bytes(b"old file")
    fastsoup.save(a, target, overwrite=True)
    assert target.is_dir()
    check_ckpt(fastsoup.open_checkpoint(str(target)), a, ["a"])
    target2 = tmp_path / "y.safetensors"
    target2.mkdir()
    (target2 / "junk").write_text("junk")
    with pytest.raises(fastsoup.UnsafeOutputError, match="'junk', which fastsoup did not write"):
        fastsoup.save(b, target2, overwrite=True)  # the user's file is never deleted
    assert (target2 / "junk").read_text() == "junk"
    (target2 / "junk").unlink()
    fastsoup.save(b, target2, overwrite=True)  # an empty folder holds nothing of anyone's
    assert target2.is_file()
    check_ckpt(fastsoup.open_checkpoint(str(target2)), b, ["b"])
    assert no_temp_files(tmp_path)


def test_save_over_its_own_mapped_input_file(tmp_path):
    sd = make_sd(19)
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    order = st_file_order(p)
    ckpt = fastsoup.open_checkpoint(str(p))
    # the checkpoint itself, written over its own file
    fastsoup.save(ckpt, p, overwrite=True)
    check_ckpt(fastsoup.open_checkpoint(str(p)), sd, order)
    # a dict of tensors read from it, one of them changed
    ckpt = fastsoup.open_checkpoint(str(p))
    changed = {n: ckpt.tensor(n) for n in ckpt}
    key = next(n for n in order if n.startswith("z") and n.endswith("float32"))
    changed[key] = changed[key] * 2 + 1
    fastsoup.save(changed, p, overwrite=True)
    check_ckpt(fastsoup.open_checkpoint(str(p)), changed, list(changed))
    # the checkpoint opened before the overwrite still reads the old data (it maps the old inode)
    check_ckpt(ckpt, sd, order)
    assert no_temp_files(tmp_path)


def test_save_over_its_own_mapped_input_folder(tmp_path):
    sd = make_sd(20)
    folder = tmp_path / "hf"
    fastsoup.save(sd, folder, shard_size=150)
    ckpt = fastsoup.open_checkpoint(str(folder))
    n_before = len(ckpt.files)
    assert n_before > 2
    before = tree_bytes(folder)
    # A folder that holds an input is never replaced (the rule that keeps `-o runs` from deleting
    # runs/*.safetensors): resharding in place is refused; reshard elsewhere, then move.
    with pytest.raises(fastsoup.UnsafeOutputError, match="holds the input"):
        fastsoup.save(ckpt, folder, shard_size="1MB", overwrite=True)
    assert tree_bytes(folder) == before
    fastsoup.save(ckpt, tmp_path / "resharded", shard_size="1MB")
    again = fastsoup.open_checkpoint(str(tmp_path / "resharded"))
    assert len(again.files) == 1
    check_ckpt(again, sd, list(sd))
    changed = {n: again.tensor(n) for n in again}
    key = "z9.layer.float16"
    changed[key] = -changed[key]
    fastsoup.save(changed, folder, shard_size=300, overwrite=True)
    check_ckpt(fastsoup.open_checkpoint(str(folder)), changed, list(changed))
    check_ckpt(ckpt, sd, list(sd))  # old mappings still valid
    assert sorted(os.listdir(tmp_path)) == ["hf", "resharded"]


def test_save_numpy_big_endian(tmp_path):
    a = np.arange(5, dtype=">f4")
    p = tmp_path / "be.safetensors"
    fastsoup.save({"a": a}, p)
    got, _ = read_st(p)
    assert got["a"].tolist() == a.tolist()


def test_save_tensor_named_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    try:
        fastsoup.save({"__metadata__": torch.ones(2)}, p)
    except (ValueError, FastsoupError):
        assert not p.exists()
        return
    ckpt = fastsoup.open_checkpoint(str(p))  # raises CheckpointError today
    assert_same(ckpt.tensor("__metadata__"), torch.ones(2))


# ---------------------------------------------------------------------------------------------------
# 6. atomicity


class _FailingCore:
    """Stands in for the pybind11 module ``fastsoup._core`` in the writer: ``pwrite`` raises on its
    ``fail_on``-th call, everything else is forwarded."""

    def __init__(self, real, fail_on=2, exc=None):
        self._real = real
        self.fail_on = fail_on
        self.exc = exc if exc is not None else OSError(28, "injected: no space left on device")
        self.calls = 0
        self.whats = []

    def pwrite(self, *args, **kwargs):
        self.calls += 1
        self.whats.append(args[4] if len(args) > 4 else kwargs.get("what"))
        if self.calls == self.fail_on:
            raise self.exc
        return self._real.pwrite(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("exc", [OSError(28, "injected"), RuntimeError("injected"), KeyboardInterrupt()],
                         ids=["OSError", "RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_new_target(tmp_path, monkeypatch, kind, exc):
    sd = _sharded_sd(6)
    target = tmp_path / ("t.safetensors" if kind == "file" else "t")
    fake = _FailingCore(writer_mod._core, exc=exc)
    monkeypatch.setattr(writer_mod, "_core", fake)
    with pytest.raises(type(exc)):
        fastsoup.save(sd, target, shard_size=1000)
    assert fake.calls == 2
    assert not os.path.lexists(target)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_existing_target_with_overwrite(tmp_path, monkeypatch, kind):
    old = _sharded_sd(4, numel=50)
    target = tmp_path / ("t.safetensors" if kind == "file" else "t")
    fastsoup.save(old, target, shard_size=500)
    before = tree_bytes(target)
    fake = _FailingCore(writer_mod._core)
    monkeypatch.setattr(writer_mod, "_core", fake)
    with pytest.raises(OSError, match="injected"):
        fastsoup.save(_sharded_sd(6), target, shard_size=1000, overwrite=True)
    assert fake.calls == 2
    assert tree_bytes(target) == before
    assert os.listdir(tmp_path) == [target.name]
    monkeypatch.undo()
    check_ckpt(fastsoup.open_checkpoint(str(target)), old, list(old))


def test_atomic_failure_while_writing_the_index(tmp_path, monkeypatch):
    sd = _sharded_sd(4)
    target = tmp_path / "t"
    real = writer_mod.AtomicOutput._write_in_tmp

    def boom(self, name, data):
        if name == INDEX:
            raise OSError(5, "injected index failure")
        return real(self, name, data)

    monkeypatch.setattr(writer_mod.AtomicOutput, "_write_in_tmp", boom)
    with pytest.raises(OSError, match="injected index failure"):
        fastsoup.save(sd, target, shard_size=1000)
    assert os.listdir(tmp_path) == []


def test_pwrite_is_told_the_shard_path_for_folders(tmp_path, monkeypatch):
    fake = _FailingCore(writer_mod._core, fail_on=-1)
    monkeypatch.setattr(writer_mod, "_core", fake)
    fastsoup.save(_sharded_sd(4), tmp_path / "f", shard_size=1000)
    assert fake.whats == [os.path.join(str(tmp_path / "f"), f"model-0000{i}-of-00002.safetensors") for i in (1, 1, 2, 2)]


def test_pwrite_is_told_the_file_path_for_single_files(tmp_path, monkeypatch):
    fake = _FailingCore(writer_mod._core, fail_on=-1)
    monkeypatch.setattr(writer_mod, "_core", fake)
    p = str(tmp_path / "one.safetensors")
    fastsoup.save(_sharded_sd(2), p)
    assert fake.whats == [p, p]


# ---------------------------------------------------------------------------------------------------
# 7. parse_size


@pytest.mark.parametrize(
    "text, value",
    [
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1KB", 1000),
        ("1kib", 1024),
        ("3TB", 3 * 10**12),
        ("1TiB", 2**40),
        (" 7 mib ", 7 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        ("10B", 10),
        (123, 123),
        (5_000_000_000, 5_000_000_000),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "5 XB", "five", "-5MB", "0", "0GB", "5G B", "1e9", 0, -3, True, None, "5GBs"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("text, value", [("2.01KB", 2010), ("1.005KB", 1005)])
def test_parse_size_decimal_exact(text, value):
    assert parse_size(text) == value


# ---------------------------------------------------------------------------------------------------
# 8. the native extension


def test_native_extension_is_loaded():
    assert fastsoup._core.__file__.endswith(".so")
    info = fastsoup.native_info()
    assert info["isa"] in ("scalar", "avx2", "avx512")
    assert info["isa"] in info["supported_isas"]
    assert info["version"] == fastsoup._core.__version__
    assert isinstance(info["threads"], int) and info["threads"] >= 1
