"""Soups of the checkpoints users bring, loaded back where they came from: transformers models
(``save_pretrained`` folders, ``model.state_dict()``, safetensors' ``save_model`` files, ``.bin``
files; names renamed on load by transformers 5; tied embeddings; fused layouts), DDP / open_clip
``module.`` prefixes, and the batches these libraries give.

Tiny models built from configs, random init, nothing downloaded (``HF_HUB_OFFLINE=1``).
transformers imports with the CPU torch: nothing here skips.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file, save_model  # noqa: E402

import fastsoup  # noqa: E402
from fastsoup import CheckpointError  # noqa: E402
from fastsoup.io.names import FusedLayoutError, compile_key_map, prefix_hint  # noqa: E402

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


def perturbed(model, seed: int, scale: float = 0.02):
    """A "fine-tune": the model's weights plus noise (tied weights stay tied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def mean_of(state_dicts: list[dict], names) -> dict:
    """The exact mean of each tensor (float64), rounded once to its dtype (the oracle)."""
    return {n: (sum(sd[n].double() for sd in state_dicts) / len(state_dicts)).to(state_dicts[0][n].dtype)
            for n in names}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the oracle within the engine's rounding (a float32 accumulation: a few units in the
    last place of these ~0.02-sized weights), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=4e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Key maps and prefixes


def test_key_map_forms():
    assert compile_key_map({"a.w": "b.w"})("a.w") == "b.w"
    assert compile_key_map({"a.w": "b.w"})("c") == "c"
    assert compile_key_map([(r"^module\.", ""), (r"\.gamma$", ".weight")])("module.ln.gamma") == "ln.weight"
    assert compile_key_map(str.upper)("x") == "X"
    with pytest.raises(TypeError):
        compile_key_map([("only-one",)])
    with pytest.raises(ValueError, match="regular expression"):
        compile_key_map([("(", "")])


def test_a_key_map_that_merges_two_names_is_an_error(tmp_path):
    p = str(tmp_path / "a.safetensors")
    save_file({"x.a": torch.ones(2), "x.b": torch.ones(2)}, p)
    with pytest.raises(CheckpointError, match="the same name"):
        fastsoup.average([p, p], key_map=[(r"\.[ab]$", "")])


def ddp_and_plain(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    ddp = {"module." + k: v + 1 for k, v in plain.items()}  # what DDP (and open_clip's train script) save
    torch.save({"epoch": 3, "state_dict": ddp}, tmp_path / "ddp.pt")
    save_file(plain, str(tmp_path / "plain.safetensors"))
    return net, plain, ddp


def test_ddp_prefix_is_named_in_the_error_and_stripped_with_the_option(tmp_path):
    net, plain, ddp = ddp_and_plain(tmp_path)
    paths = [str(tmp_path / "ddp.pt"), str(tmp_path / "plain.safetensors")]
    with pytest.raises(CheckpointError, match=r"strip_prefix='module\.'"):  # "missing 4 / extra 4", no hint, before
        fastsoup.average(paths)
    soup = fastsoup.average(paths, strip_prefix="module.")
    net.load_state_dict(soup)  # loads where it came from
    assert all(torch.equal(soup[k], ((plain[k] + 1) + plain[k]) / 2) for k in plain)
    out = tmp_path / "soup.safetensors"
    r = __import__("subprocess").run(
        [__import__("sys").executable, "-m", "fastsoup", "average", *paths, "-o", out, "--strip-prefix", "module.",
         "--no-progress"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert set(load_file(out)) == set(plain)


def test_prefix_hint():
    assert "strip_prefix='module.'" in prefix_hint(["a.w", "b"], ["module.a.w", "module.b"])
    assert "key_map=[('^', 'm.')]" in prefix_hint(["m.a.w", "m.b"], ["a.w", "b"])
    assert prefix_hint(["a"], ["b"]) is None


# ---------------------------------------------------------------------------------------------------
# Tied weights


def tiny_llama(tied=True):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Three tied fine-tunes of one init, each in every layout users have: a save_pretrained folder
    (lm_head dropped), model.state_dict() (both names, one tensor), save_model (embed_tokens dropped)
    and a torch .bin (both names, shared storage)."""
    root = tmp_path_factory.mktemp("llama")
    out = []
    for i in range(3):
        m = perturbed(tiny_llama(), i + 1)
        folder = root / f"ft{i}"
        m.save_pretrained(folder)
        save_model(m, str(root / f"ft{i}-save_model.safetensors"))
        torch.save(m.state_dict(), root / f"ft{i}.bin")
        out.append({"model": m, "folder": str(folder), "save_model": str(root / f"ft{i}-save_model.safetensors"),
                    "bin": str(root / f"ft{i}.bin"), "sd": {k: v.detach().clone() for k, v in m.state_dict().items()}})
    return out


def test_the_layouts_of_a_tied_model_differ_as_the_issue_says(llamas):
    folder_names = set(fastsoup.open_checkpoint(llamas[0]["folder"]))
    file_names = set(load_file(llamas[0]["save_model"]))
    assert "lm_head.weight" not in folder_names and "model.embed_tokens.weight" in folder_names
    assert "lm_head.weight" in file_names and "model.embed_tokens.weight" not in file_names


@pytest.mark.parametrize("kinds", [("folder", "sd"), ("folder", "save_model"), ("sd", "save_model"), ("folder", "bin"),
                                   ("bin", "save_model"), ("folder", "sd", "save_model", "bin")],
                         ids=lambda k: "+".join(k))
def test_every_layout_of_a_tied_model_mixes_with_every_other(llamas, tmp_path, kinds):
    ings = [llamas[i % 3]["model"].state_dict() if kind == "sd" else llamas[i % 3][kind] for i, kind in enumerate(kinds)]
    want = mean_of([llamas[i % 3]["sd"] for i in range(len(kinds))], llamas[0]["sd"])
    got = fastsoup.average(ings)  # "extra 1: 'lm_head.weight'" before
    assert got["lm_head.weight"] is got["model.embed_tokens.weight"]  # in memory: both names, one tensor
    assert all(same(got[n], want[n]) for n in want)
    out = tmp_path / "soup"
    fastsoup.average(ings, out=out)
    on_disk = load_file(next(str(p) for p in out.iterdir() if p.suffix == ".safetensors"))
    assert "model.embed_tokens.weight" in on_disk and "lm_head.weight" not in on_disk  # once, as save_pretrained
    m = tiny_llama()
    m.load_state_dict(got)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_a_state_dict_soup_writes_a_tied_matrix_once(llamas, tmp_path):
    out = tmp_path / "soup.safetensors"
    fastsoup.average([llamas[0]["model"].state_dict(), llamas[1]["model"].state_dict()], out=out)  # twice before
    assert "lm_head.weight" not in load_file(out)
    fastsoup.save(llamas[0]["model"].state_dict(), tmp_path / "one.safetensors")
    assert "lm_head.weight" not in load_file(tmp_path / "one.safetensors")


def test_soup_greedy_and_learned_with_a_tied_model_and_its_folders(llamas, tmp_path):
    folders = [x["folder"] for x in llamas]
    model = tiny_llama()
    soup = fastsoup.Soup.like(model)  # "missing 1" before
    for f in folders:
        soup.add(f)
    soup.load_into(model)
    want = mean_of([x["sd"] for x in llamas], llamas[0]["sd"])
    assert same(model.lm_head.weight.detach(), want["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 6), generator=g)
    batches = [{"input_ids": ids[:8], "labels": torch.randint(0, 64, (8,), generator=g)},
               {"input_ids": ids[8:], "labels": torch.randint(0, 64, (8,), generator=g)}]

    class LastToken(torch.nn.Module):  # logits of the last position: one row per example
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits[:, -1]

    r = fastsoup.greedy_soup(folders, LastToken(tiny_llama()), batches, progress=False, key_map=[(r"^", "lm.")])
    r.save(tmp_path / "greedy")
    assert set(fastsoup.open_checkpoint(str(tmp_path / "greedy"))) == set(fastsoup.open_checkpoint(folders[0]))
    le = fastsoup.learned_soup(folders, LastToken(tiny_llama()), batches, steps=2, progress=False,
                               key_map=[(r"^", "lm.")])
    le.save(tmp_path / "learned")
    assert "lm.lm_head.weight" not in fastsoup.open_checkpoint(str(tmp_path / "learned"))


# ---------------------------------------------------------------------------------------------------
# transformers 5: names on disk are not the module's


def tiny(kind):
    torch.manual_seed(0)
    if kind == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=3))
    if kind == "dinov2":
        return transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=3))
    if kind == "swin":
        return transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3))
    if kind == "clip":
        return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=3))
    raise ValueError(kind)


class ImageLogits(torch.nn.Module):
    """CLIP's vision tower with projection as a classifier (image_embeds as the logits)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, pixel_values):
        return self.m(pixel_values=pixel_values).image_embeds


@pytest.fixture(scope="module", params=["vit", "dinov2", "swin", "clip"])
def vision(request, tmp_path_factory):
    return vision_zoo(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return vision_zoo("vit", tmp_path_factory.mktemp("vit-cli"))


def vision_zoo(kind, root):
    """Three save_pretrained "fine-tunes" of a tiny vision model, their state dicts, and held-out batches
    as transformers models take them ({"pixel_values", "labels"})."""
    folders, sds = [], []
    for i in range(3):
        m = perturbed(tiny(kind), i + 1)
        m.save_pretrained(root / f"ft{i}")
        folders.append(str(root / f"ft{i}"))
        sds.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(6, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (6,), generator=g)}
               for _ in range(2)]
    return kind, folders, sds, batches


def wrap(kind, m):
    return ImageLogits(m) if kind == "clip" else m


def key_map(kind):
    return [(r"^", "m.")] if kind == "clip" else None  # the wrapper's own prefix


def test_renamed_on_load_models_take_their_folders_directly(vision, tmp_path):
    kind, folders, sds, batches = vision
    model = wrap(kind, tiny(kind))
    want = mean_of(sds, sds[0])
    soup = fastsoup.Soup.like(model, key_map=key_map(kind))  # "missing ..." (disk names: not the module's) before
    for f in folders:
        soup.add(f)
    soup.load_into(model)
    inner = model.m if kind == "clip" else model
    assert all(same(inner.state_dict()[n], want[n]) for n in want)
    soup.save(tmp_path / "soup")  # under the files' names: save_pretrained's layout
    assert set(fastsoup.open_checkpoint(str(tmp_path / "soup"))) == set(fastsoup.open_checkpoint(folders[0]))
    r = fastsoup.greedy_soup(folders, wrap(kind, tiny(kind)), batches, progress=False, key_map=key_map(kind))
    assert r.indices and r.score >= 0
    le = fastsoup.learned_soup(folders, wrap(kind, tiny(kind)), batches, steps=2, progress=False, key_map=key_map(kind))
    assert le.coefficients.shape == (3,)


def test_a_greedy_soup_of_folders_is_saved_under_the_files_names(vision, tmp_path):
    kind, folders, sds, batches = vision
    r = fastsoup.greedy_soup(folders, wrap(kind, tiny(kind)), batches, progress=False, order=[0, 1, 2],
                             key_map=key_map(kind))
    out = tmp_path / "greedy"
    r.save(out)
    ck = fastsoup.open_checkpoint(str(out))
    assert set(ck) == set(load_file(os.path.join(folders[0], "model.safetensors")))  # as save_pretrained names them
    m = wrap(kind, tiny(kind))
    sd = r.state_dict()  # the module's names
    m.load_state_dict(sd)
    assert all(torch.equal(m.state_dict()[n], sd[n]) for n in sd)
    # The folder is a model folder: the library's own loader takes it.
    cls = type(tiny(kind))
    back = cls.from_pretrained(out)
    inner = m.m if kind == "clip" else m
    assert all(torch.equal(back.state_dict()[n], inner.state_dict()[n]) for n in inner.state_dict())


@pytest.mark.slow
def test_fastsoup_greedy_cli_on_save_pretrained_folders(vit, tmp_path):
    _, folders, _, batches = vit
    mod = tmp_path / "vitzoo.py"
    torch.save(batches, tmp_path / "batches.pt")
    mod.write_text(
        "import torch, transformers\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    return transformers.ViTForImageClassification(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2,"
        " num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=3))\n"
        f"def heldout():\n    return torch.load({str(tmp_path / 'batches.pt')!r})\n")
    out = tmp_path / "greedy"
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fastsoup", "greedy", *folders, "--model", f"{mod}:model", "--heldout",
                        f"{mod}:heldout", "-o", out, "--no-progress"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]  # "missing ..." (transformers renames on load) before
    back = transformers.ViTForImageClassification.from_pretrained(out)
    assert set(back.state_dict()) == set(tiny("vit").state_dict())


def test_fused_layouts_are_a_clear_error():
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                     num_experts_per_tok=1)
    with pytest.raises(FusedLayoutError, match="file to file"):
        fastsoup.Soup.like(transformers.MixtralForCausalLM(cfg))


# ---------------------------------------------------------------------------------------------------
# Batches as the libraries give them


def test_tokenizer_batches_are_passed_as_keyword_arguments(tmp_path):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, max_position_embeddings=16)
    torch.manual_seed(0)
    paths = []
    for i in range(2):
        m = perturbed(transformers.BertForSequenceClassification(cfg), i + 1)
        m.save_pretrained(tmp_path / f"ft{i}")
        paths.append(str(tmp_path / f"ft{i}"))
    g = torch.Generator().manual_seed(0)
    enc = transformers.BatchEncoding({"input_ids": torch.randint(0, 64, (8, 10), generator=g),
                                      "attention_mask": torch.ones(8, 10, dtype=torch.long),
                                      "labels": torch.randint(0, 2, (8,), generator=g)})
    r = fastsoup.greedy_soup(paths, transformers.BertForSequenceClassification(cfg), [enc], progress=False)
    assert r.indices  # refused before: only images/inputs keys were accepted
