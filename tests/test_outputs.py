"""Outputs written as their source's library writes them (issue 20, parts 1, 2 and 7's output side):
a soup of Hugging Face model folders is a model folder that transformers loads back (config with the
soup's dtype, tokenizer, generation config, processors, a model card), a soup of peft adapters is an
adapter folder that peft loads, ``-o x.pt|.pth|.bin`` is a torch state dict, a sharded ``.bin`` input
gives a sharded output, and every soup records its recipe in its safetensors metadata.

Tiny models are built from configs with random weights; nothing is downloaded (``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import fastsoup  # noqa: E402
from fastsoup import _reference  # noqa: E402
from fastsoup.cli import main  # noqa: E402
from fastsoup.io import _sidefiles  # noqa: E402
from fastsoup.io._sidefiles import SoupNote  # noqa: E402

import _tiny  # noqa: E402
from conftest import bits_equal  # noqa: E402

HF = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with _tiny.one_thread():
        yield


def mean_of(folders, name="model.safetensors", dtype=None, weights=None):
    """What fastsoup computes (fp32 sums in its documented order, one rounding), from the files."""
    sds = [load_file(os.path.join(f, name)) for f in folders]
    return _reference.average_state_dicts(sds, weights, dtype)


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def manifest(folder):
    return json.loads((folder / ".fastsoup.json").read_text())["files"]


def leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n]


def perturbed(model, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------------------------------
# Tiny Hugging Face models


@pytest.fixture(scope="module")
def transformers():
    import transformers  # the clients extra: installed by make setup (CI), never skipped

    return transformers


@pytest.fixture(scope="module")
def llama(tmp_path_factory, transformers):
    """Three "fine-tunes" of a tiny Llama, saved with save_pretrained, with a tokenizer (built with
    the tokenizers library), a chat template and a generation config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=1, eos_token_id=2)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("the a soup of models is good".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    folders = []
    for i in range(3):
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        perturbed(m, 10 + i)
        d = root / f"ft{i}"
        m.save_pretrained(d)
        fast.save_pretrained(d)
        m.generation_config.max_new_tokens = 7
        m.generation_config.save_pretrained(d)
        folders.append(str(d))
    return folders


@pytest.fixture(scope="module")
def vit(tmp_path_factory, transformers):
    root = tmp_path_factory.mktemp("vit")
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4, num_labels=3)
    folders = []
    torch.manual_seed(1)
    for i in range(2):
        d = root / f"ft{i}"
        transformers.ViTForImageClassification(cfg).save_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no torchvision here: the PIL image processor is used
            transformers.ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(d)
        folders.append(str(d))
    return folders


def test_llama_soup_is_a_model_folder_transformers_loads(llama, transformers, tmp_path):
    out = tmp_path / "soup"
    assert fastsoup.average(llama, out=out) == os.fspath(out)
    names = set(os.listdir(out))
    assert names == {*HF, "model.safetensors", "README.md", ".fastsoup.json"}  # one file, as save_pretrained writes
    assert set(manifest(out)) == names - {".fastsoup.json"}  # side files are fastsoup's: an overwrite may replace them
    for name in HF:  # the dtype is already the soup's: every side file is the donor's, byte for byte
        assert (out / name).read_bytes() == open(os.path.join(llama[0], name), "rb").read(), name

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    want = mean_of(llama)
    got = load_file(str(out / "model.safetensors"))
    assert list(got) == list(load_file(os.path.join(llama[0], "model.safetensors")))
    for name, t in want.items():
        assert bits_equal(got[name], t), name
    state = model.state_dict()
    for name, t in want.items():
        assert bits_equal(state[name], t), name

    tok = transformers.AutoTokenizer.from_pretrained(out)
    donor = transformers.AutoTokenizer.from_pretrained(llama[0])
    assert tok("the soup is good")["input_ids"] == donor("the soup is good")["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "soup"}], tokenize=False) == "soup "
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7


def test_llama_soup_in_another_dtype_sets_the_config_dtype(llama, transformers, tmp_path):
    out = tmp_path / "soup16"
    assert main(["average", *llama, "-o", str(out), "--dtype", "fp16", "--no-progress"]) == 0
    donor = open(os.path.join(llama[0], "config.json")).read()
    assert '"dtype": "float32"' in donor
    assert (out / "config.json").read_text() == donor.replace('"dtype": "float32"', '"dtype": "float16"')
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    want = mean_of(llama, dtype=torch.float16)
    state = model.state_dict()
    for name, t in want.items():
        assert bits_equal(state[name], t), name


def test_vit_soup_loads_with_its_image_processor(vit, transformers, tmp_path):
    out = tmp_path / "soup"
    fastsoup.average(vit, out=out, dtype="bf16")
    assert {"config.json", "preprocessor_config.json", "model.safetensors", "README.md"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = transformers.AutoImageProcessor.from_pretrained(out)
    assert proc.size == {"height": 8, "width": 8}
    # transformers 5 renames some ViT keys on load: compare through the library's own loading.
    soup = transformers.AutoModelForImageClassification.from_pretrained(out)
    fts = [transformers.AutoModelForImageClassification.from_pretrained(f).state_dict() for f in vit]
    want = _reference.average_state_dicts(fts, dtype=torch.bfloat16)
    assert soup.dtype == torch.bfloat16
    for name, t in soup.state_dict().items():
        assert bits_equal(t, want[name]), name


# --------------------------------------------------------------------------------------------------
# peft adapters


@pytest.fixture(scope="module")
def lora(tmp_path_factory, transformers):
    import peft  # the clients extra: installed by make setup (CI), never skipped
    root = tmp_path_factory.mktemp("lora")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(2)
    base = transformers.LlamaForCausalLM(cfg)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    folders = []
    for i in range(3):
        torch.manual_seed(100 + i)  # a different random init of the LoRA factors each
        b = transformers.LlamaForCausalLM(cfg)
        b.load_state_dict(base_state)
        pm = peft.get_peft_model(b, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        d = root / f"adapter{i}"
        pm.save_pretrained(d)
        folders.append(str(d))
    return peft, cfg, base_state, folders


def test_peft_adapter_soup_loads_with_peft(lora, transformers, tmp_path, capsys):
    peft, cfg, base_state, folders = lora
    out = tmp_path / "adapter_soup"
    assert main(["average", *folders, "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("fastsoup: note:")]
    assert len(notes) == 1 and "LoRA" in notes[0] and "B·A" in notes[0]
    assert set(os.listdir(out)) == {"adapter_model.safetensors", "adapter_config.json", "README.md", ".fastsoup.json"}
    assert (out / "adapter_config.json").read_bytes() == open(os.path.join(folders[0], "adapter_config.json"), "rb").read()
    assert (out / "README.md").read_bytes() == open(os.path.join(folders[0], "README.md"), "rb").read()  # peft's card
    want = mean_of(folders, "adapter_model.safetensors")
    base = transformers.LlamaForCausalLM(cfg)
    base.load_state_dict(base_state)
    model = peft.PeftModel.from_pretrained(base, out)
    lora_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora_state) == len(want) == 4
    for name, t in want.items():
        loaded = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert bits_equal(lora_state[loaded], t), name


def test_adapter_note_in_the_api_and_no_shards(lora, tmp_path):
    folders = lora[3]
    with pytest.warns(SoupNote, match="not the average of the updates"):
        fastsoup.average(folders, out=tmp_path / "a")
    with pytest.raises(ValueError, match="peft reads no shards"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupNote)
        fastsoup.average(folders, out=tmp_path / "b", shard_size="100B")
    assert not os.path.exists(tmp_path / "b") and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# torch state-dict outputs


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return _tiny.build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_file_output_is_a_state_dict(zoo, tmp_path, suffix):
    out = tmp_path / f"soup{suffix}"
    assert fastsoup.average(zoo.paths[:3], out=out) == os.fspath(out)
    assert out.is_file()  # not a folder named soup.pt
    got = torch.load(out, weights_only=True)
    want = _reference.average_state_dicts(zoo.state_dicts[:3])
    assert list(got) == list(fastsoup.open_checkpoint(zoo.paths[0]))  # the first ingredient's order
    for name, t in want.items():
        assert bits_equal(got[name], t), name
    assert os.listdir(tmp_path) == [out.name]


def test_torch_file_output_follows_the_overwrite_rules(zoo, tmp_path):
    out = tmp_path / "soup.pth"
    assert main(["average", *zoo.paths[:2], "-o", str(out), "--no-progress"]) == 0
    before = out.read_bytes()
    with pytest.raises(fastsoup.OutputExistsError):
        fastsoup.average(zoo.paths[2:4], out=out)
    assert out.read_bytes() == before
    assert main(["average", *zoo.paths[2:4], "-o", str(out), "--no-progress"]) == 1  # exists: refused
    fastsoup.average(zoo.paths[2:4], out=out, overwrite=True)
    got = torch.load(out, weights_only=True)
    assert bits_equal(got["fc1.weight"], _reference.average_state_dicts(zoo.state_dicts[2:4])["fc1.weight"])
    user = tmp_path / "mine.pt"  # a folder of the user's with that name: never replaced
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(fastsoup.UnsafeOutputError):
        fastsoup.average(zoo.paths[:2], out=user, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_soup_save_and_fastsoup_save_write_torch_files(zoo, tmp_path):
    soup = fastsoup.Soup.like(zoo.paths[0])
    for p in zoo.paths[:3]:
        soup.add(p)
    soup.save(tmp_path / "soup.pt")
    got = torch.load(tmp_path / "soup.pt", weights_only=True)
    value = soup.value()
    for name, t in value.items():
        assert bits_equal(got[name], t), name
    fastsoup.save(zoo.state_dicts[0], tmp_path / "copy.bin")
    got = torch.load(tmp_path / "copy.bin", weights_only=True)
    assert all(bits_equal(got[n], t) for n, t in zoo.state_dicts[0].items())


# --------------------------------------------------------------------------------------------------
# Side files from a donor folder, the manifest, the model card, provenance


def model_folder(root, name, sd, *, config=None, extra=None, weights="model.safetensors", metadata=None):
    """A folder as save_pretrained writes it (config of transformers 4.x: torch_dtype, indent 3)."""
    d = root / name
    d.mkdir()
    save_file(sd, str(d / weights), metadata=metadata or {"format": "pt"})
    config = config if config is not None else {"architectures": ["MLP"], "torch_dtype": "float32", "hidden": 32,
                                                "text_config": {"torch_dtype": "float32", "n": 1}}
    (d / "config.json").write_text(json.dumps(config, indent=3) + "\n")
    for fname, data in (extra or {}).items():
        (d / fname).write_bytes(data)
    return d


SIDE = {"tokenizer_config.json": b'{"x": 1}\n', "special_tokens_map.json": b"{}\n", "vocab.txt": b"a\nb\n",
        "merges.txt": b"#v\n", "tokenizer.model": b"\x00spm", "added_tokens.json": b"{}", "vocab.json": b"{}",
        "generation_config.json": b'{"max_new_tokens": 3}\n', "processor_config.json": b"{}",
        "preprocessor_config.json": b"{}", "chat_template.jinja": b"{{ x }}"}
NOT_COPIED = {"flax_model.msgpack": b"x", "tf_model.h5": b"x", "model.onnx": b"x", "training_args.bin": b"x",
              "optimizer.pt": b"x", "notes.txt": b"mine", "trainer_state.json": b"{}"}


@pytest.fixture
def donors(zoo, tmp_path):
    a = model_folder(tmp_path, "a", zoo.state_dicts[0], extra={**SIDE, **NOT_COPIED},
                     metadata={"format": "pt", "origin": "run a"})
    b = model_folder(tmp_path, "b", zoo.state_dicts[1], config={"torch_dtype": "float32", "name": "b"})
    return a, b


def test_side_files_come_from_the_donor_and_are_in_the_manifest(donors, tmp_path):
    a, b = donors
    out = tmp_path / "soup"
    fastsoup.average([a, b], out=out, dtype="bf16")
    names = set(os.listdir(out))
    assert names == {"config.json", "model.safetensors", "README.md", ".fastsoup.json", *SIDE}
    assert not names & set(NOT_COPIED)  # no weights of other formats, nothing else of the donor's
    for fname, data in SIDE.items():
        assert (out / fname).read_bytes() == data, fname
    text = (a / "config.json").read_text()
    assert (out / "config.json").read_text() == text.replace('"torch_dtype": "float32"', '"torch_dtype": "bfloat16"')
    assert json.loads((out / "config.json").read_text())["text_config"]["torch_dtype"] == "bfloat16"
    files = manifest(out)
    assert set(files) == names - {".fastsoup.json"}
    assert all(files[n] == os.path.getsize(out / n) for n in files)

    # An overwrite may replace the folder (every file is fastsoup's) ...
    fastsoup.average([b, a], out=out, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"torch_dtype": "float32", "name": "b"}
    assert set(os.listdir(out)) == {"config.json", "model.safetensors", "README.md", ".fastsoup.json"}
    # ... but a file the user put there, or a side file the user changed, blocks it.
    (out / "mine.txt").write_text("mine")
    with pytest.raises(fastsoup.UnsafeOutputError, match="mine.txt"):
        fastsoup.average([a, b], out=out, overwrite=True)
    (out / "mine.txt").unlink()
    (out / "config.json").write_text('{"edited": "by the user"}\n')
    with pytest.raises(fastsoup.UnsafeOutputError, match="config.json"):
        fastsoup.average([a, b], out=out, overwrite=True)
    assert (out / "config.json").read_text() == '{"edited": "by the user"}\n'
    assert leftovers(tmp_path) == []


def test_config_from_picks_the_donor(donors, tmp_path):
    a, b = donors
    fastsoup.average([a, b], out=tmp_path / "s1", config_from=b)
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["name"] == "b"
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "s2"), "--config-from", str(b / "config.json"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "s2" / "config.json").read_text())["name"] == "b"
    fastsoup.average([a, b], out=tmp_path / "s3", config_from=False)
    assert sorted(os.listdir(tmp_path / "s3")) == [".fastsoup.json", "model-00001-of-00001.safetensors",
                                                   "model.safetensors.index.json"]
    with pytest.raises(fastsoup.CheckpointError, match="config_from"):
        fastsoup.average([a, b], out=tmp_path / "s4", config_from=tmp_path / "nope")
    assert not os.path.exists(tmp_path / "s4")


def test_a_weights_file_in_a_model_folder_counts_as_its_folder(donors, zoo, tmp_path):
    a, b = donors
    fastsoup.average([a / "model.safetensors", b / "model.safetensors"], out=tmp_path / "s")
    assert "config.json" in os.listdir(tmp_path / "s")
    # A file of another name has no folder of its own: a config beside it may describe something else.
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(zoo.paths[0], runs / "ft-0.safetensors")
    shutil.copy(zoo.paths[1], runs / "ft-1.safetensors")
    (runs / "config.json").write_text("{}")
    fastsoup.average([runs / "ft-0.safetensors", runs / "ft-1.safetensors"], out=tmp_path / "t")
    assert sorted(os.listdir(tmp_path / "t")) == [".fastsoup.json", "model-00001-of-00001.safetensors",
                                                  "model.safetensors.index.json"]


def test_model_card_unless_the_donor_has_one(donors, tmp_path):
    a, b = donors
    out = tmp_path / "soup"
    fastsoup.average([a, b], weights=[3, 1], out=out)
    card = (out / "README.md").read_text()
    assert "weighted_soup" in card and fastsoup.__version__ in card and "float32" in card
    assert f"`{a}` | 0.75" in card and f"`{b}` | 0.25" in card
    assert card.startswith("---\nlibrary_name: transformers\n")
    # A soup of that soup: the old card is fastsoup's (its manifest says so), so a new one is written.
    out2 = tmp_path / "soup2"
    fastsoup.average([out, a], out=out2)
    assert "uniform_soup" in (out2 / "README.md").read_text()
    # The donor's own card is copied as it is.
    (b / "README.md").write_text("# b, by its author\n")
    fastsoup.average([b, a], out=tmp_path / "soup3")
    assert (tmp_path / "soup3" / "README.md").read_text() == "# b, by its author\n"


def test_provenance_metadata(donors, zoo, tmp_path):
    a, b = donors
    fastsoup.average([a, b], weights=[1, 3], out=tmp_path / "soup")
    meta = metadata(tmp_path / "soup" / "model.safetensors")
    assert meta["format"] == "pt" and meta["origin"] == "run a"  # the donor's metadata is kept
    assert meta["fastsoup.recipe"] == "weighted_soup"
    assert json.loads(meta["fastsoup.ingredients"]) == [str(a), str(b)]
    assert json.loads(meta["fastsoup.weights"]) == [0.25, 0.75]
    assert meta["fastsoup.version"] == fastsoup.__version__
    fastsoup.weighted_sum([zoo.state_dicts[0], zoo.paths[1]], [0.5, -1.0], out=tmp_path / "ws.safetensors")
    meta = metadata(tmp_path / "ws.safetensors")
    assert meta["format"] == "pt" and meta["fastsoup.recipe"] == "weighted_sum"
    assert json.loads(meta["fastsoup.ingredients"]) == ["<ingredient 0>", zoo.paths[1]]
    assert json.loads(meta["fastsoup.weights"]) == [0.5, -1.0]
    soup = fastsoup.Soup.like(zoo.paths[0]).add(zoo.paths[0]).add(zoo.paths[1], weight=3.0)
    soup.save(tmp_path / "soup.safetensors")
    meta = metadata(tmp_path / "soup.safetensors")
    assert meta["fastsoup.recipe"] == "soup" and json.loads(meta["fastsoup.weights"]) == [0.25, 0.75]


def test_a_side_file_too_large_is_refused_before_any_work(donors, tmp_path, monkeypatch):
    a, b = donors
    monkeypatch.setattr(_sidefiles, "MAX_SIDE_FILE", 10)
    with pytest.raises(fastsoup.CheckpointError, match="config.json.*side file"):
        fastsoup.average([a, b], out=tmp_path / "soup")
    assert not os.path.exists(tmp_path / "soup") and leftovers(tmp_path) == []
    fastsoup.average([a, b], out=tmp_path / "soup", config_from=False)  # copies none


def test_mixed_input_dtypes_say_which_dtype_the_soup_takes(zoo, tmp_path, capsys):
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in zoo.state_dicts[1].items()}, str(half))
    with pytest.warns(SoupNote, match=r"float32.*float16.*first ingredient"):
        sd = fastsoup.average([zoo.paths[0], half])
    assert sd["fc1.weight"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoupNote)
        fastsoup.average([zoo.paths[0], half], dtype="fp16")  # chosen: no note
        fastsoup.average(zoo.paths[:2])  # the same dtypes: no note
    assert main(["average", str(half), zoo.paths[0], "-o", str(tmp_path / "s.safetensors"), "--no-progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastsoup: note:")]
    assert len(notes) == 1 and "float16" in notes[0] and "--dtype" in notes[0]


# --------------------------------------------------------------------------------------------------
# Sharded .bin inputs


def test_a_sharded_bin_input_gives_a_sharded_output(zoo, tmp_path):
    folders = []
    for i in range(2):
        d = tmp_path / f"bin{i}"
        d.mkdir()
        sd = zoo.state_dicts[i]
        parts = [{k: v for k, v in sd.items() if k.startswith("fc1")}, {k: v for k, v in sd.items() if k.startswith("fc2")}]
        weight_map = {}
        for j, part in enumerate(parts):
            shard = f"pytorch_model-{j + 1:05d}-of-00002.bin"
            torch.save(part, d / shard)
            weight_map.update({k: shard for k in part})
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text('{"torch_dtype": "float32"}')
        folders.append(d)
    out = tmp_path / "soup"
    fastsoup.average(folders, out=out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert {k for k, v in index["weight_map"].items() if v == shards[0]} == {"fc1.weight", "fc1.bias"}
    assert "config.json" in os.listdir(out)
    want = _reference.average_state_dicts(zoo.state_dicts[:2])
    got = fastsoup.average([out])
    for name, t in want.items():
        assert bits_equal(got[name], t), name


# --------------------------------------------------------------------------------------------------
# Greedy and learned soups saved to a folder


@pytest.fixture(scope="module")
def zoo_folders(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_folders")
    return [str(model_folder(root, f"ft{i}", sd, extra={"tokenizer.json": b'{"t": %d}' % i}))
            for i, sd in enumerate(zoo.state_dicts[:4])]


def test_greedy_soup_saved_to_a_folder_carries_the_side_files(zoo, zoo_folders, tmp_path):
    result = fastsoup.greedy_soup(zoo_folders, zoo.model(), zoo.heldout)
    out = tmp_path / "greedy"
    result.save(out)
    first = zoo_folders[result.indices[0]]
    assert {"config.json", "tokenizer.json", "README.md", "soup.json", "model.safetensors"} <= set(os.listdir(out))
    assert (out / "tokenizer.json").read_bytes() == open(os.path.join(first, "tokenizer.json"), "rb").read()
    meta = metadata(out / "model.safetensors")
    kept = [zoo_folders[i] for i in result.indices]
    assert meta["fastsoup.recipe"] == "greedy_soup" and json.loads(meta["fastsoup.ingredients"]) == kept
    assert json.loads(meta["fastsoup.weights"]) == [1 / len(kept)] * len(kept)
    assert "greedy_soup" in (out / "README.md").read_text()
    assert set(manifest(out)) == set(os.listdir(out)) - {".fastsoup.json"}
    result.save(out, overwrite=True, config_from=zoo_folders[3])
    assert (out / "tokenizer.json").read_bytes() == b'{"t": 3}'


@pytest.mark.parametrize("layerwise", [False, True], ids=["per-model", "layerwise"])
def test_learned_soup_saved_to_a_folder_carries_the_side_files(zoo, zoo_folders, tmp_path, layerwise):
    r = fastsoup.learned_soup(zoo_folders[:3], zoo.model(), zoo.heldout[:2], steps=2, layerwise=layerwise)
    out = tmp_path / "learned"
    r.save(out)
    assert {"config.json", "tokenizer.json", "README.md", "soup.json", "model.safetensors"} <= set(os.listdir(out))
    meta = metadata(out / "model.safetensors")
    assert meta["fastsoup.recipe"] == ("learned_soup_layerwise" if layerwise else "learned_soup")
    assert json.loads(meta["fastsoup.weights"]) == r.weights()
    got = load_file(str(out / "model.safetensors"))
    for name, t in r.state_dict().items():
        assert bits_equal(got[name], t), name
    r.save(tmp_path / "learned.pt")
    assert torch.load(tmp_path / "learned.pt", weights_only=True).keys() == got.keys()
    assert (tmp_path / "learned.json").is_file()


def test_config_dtype_is_set_in_place_and_nowhere_else():
    text = ('{\n    "dtype": "float32",\n    "my_dtype": "float32",\n    "note": "a \\"dtype\\": \\"float32\\" in a string",\n'
            '    "text_config": {"torch_dtype": "float32", "layers": [{"dtype": "float16"}]},\n'
            '    "quant": {"dtype": "int8"},\n    "auto": {"dtype": "auto"}\n}\n')
    got = _sidefiles.set_config_dtype(text.encode(), "bfloat16").decode()
    want = (text.replace('"dtype": "float32",\n', '"dtype": "bfloat16",\n', 1)
            .replace('"torch_dtype": "float32"', '"torch_dtype": "bfloat16"')
            .replace('[{"dtype": "float16"}]', '[{"dtype": "bfloat16"}]'))
    assert got == want
    assert _sidefiles.set_config_dtype(text.encode(), "float32") != text.encode()  # the nested float16 entry
    same = b'{"dtype": "float16"}'
    assert _sidefiles.set_config_dtype(same, "float16") is same  # already the soup's: the donor's bytes
    with pytest.warns(SoupNote, match="not valid JSON"):
        assert _sidefiles.set_config_dtype(b"{not json", "float16") == b"{not json"
