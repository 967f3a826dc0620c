"""Training-framework checkpoints: timm's train.py and open_clip's training main, as their scripts
write them (tests/_frameworks.py), averaged and loaded back into equivalent modules; ``key=`` and
``--key``; the note on which state dict was taken; the refusal of anything that would run code.

Where timm or open_clip imports (a GPU machine, a user's environment), the same checks run with the
libraries' own models and loaders too; here they skip: both import torchvision, whose wheels in this
registry (0.28.0 with torch 2.13.0+cpu) are CUDA builds that fail at import with the CPU torch.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")

import fastsoup  # noqa: E402
from fastsoup import cli  # noqa: E402

from _frameworks import (DDP, TinyCLIP, TinyResNet, mean_state_dict, open_clip_zoo, soup_state_dict,  # noqa: E402
                        timm_zoo)
from conftest import bits_equal  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI


@pytest.fixture(scope="module")
def timm_runs(tmp_path_factory):
    return timm_zoo(str(tmp_path_factory.mktemp("timm")))


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
    return open_clip_zoo(str(tmp_path_factory.mktemp("open_clip")))


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert bits_equal(a[name], b[name]), name


def _load(cls, sd):
    m = cls()
    m.load_state_dict(sd, strict=True)
    return m


# ---------------------------------------------------------------------------------------------------
# timm


def test_timm_checkpoint_layout_is_the_real_one(timm_runs):
    """What the files hold (so the tests below read what timm writes): torch.load with timm's own
    allowlist reads them; plain weights_only loading refuses them (argparse.Namespace)."""
    path = timm_runs[0]["last"]
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True)
    assert list(obj) == ["epoch", "arch", "optimizer", "version", "args", "amp_scaler", "state_dict",
                         "state_dict_ema", "metric"]
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].model == "tinyresnet"
    assert set(obj["optimizer"]) == {"state", "param_groups"}
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)
    assert sorted(os.listdir(timm_runs[0]["dir"])) == ["args.yaml", "checkpoint-0.pth.tar", "checkpoint-1.pth.tar",
                                                      "last.pth.tar", "model_best.pth.tar", "summary.csv"]


def test_timm_train_checkpoints_average(timm_runs, tmp_path):
    paths = [r["last"] for r in timm_runs]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        soup = fastsoup.average(paths)  # no longer refused: argparse.Namespace in 'args'
    notes = [r.message for r in record if type(r.message).__name__ == "StateDictChoiceWarning"]
    assert len(notes) == 3 and "state_dict_ema" in str(notes[0])
    assert (notes[0].taken, notes[0].others) == ("state_dict", ("state_dict_ema",))
    want = mean_state_dict([r["state_dict"] for r in timm_runs])
    _same(soup, want)
    model = _load(TinyResNet, soup)  # strict: every key of the module, nothing else
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert torch.equal(model(x), _load(TinyResNet, want).eval()(x))
    # To a file, then back through safetensors into the module.
    from safetensors.torch import load_file

    with pytest.warns(fastsoup.StateDictChoiceWarning):
        out = fastsoup.average(paths, out=str(tmp_path / "soup.safetensors"))
    _same(load_file(out), want)


def test_timm_key_takes_the_ema_weights(timm_runs, tmp_path):
    paths = [r["last"] for r in timm_runs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastsoup.StateDictChoiceWarning)  # an explicit key: no note
        soup = fastsoup.average(paths, key="state_dict_ema")
        ck = fastsoup.open_checkpoint(paths[0], key="state_dict_ema")
    _same(soup, mean_state_dict([r["ema"] for r in timm_runs]))
    assert ck.key == "state_dict_ema"
    assert bits_equal(ck.tensor("fc.weight"), timm_runs[0]["ema"]["fc.weight"])
    _load(TinyResNet, soup)


def test_timm_checkpoint_entries(timm_runs):
    ck = fastsoup.open_checkpoint(fastsoup.KeyedPath(timm_runs[1]["best"], "state_dict"))
    assert ck.key == "state_dict" and ck.source == timm_runs[1]["best"]
    assert ck.entries["args"] == "Namespace"
    assert ck.entries["optimizer"] == "optimizer state"
    assert ck.entries["state_dict_ema"].startswith("state dict (")
    assert ck.entries["epoch"] == "1" and ck.entries["arch"] == "'tinyresnet'"
    info = fastsoup.inspect_checkpoint(timm_runs[1]["best"], key="state_dict_ema", tensors=True)
    assert info["key"] == "state_dict_ema" and info["entries"] == ck.entries
    assert [t["name"] for t in info["tensor_list"]] == list(timm_runs[1]["ema"])
    assert info["tensor_list"][0] == {"name": "conv_stem.weight", "dtype": "float32", "shape": [8, 3, 3, 3],
                                      "bytes": 8 * 27 * 4, "file": None}


def test_key_is_kept_by_soup_greedy_and_learned(timm_runs, tmp_path):
    """A KeyedPath carries its key wherever the ingredient goes: Soup (soup.py knows nothing of
    keys), the greedy search and the result's re-reads, the learned soup."""
    ema = [r["ema"] for r in timm_runs]
    soup = fastsoup.Soup.like(fastsoup.KeyedPath(timm_runs[0]["last"], "state_dict_ema"))
    for r in timm_runs:
        soup.add(fastsoup.KeyedPath(r["last"], "state_dict_ema"))
    _same(soup.value(), soup_state_dict(ema))

    g = torch.Generator().manual_seed(5)
    heldout = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(2)]
    model = TinyResNet()
    result = fastsoup.greedy_soup([r["last"] for r in timm_runs], model, heldout, key="state_dict_ema")
    assert all(isinstance(i, fastsoup.KeyedPath) and i.key == "state_dict_ema" for i in result.ingredients)
    _same(result.state_dict(), soup_state_dict([ema[i] for i in result.indices]))
    path = result.save(str(tmp_path / "greedy.safetensors"))
    assert os.path.exists(path)

    learned = fastsoup.learned_soup([r["last"] for r in timm_runs], TinyResNet(), heldout, steps=1,
                                    key="state_dict_ema")
    sd = learned.state_dict()
    c = learned.coefficients.tolist()
    want = sum(ci * e["fc.weight"] for ci, e in zip(c, ema))
    torch.testing.assert_close(sd["fc.weight"], want, rtol=1e-6, atol=1e-7)


def test_pth_tar_folders(timm_runs, tmp_path):
    """A timm output folder (several .pth.tar) gets a message that names them and says what to pass;
    a folder with one .pth.tar opens it."""
    run = timm_runs[0]["dir"]
    with pytest.raises(fastsoup.CheckpointError) as e:
        fastsoup.open_checkpoint(run)
    msg = str(e.value)
    assert "4 torch checkpoint files" in msg and "'last.pth.tar'" in msg and "'checkpoint-0.pth.tar'" in msg
    assert os.path.join(run, "model_best.pth.tar") in msg
    one = tmp_path / "one"
    one.mkdir()
    os.link(timm_runs[0]["last"], one / "last.pth.tar")
    ck = fastsoup.open_checkpoint(str(one), key="state_dict_ema")
    assert ck.source == str(one / "last.pth.tar") and ck.key == "state_dict_ema"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(fastsoup.CheckpointError, match=r"no checkpoint in this folder.*\.pth\.tar"):
        fastsoup.open_checkpoint(str(empty))


def test_key_errors(timm_runs, tmp_path):
    path = timm_runs[0]["last"]
    with pytest.raises(fastsoup.CheckpointError, match=r"'optimizer' is an optimizer state.*not model weights"):
        fastsoup.open_checkpoint(path, key="optimizer")
    with pytest.raises(fastsoup.CheckpointError,
                       match=r"no entry 'ema'.*its state dicts: 'state_dict', 'state_dict_ema'"):
        fastsoup.average([path], key="ema")
    with pytest.raises(fastsoup.CheckpointError, match=r"entry 'args' is not a state dict \(it holds Namespace\)"):
        fastsoup.open_checkpoint(path, key="args")
    st = str(tmp_path / "plain.safetensors")
    fastsoup.save(timm_runs[0]["state_dict"], st)
    with pytest.raises(fastsoup.CheckpointError, match="plain state dict"):
        fastsoup.open_checkpoint(st, key="state_dict_ema")
    pt = str(tmp_path / "plain.pt")
    torch.save(timm_runs[0]["state_dict"], pt)
    with pytest.raises(fastsoup.CheckpointError, match="plain state dict"):
        fastsoup.open_checkpoint(pt, key="state_dict")
    with pytest.raises(TypeError):
        fastsoup.open_checkpoint(path, key="")


def test_optimizer_is_never_taken(tmp_path):
    """A checkpoint whose only dict of tensors-and-more is the optimizer's has no state dict; one
    whose state dict has another name is refused with the candidates (no guess)."""
    m = TinyResNet()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    only_opt = str(tmp_path / "opt.pt")
    torch.save({"optimizer": opt.state_dict(), "epoch": 1}, only_opt)
    with pytest.raises(fastsoup.CheckpointError, match="holds no state dict"):
        fastsoup.open_checkpoint(only_opt, key="optimizer")
    with pytest.raises(fastsoup.CheckpointError, match="entry 'optimizer' is a dict"):
        fastsoup.open_checkpoint(only_opt)
    other = str(tmp_path / "ema.pt")
    torch.save({"optimizer": opt.state_dict(), "ema": m.state_dict(), "epoch": 1}, other)
    with pytest.raises(fastsoup.CheckpointError, match=r"without a 'state_dict' or 'model' entry.*'ema'.*key="):
        fastsoup.open_checkpoint(other)
    assert fastsoup.open_checkpoint(other, key="ema").key == "ema"
    # In memory, the same rules.
    ck = fastsoup.open_checkpoint({"model": m.state_dict(), "optimizer": opt.state_dict()})
    assert ck.key == "model"


# ---------------------------------------------------------------------------------------------------
# Nothing in a checkpoint runs.


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Config:
    """A user's own class (not a plain container): weights-only loading refuses it too."""

    def __init__(self):
        self.lr = 0.1


@pytest.mark.parametrize("where", ["top", "inside-args", "state-dict-entry"])
def test_code_in_a_checkpoint_never_runs(tmp_path, where):
    marker = tmp_path / "ran"
    sd = TinyResNet().state_dict()
    evil = _RunsCode(str(marker))
    if where == "top":
        obj = {"state_dict": sd, "hook": evil}
    elif where == "inside-args":
        obj = {"state_dict": sd, "args": argparse.Namespace(model="x", callback=evil)}
    else:
        obj = {"state_dict": {**sd, "extra": evil}}
    path = str(tmp_path / "evil.pth.tar")
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(fastsoup.CheckpointError) as e:
        fastsoup.average([path, path])
    assert not marker.exists(), "the checkpoint ran code"
    msg = str(e.value)
    assert msg.startswith(path) and "posix.system" in msg and "never runs code" in msg and "weights_only=True" in msg
    rc = cli.main(["inspect", path])
    assert rc == 1 and not marker.exists()


def test_other_classes_are_refused_by_name(tmp_path, capsys):
    path = str(tmp_path / "config.pt")
    torch.save({"state_dict": TinyResNet().state_dict(), "config": Config()}, path)
    with pytest.raises(fastsoup.CheckpointError, match=r"holds a [\w.]*Config object.*never runs code"):
        fastsoup.open_checkpoint(path)
    # The allowlist is scoped to fastsoup's loads: torch.load elsewhere is unchanged.
    ns = str(tmp_path / "ns.pt")
    torch.save({"state_dict": TinyResNet().state_dict(), "args": argparse.Namespace(a=1)}, ns)
    assert fastsoup.open_checkpoint(ns).entries["args"] == "Namespace"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ns, weights_only=True)
    rc = cli.main(["average", path, path, "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Config object" in err


def test_damaged_torch_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x02garbage, not a pickle" * 4)
    with pytest.raises(fastsoup.CheckpointError, match="cannot load as a torch checkpoint") as e:
        fastsoup.open_checkpoint(str(path))
    assert "never runs code" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# open_clip


def test_open_clip_training_checkpoints(clip_runs):
    """open_clip's epoch_latest.pt under DDP: the one state dict is taken (no note), keys keep
    their 'module.' prefix (stripped here when loading, as open_clip's own load_state_dict does;
    fastsoup's own prefix option belongs to another change)."""
    paths = [r["latest"] for r in clip_runs]
    obj = torch.load(paths[0], weights_only=True)
    assert list(obj) == ["epoch", "name", "state_dict", "optimizer", "scaler"]
    assert next(iter(obj["state_dict"])).startswith("module.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastsoup.StateDictChoiceWarning)
        soup = fastsoup.average(paths)
    assert all(k.startswith("module.") for k in soup)
    stripped = {k[len("module."):]: v for k, v in soup.items()}
    want = mean_state_dict([r["state_dict"] for r in clip_runs])
    _same(stripped, want)
    model = _load(TinyCLIP, stripped)
    image, text = torch.randn(2, 3, 8, 8), torch.randint(0, 32, (2, 6))
    assert torch.equal(model(image, text), _load(TinyCLIP, want)(image, text))
    ddp = DDP(TinyCLIP())
    ddp.load_state_dict(soup, strict=True)  # the soup loads into the DDP-wrapped model as it is
    info = fastsoup.inspect_checkpoint(paths[0])
    assert info["key"] == "state_dict" and info["entries"]["name"].startswith("'2026_12_01")


def test_open_clip_soups_load_into_the_plain_model_with_strip_prefix(clip_runs, tmp_path):
    # The soup of DDP checkpoints loads where its model came from: strip_prefix="module." (API) and
    # --strip-prefix module. (CLI) give the plain model's names.
    paths = [r["latest"] for r in clip_runs]
    want = mean_state_dict([r["state_dict"] for r in clip_runs])
    soup = fastsoup.average(paths, strip_prefix="module.")
    _same(soup, want)
    _load(TinyCLIP, soup)
    out = tmp_path / "soup.safetensors"
    r = subprocess.run([sys.executable, "-m", "fastsoup", "average", *paths, "-o", out, "--strip-prefix", "module.",
                        "--no-progress"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    _same(load_file(out), want)


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cli_key_and_the_note(timm_runs, tmp_path, capsys):
    paths = [r["last"] for r in timm_runs]
    out = str(tmp_path / "soup.safetensors")
    assert cli.main(["average", *paths, "-o", out]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1, err  # one line for the three inputs
    assert "took 'state_dict'" in notes[0] and "--key state_dict_ema" in notes[0] and paths[0] in notes[0]
    from safetensors.torch import load_file

    _same(load_file(out), mean_state_dict([r["state_dict"] for r in timm_runs]))

    ema_out = str(tmp_path / "ema.safetensors")
    assert cli.main(["average", *paths, "-o", ema_out, "--key", "state_dict_ema"]) == 0
    assert "note:" not in capsys.readouterr().err
    _same(load_file(ema_out), mean_state_dict([r["ema"] for r in timm_runs]))

    assert cli.main(["similarity", *paths, "--key", "state_dict_ema"]) == 0
    assert "cosine similarity" in capsys.readouterr().out
    assert cli.main(["average", *paths, "-o", str(tmp_path / "x.safetensors"), "--key", "optimizer"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastsoup: error: ") and "optimizer state" in err and err.count("\n") == 1


def test_cli_inspect_training_checkpoint(timm_runs, capsys):
    assert cli.main(["inspect", timm_runs[0]["last"], "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "training checkpoint: the state dict is 'state_dict'" in out
    for entry in ("state_dict_ema", "optimizer state", "Namespace", "amp_scaler", "metric"):
        assert entry in out
    assert "conv_stem.weight" in out and "[8, 3, 3, 3]" in out and "float32" in out
    assert "bn1.num_batches_tracked" in out and "int64" in out


# ---------------------------------------------------------------------------------------------------
# The libraries' own models and loaders, where they import.

_TORCHVISION_REASON = ("imports torchvision, whose wheels in this registry (0.28.0 with torch 2.13.0+cpu) are "
                       "CUDA builds that fail at import with the CPU torch; the checkpoint-layout tests above cover it")


def _library(name: str):
    try:
        return __import__(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            pytest.skip(f"{name} is not installed (it {_TORCHVISION_REASON})")
        pytest.skip(f"{name} does not import ({e}): it {_TORCHVISION_REASON}")
    except Exception as e:  # torchvision's "operator torchvision::nms does not exist"
        pytest.skip(f"{name} does not import ({type(e).__name__}: {e}): it {_TORCHVISION_REASON}")


def test_timm_library_loaders(tmp_path):
    """timm's own CheckpointSaver writes the runs; fastsoup's soups load into timm.create_model with
    load_state_dict(strict=True) and through timm's own load_checkpoint, and match the soups of
    what timm's load_state_dict reads from each file (use_ema=False / True)."""
    timm = _library("timm")
    from timm.models import load_checkpoint, load_state_dict
    from timm.utils import CheckpointSaver, ModelEmaV3

    arch = "test_resnet" if "test_resnet" in timm.list_models() else "resnet10t"
    torch.manual_seed(0)
    init = timm.create_model(arch, num_classes=5).state_dict()
    paths = []
    for run in range(3):
        model = timm.create_model(arch, num_classes=5)
        model.load_state_dict(init)
        ema = ModelEmaV3(model, decay=0.5)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (run + 1))
        g = torch.Generator().manual_seed(run)
        for _ in range(2):
            x = torch.randn(2, 3, 32, 32, generator=g)
            opt.zero_grad()
            model(x).logsumexp(-1).mean().backward()
            opt.step()
            ema.update(model)
        out_dir = tmp_path / f"run{run}"
        out_dir.mkdir()
        args = argparse.Namespace(model=arch, lr=1e-3 * (run + 1), epochs=1, seed=run)
        saver = CheckpointSaver(model=model, optimizer=opt, args=args, model_ema=ema, checkpoint_dir=str(out_dir),
                                recovery_dir=str(out_dir), max_history=2)
        saver.save_checkpoint(epoch=0, metric=50.0 + run)
        paths.append(str(out_dir / "last.pth.tar"))

    for key, use_ema in ((None, False), ("state_dict_ema", True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fastsoup.StateDictChoiceWarning)
            out = fastsoup.average(paths, out=str(tmp_path / f"soup-{use_ema}.safetensors"), key=key)
        want = mean_state_dict([load_state_dict(p, use_ema=use_ema) for p in paths])
        from safetensors.torch import load_file

        _same(load_file(out), want)
        model = timm.create_model(arch, num_classes=5)
        model.load_state_dict(load_file(out), strict=True)
        model2 = timm.create_model(arch, num_classes=5)
        load_checkpoint(model2, out, strict=True)
        for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
            assert torch.equal(a, b), n


def test_open_clip_library_loaders(tmp_path):
    """open_clip.create_model with a small custom config; checkpoints as its training main writes
    them under DDP; the soup loads through open_clip's own load_checkpoint (which strips 'module.')
    and with load_state_dict(strict=True) once the prefix is stripped."""
    open_clip = _library("open_clip")
    import json

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / "fastsoup-tiny-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    init = open_clip.create_model("fastsoup-tiny-clip").state_dict()
    paths, sds = [], []
    for run in range(3):
        model = open_clip.create_model("fastsoup-tiny-clip")
        model.load_state_dict(init)
        ddp = DDP(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3 * (run + 1))
        g = torch.Generator().manual_seed(run)
        image = torch.randn(2, 3, 16, 16, generator=g)
        text = torch.randint(0, 64, (2, 8), generator=g)
        feats = model.encode_image(image) @ model.encode_text(text).T
        opt.zero_grad()
        feats.sum().backward()
        opt.step()
        checkpoint_dict = {"epoch": 1, "name": f"run{run}", "state_dict": ddp.state_dict(),
                           "optimizer": opt.state_dict()}
        p = tmp_path / f"run{run}" / "checkpoints" / "epoch_latest.pt"
        p.parent.mkdir(parents=True)
        torch.save(checkpoint_dict, str(p))
        paths.append(str(p))
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    out = fastsoup.average(paths, out=str(tmp_path / "soup.safetensors"))
    model = open_clip.create_model("fastsoup-tiny-clip")
    open_clip.load_checkpoint(model, out, strict=True)
    want = mean_state_dict(sds)
    _same(dict(model.state_dict()), want)
    from safetensors.torch import load_file

    stripped = {k[len("module."):]: v for k, v in load_file(out).items()}
    model2 = open_clip.create_model("fastsoup-tiny-clip")
    model2.load_state_dict(stripped, strict=True)


def test_nested_training_checkpoints():
    """A state dict one level down ({"model": {"state_dict": ..., "ema": ...}}): the default is
    taken with a note naming the nested path, which key= accepts."""
    a, b = TinyResNet().state_dict(), TinyResNet().state_dict()
    obj = {"model": {"state_dict": a, "ema": b, "step": 3}, "epoch": 1}
    with pytest.warns(fastsoup.StateDictChoiceWarning, match=r"took 'model/state_dict'.*key='model/ema'") as rec:
        ck = fastsoup.open_checkpoint(obj)
    assert ck.key == "model/state_dict" and rec[0].message.others == ("model/ema",)
    ck = fastsoup.open_checkpoint(obj, key="model/ema")
    assert ck.key == "model/ema" and bits_equal(ck.tensor("fc.weight"), b["fc.weight"])
    with pytest.raises(fastsoup.CheckpointError, match="no entry 'model/nope'"):
        fastsoup.open_checkpoint(obj, key="model/nope")
