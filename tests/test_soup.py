"""fastsoup.Soup against the plain-torch oracle ``_reference.soup_state_dict``, bit for bit: over ingredient,
template and model dtypes, odd and empty shapes, every kind of source; candidate/accept, remove, weights,
in-place loads (also into non-contiguous parameters), saving, reads of the mapped files, and errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastsoup
from fastsoup import _reference
from conftest import bits_equal

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


class Net(nn.Module):
    """Odd sizes (1, 7, 4097), an empty parameter, a 0-dim float buffer and BatchNorm (int64
    num_batches_tracked), all float tensors in ``dtype``."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(7, 3)
        self.bn = nn.BatchNorm1d(3)
        self.big = nn.Parameter(torch.zeros(4097))
        self.one = nn.Parameter(torch.zeros(1))
        self.empty = nn.Parameter(torch.zeros(0, 5))
        self.register_buffer("scalar", torch.zeros(()))
        self.to(dtype)


def random_state(seed, dtype=torch.float32) -> dict:
    """A state dict of Net with random float values (in ``dtype``) and num_batches_tracked = 100 + seed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in Net().state_dict().items():
        if t.is_floating_point():
            out[name] = torch.randn(t.shape, generator=g).to(dtype)
        else:
            out[name] = torch.full_like(t, 100 + seed)
    return out


def module_with(sd) -> Net:
    dtype = next(t.dtype for t in sd.values() if t.is_floating_point())
    m = Net(dtype)
    m.load_state_dict(sd)
    return m


def as_source(sd, kind, folder, i):
    if kind == "file":
        path = os.path.join(folder, f"ing{i}.safetensors")
        save_file(sd, path, metadata={"format": "pt"})
        return path
    if kind == "sharded":
        path = os.path.join(folder, f"ing{i}")
        fastsoup.save(sd, path, shard_size=6000)
        return path
    if kind == "memory":
        return sd
    if kind == "module":
        return module_with(sd)
    raise AssertionError(kind)


def float_bytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values() if t.is_floating_point())


def assert_state_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert bits_equal(got[name], expected[name]), name


def assert_close(got, expected, rtol=1e-6, atol=1e-6):
    # (torch.testing.assert_close imports torch._dynamo on first use: a second of the suite)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=rtol, atol=atol), (got - expected).abs().max()


def model_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- add / value against the oracle -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "sharded", "memory", "module"])
@pytest.mark.parametrize("template", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("ingredients", ["f16", "bf16", "f32", "mixed"])
def test_value_matches_reference(tmp_path, ingredients, template, kind):
    dts = [DTYPES[ingredients]] if ingredients != "mixed" else [torch.float16, torch.bfloat16, torch.float32]
    sds = [random_state(i, dts[i % len(dts)]) for i in range(4)]
    sources = [as_source(sd, kind, str(tmp_path), i) for i, sd in enumerate(sds)]
    model = Net(DTYPES[template])
    soup = fastsoup.Soup.like(model)
    for src in sources:
        assert soup.add(src) is soup
    assert len(soup) == 4 and soup.total_weight == 4.0
    got = soup.value()
    assert list(got) == list(model.state_dict())  # the template's order
    expected = _reference.soup_state_dict(sds, model.state_dict())
    assert_state_equal(got, expected)
    assert got["bn.num_batches_tracked"].item() == 100  # integer buffers from the first ingredient
    assert got["empty"].shape == (0, 5) and got["scalar"].shape == ()
    # load_into writes the same bits (the default target is the template module)
    assert soup.load_into() is model
    assert_state_equal(model_state(model), expected)


def test_value_with_a_file_template_and_dtype_override(tmp_path):
    sds = [random_state(i, torch.bfloat16) for i in range(3)]
    paths = [as_source(sd, "file", str(tmp_path), i) for i, sd in enumerate(sds)]
    soup = fastsoup.Soup.like(paths[0])
    for p in paths:
        soup.add(p)
    assert list(soup.value()) == list(fastsoup.open_checkpoint(paths[0]))  # the file's order
    assert_state_equal(soup.value(), _reference.soup_state_dict(sds, sds[0]))
    like32 = {k: (v.float() if v.is_floating_point() else v) for k, v in sds[0].items()}
    assert_state_equal(soup.value(dtype="fp32"), _reference.soup_state_dict(sds, like32))
    like16 = {k: (v.half() if v.is_floating_point() else v) for k, v in sds[0].items()}
    assert_state_equal(soup.value(dtype=torch.float16), _reference.soup_state_dict(sds, like16))


def test_every_isa_gives_the_same_bits(isa):
    sds = [random_state(i, torch.float16) for i in range(5)]
    model = Net(torch.bfloat16)
    soup = fastsoup.Soup.like(model)
    for sd in sds[:4]:
        soup.add(sd)
    assert_state_equal(soup.value(), _reference.soup_state_dict(sds[:4], model.state_dict()))
    soup.candidate(sds[4])
    expected = _reference.soup_state_dict(sds, model.state_dict())
    got = model_state(model)
    for name, t in expected.items():
        if t.is_floating_point():
            assert bits_equal(got[name], t), name


def test_load_into_casts_to_the_model_dtypes(tmp_path):
    sds = [random_state(i, torch.float32) for i in range(3)]
    soup = fastsoup.Soup.like(sds[0])  # an fp32 template without a module
    for sd in sds:
        soup.add(sd)
    for dtype in (torch.float16, torch.bfloat16):
        model = Net(dtype)
        assert soup.load_into(model) is model
        assert_state_equal(model_state(model), _reference.soup_state_dict(sds, model.state_dict()))


def test_one_ingredient_is_itself():
    sd = random_state(0, torch.bfloat16)
    soup = fastsoup.Soup.like(sd).add(sd)
    assert_state_equal(soup.value(), sd)


# --- candidate / accept --------------------------------------------------------------------------------


def test_candidate_loads_the_candidate_soup_and_leaves_the_soup_unchanged(tmp_path):
    sds = [random_state(i, torch.float16) for i in range(4)]
    paths = [as_source(sd, "file", str(tmp_path), i) for i, sd in enumerate(sds)]
    model = Net(torch.float32)
    soup = fastsoup.Soup.like(model).add(paths[0]).add(paths[1])
    before = soup.value()
    for j in (2, 3):  # a second candidate replaces the first
        assert soup.candidate(paths[j]) is None
        expected = _reference.soup_state_dict([sds[0], sds[1], sds[j]], model.state_dict())
        got = model_state(model)
        for name, t in expected.items():
            if t.is_floating_point():
                assert bits_equal(got[name], t), name
        assert_state_equal(soup.value(), before)  # the soup itself did not change
        assert len(soup) == 2 and soup.total_weight == 2.0
    assert soup.accept() is soup  # keeps the last candidate (paths[3])
    assert len(soup) == 3 and soup.total_weight == 3.0
    assert [src for src, _ in soup.ingredients] == [paths[0], paths[1], paths[3]]
    assert_state_equal(soup.value(), _reference.soup_state_dict([sds[0], sds[1], sds[3]], model.state_dict()))
    # and the next candidate starts from the accepted sum
    soup.candidate(paths[2])
    soup.accept()
    assert_state_equal(soup.value(), _reference.soup_state_dict([sds[0], sds[1], sds[3], sds[2]], model.state_dict()))


def test_candidate_writes_integer_buffers_too():
    sds = [random_state(i) for i in range(3)]
    model = Net()  # num_batches_tracked == 0, the ingredients' are 100, 101, 102
    soup = fastsoup.Soup.like(model).add(sds[0]).add(sds[1])
    soup.candidate(sds[2])
    assert_state_equal(model_state(model), _reference.soup_state_dict(sds, model.state_dict()))


def test_candidate_into_another_model_and_with_a_weight(tmp_path):
    sds = [random_state(i, torch.float32) for i in range(3)]
    soup = fastsoup.Soup.like(sds[0]).add(sds[0]).add(sds[1])
    with pytest.raises(ValueError, match="no model"):
        soup.candidate(sds[2])  # made from a state dict: no default target
    model = Net(torch.float32)
    soup.candidate(sds[2], model, weight=2.0)
    expected = {k: (sds[0][k] + sds[1][k] + 2 * sds[2][k]) / 4 for k in sds[0] if sds[0][k].is_floating_point()}
    got = model_state(model)
    for name, t in expected.items():
        assert_close(got[name], t, rtol=1e-6, atol=1e-6)
    soup.accept()
    assert soup.total_weight == 4.0 and soup.ingredients[-1][1] == 2.0
    for name, t in expected.items():
        assert_close(soup.value()[name], t, rtol=1e-6, atol=1e-6)


def test_accept_needs_a_pending_candidate():
    sds = [random_state(i) for i in range(3)]
    model = Net()
    soup = fastsoup.Soup.like(model)
    with pytest.raises(fastsoup.FastsoupError, match="no candidate pending"):
        soup.accept()
    soup.add(sds[0])
    with pytest.raises(fastsoup.FastsoupError, match="no candidate pending"):
        soup.accept()
    soup.candidate(sds[1])
    soup.accept()
    with pytest.raises(fastsoup.FastsoupError, match="no candidate pending"):
        soup.accept()  # accepted once only
    soup.candidate(sds[2])
    soup.add(sds[2])  # add discards the pending candidate
    with pytest.raises(fastsoup.FastsoupError, match="no candidate pending"):
        soup.accept()
    soup.candidate(sds[1])
    soup.remove(sds[2])  # and so does remove
    with pytest.raises(fastsoup.FastsoupError, match="no candidate pending"):
        soup.accept()
    assert len(soup) == 2


def test_candidate_on_an_empty_soup_or_with_zero_total_weight():
    sds = [random_state(i) for i in range(2)]
    model = Net()
    soup = fastsoup.Soup.like(model)
    with pytest.raises(fastsoup.FastsoupError, match="empty"):
        soup.candidate(sds[0])
    soup.add(sds[0])
    with pytest.raises(ValueError, match="sum to zero"):
        soup.candidate(sds[1], weight=-1.0)
    with pytest.raises(fastsoup.FastsoupError, match="no candidate pending"):
        soup.accept()


# --- remove, weights -----------------------------------------------------------------------------------


def test_remove_takes_an_ingredient_out(tmp_path):
    # Not bit-exact: the sum is ((a + b) + c) - b, whose float32 roundings (each addition rounds to the
    # nearest float32, and fp32 addition is not associative) differ from those of a + c.
    sds = [random_state(i, torch.float32) for i in range(3)]
    paths = [as_source(sd, "file", str(tmp_path), i) for i, sd in enumerate(sds)]
    soup = fastsoup.Soup.like(paths[0])
    for p in paths:
        soup.add(p)
    assert soup.remove(paths[1]) is soup
    assert soup.ingredients == [(paths[0], 1.0), (paths[2], 1.0)] and soup.total_weight == 2.0
    expected = _reference.soup_state_dict([sds[0], sds[2]], sds[0])
    got = soup.value()
    for name, t in expected.items():
        if t.is_floating_point():
            assert_close(got[name], t, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[name], t)


def test_removing_the_first_ingredient_takes_its_integer_buffers_out():
    sds = [random_state(i) for i in range(3)]
    soup = fastsoup.Soup.like(sds[0]).add(sds[0]).add(sds[1]).add(sds[2])
    soup.remove(sds[0])
    assert soup.value()["bn.num_batches_tracked"].item() == 101  # as in soup_state_dict([sds[1], sds[2]])


def test_remove_takes_out_the_ingredient_given_not_another_with_the_same_label(tmp_path):
    # Every in-memory ingredient is labelled "<state dict>": remove(B) must take out B, not the first
    # record with B's label (A's), whose integer tensors the soup keeps.
    a, b = random_state(0), random_state(1)
    soup = fastsoup.Soup.like(a).add(a).add(b)
    soup.remove(b)
    assert soup.ingredients == [("<state dict>", 1.0)] and soup.total_weight == 1.0
    got = soup.value()
    assert got["bn.num_batches_tracked"].item() == 100  # A's, as in soup_state_dict([a])
    for name, t in a.items():
        if t.is_floating_point():
            assert_close(got[name], t, rtol=1e-6, atol=1e-6)  # ((0 + a) + b) - b: a up to float32 roundings
    # an accepted candidate and a module are matched by identity too; a file by its identity
    m = module_with(random_state(2))
    path = as_source(random_state(3), "file", str(tmp_path), 3)
    soup = fastsoup.Soup.like(a).add(a).add(m).add(path)
    soup.candidate(b, Net())
    soup.accept()
    soup.remove(b).remove(m).remove(os.path.join(str(tmp_path), ".", "ing3.safetensors"))
    assert soup.ingredients == [("<state dict>", 1.0)] and soup.value()["bn.num_batches_tracked"].item() == 100


def test_remove_of_an_ingredient_not_in_the_soup_is_refused_before_any_change():
    a, b = random_state(0), random_state(1)
    soup = fastsoup.Soup.like(a).add(a).add(b, 0.5)
    before = soup.value()
    with pytest.raises(fastsoup.ArgumentError, match="not in the soup"):
        soup.remove(random_state(2))  # equal to no ingredient (another object)
    with pytest.raises(fastsoup.ArgumentError, match="weight 0.5"):
        soup.remove(b)  # added with weight 0.5, not 1.0
    assert len(soup) == 2 and soup.total_weight == 1.5
    assert_state_equal(soup.value(), before)
    soup.remove(b, 0.5)
    assert soup.ingredients == [("<state dict>", 1.0)]


def test_remove_everything_then_add_again():
    sds = [random_state(i) for i in range(2)]
    soup = fastsoup.Soup.like(sds[0]).add(sds[0])
    soup.remove(sds[0])
    assert len(soup) == 0 and soup.total_weight == 0.0
    with pytest.raises(fastsoup.FastsoupError, match="empty"):
        soup.value()
    soup.add(sds[1])  # x + (-x) is exactly +0: the soup is exactly sds[1], integers from it too
    assert_state_equal(soup.value(), sds[1])


def test_weighted_add():
    sds = [random_state(i, torch.float32) for i in range(2)]
    soup = fastsoup.Soup.like(sds[0]).add(sds[0], 2.0).add(sds[1], weight=0.5)
    assert soup.total_weight == 2.5 and soup.ingredients == [("<state dict>", 2.0), ("<state dict>", 0.5)]
    got = soup.value()
    for name, t in sds[0].items():
        if t.is_floating_point():
            assert_close(got[name], (2.0 * t + 0.5 * sds[1][name]) / 2.5, rtol=1e-6, atol=1e-6)
    soup.remove(sds[1], weight=0.5)
    assert soup.ingredients == [("<state dict>", 2.0)]
    for name, t in sds[0].items():
        if t.is_floating_point():
            assert_close(soup.value()[name], t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "heavy", None])
def test_bad_weights_are_refused_before_any_change(bad):
    sds = [random_state(i) for i in range(2)]
    model = Net()
    soup = fastsoup.Soup.like(model).add(sds[0])
    before = soup.value()
    with pytest.raises(ValueError, match="weight must be"):
        soup.add(sds[1], bad)
    with pytest.raises(ValueError, match="weight must be"):
        soup.remove(sds[0], bad)
    with pytest.raises(ValueError, match="weight must be"):
        soup.candidate(sds[1], weight=bad)
    assert len(soup) == 1 and soup.total_weight == 1.0
    assert_state_equal(soup.value(), before)


def test_zero_total_weight_is_refused(tmp_path):
    sds = [random_state(i) for i in range(2)]
    model = Net()
    soup = fastsoup.Soup.like(model).add(sds[0]).add(sds[1], -1.0)
    for call in (soup.value, soup.load_into, lambda: soup.save(tmp_path / "s.safetensors")):
        with pytest.raises(fastsoup.FastsoupError, match="sum to zero"):
            call()
    soup = fastsoup.Soup.like(model).add(sds[0], 0.0)
    with pytest.raises(fastsoup.FastsoupError, match="sum to zero"):
        soup.value()
    assert not (tmp_path / "s.safetensors").exists()


def test_empty_soup_is_refused(tmp_path):
    model = Net()
    soup = fastsoup.Soup.like(model)
    assert len(soup) == 0 and "0 ingredients" in repr(soup)
    for what, call in (("take its value", soup.value), ("load it", soup.load_into),
                       ("save it", lambda: soup.save(tmp_path / "s.safetensors"))):
        with pytest.raises(fastsoup.FastsoupError, match=f"the soup is empty: add an ingredient before you {what}"):
            call()
    assert not (tmp_path / "s.safetensors").exists()


def test_constructor_arguments():
    sds = [random_state(i) for i in range(2)]
    if bool(fastsoup._core.cuda_compiled) and fastsoup._core.cuda_device_count() > 0:
        gpu = fastsoup.Soup(Net(), device="cuda").add(sds[0]).add(sds[1])
        assert gpu.device.is_cuda
        assert_state_equal({k: v.cpu() for k, v in gpu.value().items()}, _reference.soup_state_dict(sds, Net().state_dict()))
    else:
        with pytest.raises(ValueError, match="device='cuda'"):
            fastsoup.Soup(Net(), device="cuda")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads"):
            fastsoup.Soup(Net(), threads=bad)
    soup = fastsoup.Soup(Net(), threads=1).add(sds[0]).add(sds[1])
    assert_state_equal(soup.value(), _reference.soup_state_dict(sds, Net().state_dict()))


# --- in-place loads ------------------------------------------------------------------------------------


def test_load_into_writes_in_place(tmp_path):
    sds = [random_state(i, torch.bfloat16) for i in range(3)]
    paths = [as_source(sd, "file", str(tmp_path), i) for i, sd in enumerate(sds)]
    model = Net(torch.float16)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    ptrs = {n: t.data_ptr() for n, t in {**params, **buffers}.items() if t.numel()}
    soup = fastsoup.Soup.like(model)
    for p in paths:
        soup.add(p)
    soup.load_into()
    assert {n: t.data_ptr() for n, t in {**params, **buffers}.items() if t.numel()} == ptrs
    assert all(a is b for a, b in zip(params.values(), model.parameters()))
    assert_state_equal(model_state(model), _reference.soup_state_dict(sds, model.state_dict()))
    assert model.bn.num_batches_tracked.item() == 100
    soup.candidate(paths[0])
    assert {n: t.data_ptr() for n, t in {**params, **buffers}.items() if t.numel()} == ptrs


class Transposed(nn.Module):
    """A parameter that is a transposed view (not contiguous), as in tied or re-laid-out weights."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(6, 8).t())  # shape (8, 6), strides (1, 8)
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_load_into_a_non_contiguous_parameter():
    g = torch.Generator().manual_seed(0)
    sds = [{"weight": torch.randn(8, 6, generator=g), "bias": torch.randn(6, generator=g)} for _ in range(3)]
    model = Transposed()
    assert not model.state_dict()["weight"].is_contiguous()
    ptr = model.weight.data_ptr()
    soup = fastsoup.Soup.like(model).add(sds[0]).add(sds[1])
    soup.load_into()
    assert model.weight.data_ptr() == ptr and not model.weight.is_contiguous()
    assert_state_equal(model_state(model), _reference.soup_state_dict(sds[:2], model.state_dict()))
    x = torch.randn(2, 8, generator=g)
    expected = _reference.soup_state_dict(sds[:2], model.state_dict())
    assert_close(model(x), x @ expected["weight"] + expected["bias"])
    soup.candidate(sds[2])  # the staging buffer is reused
    assert model.weight.data_ptr() == ptr
    assert_state_equal(model_state(model), _reference.soup_state_dict(sds, model.state_dict()))
    # a non-contiguous ingredient reads through a contiguous copy
    other = Transposed()
    other.load_state_dict(sds[2])
    soup.candidate(other)
    assert_state_equal(model_state(model), _reference.soup_state_dict(sds, model.state_dict()))


# --- save ----------------------------------------------------------------------------------------------


def test_save_single_file(tmp_path):
    sds = [random_state(i, torch.float16) for i in range(3)]
    model = Net(torch.bfloat16)
    soup = fastsoup.Soup.like(model)
    for sd in sds:
        soup.add(sd)
    out = tmp_path / "soup.safetensors"
    assert soup.save(out) == os.fspath(out)
    value = soup.value()
    on_disk = load_file(str(out))
    assert_state_equal(on_disk, value)
    assert list(fastsoup.open_checkpoint(out)) == list(model.state_dict())  # template order
    with pytest.raises(fastsoup.OutputExistsError):
        soup.save(out)
    soup.save(out, dtype="fp32", overwrite=True)
    assert_state_equal(load_file(str(out)), soup.value("fp32"))
    like32 = {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    assert_state_equal(load_file(str(out)), _reference.soup_state_dict(sds, like32))
    assert load_file(str(out))["bn.num_batches_tracked"].dtype == torch.int64


def test_save_sharded_folder(tmp_path):
    sds = [random_state(i, torch.float32) for i in range(3)]
    soup = fastsoup.Soup.like(sds[0])
    for sd in sds:
        soup.add(sd)
    out = tmp_path / "soup"
    soup.save(out, shard_size="100B")  # about one tensor per shard
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(shards) >= 3
    index = json.load(open(out / "model.safetensors.index.json"))
    assert sorted(index["weight_map"]) == sorted(sds[0])
    got = fastsoup.open_checkpoint(out)
    value = soup.value()
    for name, t in value.items():
        assert bits_equal(got.tensor(name), t), name


def test_save_follows_the_layout_of_a_sharded_template(tmp_path):
    sds = [random_state(i, torch.bfloat16) for i in range(3)]
    paths = [as_source(sd, "sharded", str(tmp_path), i) for i, sd in enumerate(sds)]
    first_index = json.load(open(os.path.join(paths[0], "model.safetensors.index.json")))
    assert len(set(first_index["weight_map"].values())) > 1
    soup = fastsoup.Soup.like(paths[0])
    for p in paths:
        soup.add(p)
    out = tmp_path / "soup"
    soup.save(out)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert index["weight_map"] == first_index["weight_map"]
    got = fastsoup.open_checkpoint(out)
    assert list(got) == list(fastsoup.open_checkpoint(paths[0]))
    expected = _reference.soup_state_dict(sds, sds[0])
    for name, t in expected.items():
        assert bits_equal(got.tensor(name), t), name


# --- reads ---------------------------------------------------------------------------------------------


def mapped_read():
    return fastsoup._core.counters()["mapped_bytes_read"]


def test_each_ingredient_is_read_once(tmp_path):
    dts = [torch.float16, torch.bfloat16, torch.float32]
    sds = [random_state(i, dts[i % 3]) for i in range(4)]
    paths = [as_source(sd, "file", str(tmp_path), i) for i, sd in enumerate(sds)]
    model = Net()
    soup = fastsoup.Soup.like(model)
    for sd, p in zip(sds[:2], paths[:2]):
        before = mapped_read()
        soup.add(p)
        assert mapped_read() - before == float_bytes(sd)
    for sd, p in zip(sds[2:], paths[2:]):
        before = mapped_read()
        soup.candidate(p)
        assert mapped_read() - before == float_bytes(sd)  # one read of the candidate
        before = mapped_read()
        soup.accept()
        assert mapped_read() - before == 0  # accept reads nothing
    before = mapped_read()
    soup.value()
    soup.load_into()
    soup.save(tmp_path / "soup.safetensors")
    assert mapped_read() - before == 0  # the soup's value comes from its own sum
    assert_state_equal(soup.value(), _reference.soup_state_dict(sds, model.state_dict()))


def test_sharded_ingredient_is_read_once(tmp_path):
    sd = random_state(0, torch.float16)
    path = as_source(sd, "sharded", str(tmp_path), 0)
    soup = fastsoup.Soup.like(path).add(path)
    before = mapped_read()
    soup.candidate(path, Net(torch.float16))
    assert mapped_read() - before == float_bytes(sd)


# --- errors --------------------------------------------------------------------------------------------


def test_mismatched_ingredient_names_the_tensor(tmp_path):
    sds = [random_state(i) for i in range(2)]
    missing = dict(sds[1])
    del missing["bn.running_var"]
    wrong = dict(sds[1])
    wrong["lin.weight"] = torch.zeros(7, 3)
    model = Net()
    soup = fastsoup.Soup.like(model).add(sds[0])
    before = soup.value()
    p_missing = as_source(missing, "file", str(tmp_path), 1)
    p_wrong = as_source(wrong, "file", str(tmp_path), 2)
    for src, what in ((missing, "'bn.running_var'"), (p_missing, "'bn.running_var'"), (wrong, "'lin.weight'"),
                      (p_wrong, "'lin.weight'")):
        for call in (soup.add, soup.remove, soup.candidate):
            with pytest.raises(fastsoup.CheckpointError) as e:
                call(src)
            assert what in str(e.value)
            if isinstance(src, str):
                assert src in str(e.value)
    assert len(soup) == 1
    assert_state_equal(soup.value(), before)  # nothing was added


def test_model_that_does_not_match_the_soup():
    sds = [random_state(i) for i in range(2)]
    soup = fastsoup.Soup.like(sds[0]).add(sds[0])

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(7, 3)

    with pytest.raises(fastsoup.FastsoupError, match="does not match the soup") as e:
        soup.load_into(Small())
    assert "bn.running_var" in str(e.value)
    with pytest.raises(fastsoup.FastsoupError, match="does not match the soup"):
        soup.candidate(sds[1], Small())

    class Wide(Net):
        def __init__(self):
            super().__init__()
            self.big = nn.Parameter(torch.zeros(4096))

    wide = Wide()
    before = model_state(wide)
    with pytest.raises(fastsoup.FastsoupError, match="'big' has shape"):
        soup.load_into(wide)
    assert_state_equal(model_state(wide), before)  # refused before any write

    with pytest.raises(fastsoup.CheckpointError):
        fastsoup.Soup.like(sds[0]).add(Small())  # as an ingredient: a checkpoint mismatch
