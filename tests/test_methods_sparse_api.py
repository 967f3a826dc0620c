"""fastsoup.merge with the sparse methods (TIES, DARE, breadcrumbs) against fastsoup._reference, bit
for bit: into memory, a .safetensors file and a sharded folder; configs through the CLI; DARE's result
independent of the thread count."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastsoup
from fastsoup import _reference as R
from fastsoup.cli import main as cli_main
from fastsoup.io import open_checkpoint
from fastsoup.methods import read_config
from fastsoup.methods.params import num_layers

SPARSE = ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
SHAPES = {"embed.w": (9, 4), "layers.0.w": (7, 13), "layers.0.b": (13,), "layers.1.w": (5, 31), "layers.2.w": (8, 8),
          "head.w": (3, 1, 3), "odd": (1,), "empty": (0, 3)}


def _sd(seed: int, dtype, *, base=None, scale=1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if base is not None:
            x = base[name].double() + x
        out[name] = x.to(dtype)
    out["step"] = torch.tensor([seed, 7], dtype=torch.int64)
    out["mask"] = torch.tensor([True, False, True])
    return out


def _zoo(k: int, dtype):
    base = _sd(100, dtype)
    models = []
    for i in range(k):
        m = _sd(i, dtype, base=base, scale=0.05)
        m["step"] = torch.tensor([i, i], dtype=torch.int64)
        if i == 0:  # ties at the threshold and zero deltas
            m["layers.0.b"] = base["layers.0.b"].clone()
            m["layers.2.w"] = (base["layers.2.w"].double() + 0.125).to(dtype)
        models.append(m)
    return base, models


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in b:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(a[n].reshape(-1).view(torch.uint8), b[n].reshape(-1).view(torch.uint8)), n


def _read(path) -> dict:
    ck = open_checkpoint(path)
    return {n: ck.tensor(n) for n in ck}


def _params(method: str, k: int) -> dict:
    p = {"weights": [1.0, -0.5, 0.75][:k], "density": 0.4}
    if method.startswith("breadcrumbs"):
        p["gamma"] = 0.1
    if method.startswith("dare"):
        p["seed"] = 12345
    if method == "ties":
        p["lam"] = 0.9
    return p


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("method", SPARSE)
def test_memory_file_and_shards_are_the_reference(tmp_path, method, k, dtype):
    base, models = _zoo(k, dtype)
    p = _params(method, k)
    want = R.merge_state_dicts(method, models, base, **{("lam" if n == "lam" else n): v for n, v in p.items()})
    got = fastsoup.merge(models, method, base=base, threads=2, **p)
    _equal(got, want)
    bpath = os.path.join(tmp_path, "base.safetensors")
    fastsoup.save(base, bpath)
    paths = []
    for i, m in enumerate(models):
        paths.append(os.path.join(tmp_path, f"m{i}.safetensors"))
        fastsoup.save(m, paths[-1])
    out = str(tmp_path / "out.safetensors")
    assert fastsoup.merge(paths, method, base=bpath, out=out, **p) == out
    _equal(_read(out), want)
    meta = open_checkpoint(out).metadata
    assert meta["fastsoup.recipe"] == method
    params = json.loads(meta["fastsoup.parameters"])
    assert params["method"] == method and params["density"] == 0.4 and params["weights"] == p["weights"]
    if method.startswith("dare"):
        assert params["seed"] == 12345 and params["rescale"] == "density"
    folder = str(tmp_path / "sharded")
    fastsoup.merge(paths, method, base=bpath, out=folder, shard_size=600, **p)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    _equal(_read(folder), want)
    # an output dtype over the base's
    _equal(fastsoup.merge(paths, method, base=bpath, dtype="fp32", **p),
           R.merge_state_dicts(method, models, base, dtype=torch.float32, **p))


def test_options_rescale_normalize_defaults():
    base, models = _zoo(3, torch.float32)
    for method, kw in [("ties", {"normalize": False, "rescale": "l1"}), ("dare_linear", {"rescale": None}),
                       ("dare_ties", {"rescale": "l1", "normalize": True}), ("breadcrumbs_ties", {"normalize": True}),
                       ("ties", {}), ("dare_ties", {}), ("breadcrumbs", {})]:
        want = R.merge_state_dicts(method, models, base, **kw, **({"density": 0.5} if kw else {}))
        _equal(fastsoup.merge(models, method, base=base, **kw, **({"density": 0.5} if kw else {})), want)


def test_dare_does_not_depend_on_threads(tmp_path):
    base, models = _zoo(3, torch.bfloat16)
    one = fastsoup.merge(models, "dare_ties", base=base, density=0.3, seed=7, threads=1)
    two = fastsoup.merge(models, "dare_ties", base=base, density=0.3, seed=7, threads=2)
    _equal(one, two)
    other = fastsoup.merge(models, "dare_ties", base=base, density=0.3, seed=8, threads=2)
    assert not torch.equal(one["layers.1.w"], other["layers.1.w"])


def test_errors():
    base, models = _zoo(2, torch.float32)
    with pytest.raises(fastsoup.ArgumentError, match="needs a base"):
        fastsoup.merge(models, "ties")
    with pytest.raises(fastsoup.ArgumentError, match="takes no seed"):
        fastsoup.merge(models, "ties", base=base, seed=1)
    with pytest.raises(fastsoup.ArgumentError, match="rescale must be None or 'l1'"):
        fastsoup.merge(models, "ties", base=base, rescale="density")
    with pytest.raises(fastsoup.ArgumentError, match="takes no rescale"):
        fastsoup.merge(models, "task_arithmetic", base=base, rescale="l1")
    with pytest.raises(fastsoup.ArgumentError, match="takes no gamma|gamma"):
        fastsoup.merge(models, "ties", base=base, gamma=0.1)
    with pytest.raises(fastsoup.ArgumentError, match="seed must be"):
        fastsoup.merge(models, "dare_ties", base=base, seed=-1)


def test_configs_through_the_cli(tmp_path, capsys):
    base, models = _zoo(3, torch.float16)
    bpath = str(tmp_path / "base.safetensors")
    fastsoup.save(base, bpath)
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        fastsoup.save(m, paths[-1])
    ties = tmp_path / "ties.yml"
    ties.write_text(f"""\
merge_method: ties
base_model: {bpath}
models:
  - model: {bpath}
  - model: {paths[0]}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {paths[1]}
    parameters: {{weight: 0.3, density: [0.2, 0.8]}}
  - model: {paths[2]}
    parameters:
      weight: 0.2
      density: [{{filter: layers.1, value: 0.9}}, {{value: 0.3}}]
parameters:
  normalize: true
  lambda: 0.8
dtype: bfloat16
tokenizer_source: base
""")
    cfg = read_config(ties)
    L = num_layers(list(base))
    want = R.merge_state_dicts("ties", models, base, arguments=lambda n: cfg.arguments(n, L), dtype=torch.bfloat16)
    out = str(tmp_path / "ties.safetensors")
    assert cli_main(["merge", str(ties), "-o", out, "--no-progress"]) == 0
    _equal(_read(out), want)
    meta = open_checkpoint(out).metadata
    assert meta["fastsoup.recipe"] == "ties" and json.loads(meta["fastsoup.parameters"])["config"] == str(ties)

    dare = tmp_path / "dare.yml"
    dare.write_text(f"""\
merge_method: dare_ties
base_model: {bpath}
models:
  - model: {paths[0]}
    parameters: {{weight: 0.6}}
  - model: {paths[1]}
    parameters:
      weight: 0.4
      density: [{{filter: head, value: 0.3}}]
parameters:
  density: [0.2, 0.5, 0.8]
  rescale: true
dtype: float16
""")
    cfg = read_config(dare)
    want = R.merge_state_dicts("dare_ties", models[:2], base, arguments=lambda n: cfg.arguments(n, L), seed=5,
                               dtype=torch.float16)
    out = str(tmp_path / "dare")
    assert cli_main(["merge", str(dare), "-o", out, "--seed", "5", "--shard-size", "500", "--no-progress"]) == 0
    _equal(_read(out), want)
    _equal(fastsoup.merge(str(dare), seed=5), want)  # the Python API reads configs too

    out = str(tmp_path / "cli.safetensors")
    assert cli_main(["merge", "--method", "dare_linear", "--base", bpath, *paths, "-o", out, "--density", "0.3",
                     "--seed", "3", "--weights", "1", "0.5", "-0.25", "--no-progress"]) == 0
    _equal(_read(out), R.merge_state_dicts("dare_linear", models, base, density=0.3, seed=3,
                                           weights=[1, 0.5, -0.25]))
    out = str(tmp_path / "bc.safetensors")
    assert cli_main(["merge", "--method", "breadcrumbs", "--base", bpath, *paths, "-o", out, "--density", "0.5",
                     "--gamma", "0.1", "--no-progress"]) == 0
    _equal(_read(out), R.merge_state_dicts("breadcrumbs", models, base, density=0.5, gamma=0.1))
    out = str(tmp_path / "tn.safetensors")
    assert cli_main(["merge", "--method", "ties", "--base", bpath, *paths, "-o", out, "--density", "0.5",
                     "--no-normalize", "--rescale", "l1", "--lambda", "0.5", "--no-progress"]) == 0
    _equal(_read(out), R.merge_state_dicts("ties", models, base, density=0.5, normalize=False, rescale="l1", lam=0.5))


def _saved(tmp_path, k, dtype=torch.float32):
    base, models = _zoo(k, dtype)
    bpath = str(tmp_path / "base.safetensors")
    fastsoup.save(base, bpath)
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        fastsoup.save(m, paths[-1])
    return base, models, bpath, paths


def test_progress_bar_and_a_changed_input(tmp_path, monkeypatch, capsys):
    import fastsoup.methods.native as native

    base, models, bpath, paths = _saved(tmp_path, 2)
    out = str(tmp_path / "p.safetensors")
    fastsoup.merge(paths, "ties", base=bpath, density=0.5, out=out, progress=True)
    assert "ties:" in capsys.readouterr().err
    real = native.sparse_merge
    calls = []

    def changing(*a, **k):
        if not calls:
            with open(paths[1], "r+b") as f:
                f.seek(os.path.getsize(paths[1]) - 8)
                f.write(b"\x00" * 8)
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(native, "sparse_merge", changing)
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(fastsoup.InputChangedError, match="changed during the merge"):
        fastsoup.merge(paths, "dare_ties", base=bpath, density=0.5, out=str(bad))
    assert not bad.exists()
    calls.clear()
    with pytest.raises(fastsoup.InputChangedError):  # an in-memory result is not returned either
        fastsoup.merge(paths, "ties", base=bpath, density=0.5)


def test_the_example_configs_parse():
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    for name, method in (("ties.yml", "ties"), ("dare_ties.yml", "dare_ties")):
        assert read_config(os.path.join(here, name)).method == method


def test_the_per_method_functions():
    base, models = _zoo(2, torch.float32)
    _equal(fastsoup.ties(models, base, density=0.5), R.merge_state_dicts("ties", models, base, density=0.5))
    _equal(fastsoup.dare(models, base, density=0.5, seed=3),
           R.merge_state_dicts("dare_ties", models, base, density=0.5, seed=3))
    _equal(fastsoup.dare(models, base, density=0.5, seed=3, ties=False),
           R.merge_state_dicts("dare_linear", models, base, density=0.5, seed=3))


def test_dare_keys_its_masks_by_the_output_names():
    # strip_prefix: the masks follow the names the output stores (those the reference is given)
    base, models = _zoo(2, torch.float32)
    pre = [{f"module.{n}": t for n, t in sd.items()} for sd in [base, *models]]
    got = fastsoup.merge(pre[1:], "dare_linear", base=pre[0], density=0.5, seed=9, strip_prefix="module.")
    _equal(got, R.merge_state_dicts("dare_linear", models, base, density=0.5, seed=9))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_model_folders_get_a_model_card(tmp_path, method):
    # Hugging Face folders (a config.json beside the weights): the output folder gets a model card listing the
    # base (which takes no weight in these methods) and the models with their weights.
    base, models = _zoo(2, torch.float16)
    folders = []
    for name, sd in (("base", base), ("a", models[0]), ("b", models[1])):
        folders.append(str(tmp_path / name))
        fastsoup.save(sd, folders[-1])
        (tmp_path / name / "config.json").write_text('{"model_type": "toy"}')
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {folders[0]}\nmodels:\n"
                   f"  - model: {folders[1]}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
                   f"  - model: {folders[2]}\n    parameters: {{weight: 0.3, density: 0.5}}\n")
    out = tmp_path / "out"
    assert cli_main(["merge", str(cfg), "-o", str(out), "--no-progress"]) == 0
    rc = read_config(cfg)
    L = num_layers(list(base))
    _equal(_read(str(out)), R.merge_state_dicts(method, models, base, arguments=lambda n: rc.arguments(n, L),
                                                **({"seed": 0} if method.startswith("dare") else {})))
    card = (out / "README.md").read_text()
    assert f"- recipe: `{method}`" in card
    assert f"| `{folders[0]}` | – |" in card  # the base: no weight
    assert f"| `{folders[1]}` | 0.7 |" in card and f"| `{folders[2]}` | 0.3 |" in card
    meta = open_checkpoint(str(out)).metadata
    assert json.loads(meta["fastsoup.ingredients"]) == folders
    weights = json.loads(meta["fastsoup.weights"])
    assert weights["layers.1.w"] == [None, 0.7, 0.3]  # one per ingredient, the base's null
