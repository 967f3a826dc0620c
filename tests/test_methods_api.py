"""fastsoup.merge and the per-method functions (task arithmetic, SLERP, Model Stock, linear), run on the
streaming engine, against the plain-torch references of fastsoup._reference.

Exactness: every method is one weighted sum per tensor (fastsoup.methods.coefficients), and the
references compute that same definition, so outputs are compared bit for bit wherever the
coefficients coincide: always for task arithmetic and linear; for SLERP and Model Stock when the
native gram pass (float32 products, float32 block sums) is exact, which the "grid" data makes sure of
(multiples of 1/16 in [-1/2, 1/2]: every product and sum is exact). On random data SLERP and Model
Stock take their cosines from the native gram, the references from the exact Gram: the coefficients
differ in their last bits, and the outputs by at most 1 ulp of float16/bfloat16/float32 (checked
here); the references are also asked with the native Gram entries and then agree bit for bit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastsoup
from fastsoup import _reference as R
from fastsoup.cli import main as cli_main
from fastsoup.diagnostics import TensorGram
from fastsoup.io import open_checkpoint
from fastsoup.methods import coefficients as C

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
IDS = ["fp16", "bf16", "fp32", "fp64"]
SHAPES = {"layers.0.w": (7, 13), "layers.1.w": (5, 3), "layers.1.b": (11,), "head.w": (3, 1, 3), "odd": (1,)}


def _sd(seed: int, dtype, *, scale: float = 1.0, grid: bool = False, base=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if grid:
            x = torch.randint(-8, 9, shape, generator=g).double() / 16
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if base is not None:
            x = base[name].double() + x
        out[name] = x.to(dtype)
    out["step"] = torch.tensor([seed], dtype=torch.int64)
    return out


def _zoo(k: int, dtype, *, grid: bool = False, shared: float = 0.0):
    base = _sd(100, dtype, grid=grid)
    common = _sd(200, torch.float64, scale=0.05, grid=grid)
    models = []
    for i in range(k):
        own = _sd(i, torch.float64, scale=0.05, grid=grid)
        models.append({n: ((base[n].double() + own[n] + shared * common[n]).to(dtype) if n != "step" else
                           torch.tensor([i], dtype=torch.int64)) for n in base})
    return base, models


def _equal(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for n in b:
        assert a[n].dtype == b[n].dtype, n
        assert torch.equal(a[n].view(-1).view(torch.uint8) if a[n].numel() else a[n],
                           b[n].view(-1).view(torch.uint8) if b[n].numel() else b[n]), n


def _max_ulp(a: dict, b: dict) -> int:
    return max(int(R.ulp_distance(a[n].reshape(-1), b[n].reshape(-1)).max()) for n in b if b[n].is_floating_point())


def _save(folder, name, sd) -> str:
    path = os.path.join(folder, name)
    fastsoup.save(sd, path)
    return path


# --- task arithmetic ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_task_arithmetic_is_the_reference_bit_for_bit(dtype, k):
    base, models = _zoo(k, dtype)
    w = [0.5, -0.25, 1.0, 0.3, 2.0][:k]
    for kw in (dict(weights=w, lam=0.7), dict(), dict(weights=w, normalize=True)):
        out = fastsoup.merge(models, "task_arithmetic", base=base, **kw)
        _equal(out, R.merge_state_dicts("task_arithmetic", models, base, **kw))
        assert out["step"].item() == 100  # integers from the base
    out = fastsoup.task_arithmetic(models, base, w, lam=0.7, dtype="fp32")
    _equal(out, R.merge_state_dicts("task_arithmetic", models, base, weights=w, lam=0.7, dtype=torch.float32))
    if dtype != torch.float64:  # the delta form (mergekit's order) is within one rounding
        assert _max_ulp(out, R.merge_state_dicts("task_arithmetic", models, base, weights=w, lam=0.7,
                                                 dtype=torch.float32)) == 0
        deltas = {n: R.task_arithmetic_deltas(base[n], [m[n] for m in models], w, lam=0.7) for n in SHAPES}
        ours = fastsoup.task_arithmetic(models, base, w, lam=0.7)
        assert max(int(R.ulp_distance(ours[n], deltas[n]).max()) for n in SHAPES) <= 1


def test_task_arithmetic_files_and_sharded_folders(tmp_path):
    base, models = _zoo(3, torch.bfloat16)
    bpath = _save(tmp_path, "base.safetensors", base)
    paths = [_save(tmp_path, f"m{i}.safetensors", m) for i, m in enumerate(models)]
    want = R.merge_state_dicts("task_arithmetic", models, base, weights=[1.0, -0.5, 0.25], lam=1.5)
    out = fastsoup.merge(paths, "task_arithmetic", base=bpath, weights=[1.0, -0.5, 0.25], lam=1.5,
                         out=tmp_path / "ta.safetensors")
    ck = open_checkpoint(out)
    _equal({n: ck.tensor(n) for n in ck}, want)
    meta = ck.metadata
    assert meta["fastsoup.recipe"] == "task_arithmetic"
    params = json.loads(meta["fastsoup.parameters"])
    assert params["lambda"] == 1.5 and params["weights"] == [1.0, -0.5, 0.25] and params["base"] == bpath
    assert json.loads(meta["fastsoup.ingredients"]) == [bpath, *paths]
    folder = fastsoup.merge(paths, "task_arithmetic", base=bpath, weights=[1.0, -0.5, 0.25], lam=1.5,
                            out=tmp_path / "sharded", shard_size=100)
    ck = open_checkpoint(folder)
    assert len(ck.files) > 1
    _equal({n: ck.tensor(n) for n in ck}, want)
    # the sharded folder is an input too
    again = fastsoup.merge([folder, paths[0]], "task_arithmetic", base=bpath, weights=[1.0, 1.0])
    _equal(again, R.merge_state_dicts("task_arithmetic", [want, models[0]], base, weights=[1.0, 1.0]))


def test_per_tensor_parameters_gradients_and_filters():
    base, models = _zoo(2, torch.float32)
    lam = [{"filter": "head", "value": 2.0}, {"value": [0.5, 1.5]}]
    out = fastsoup.merge(models, "task_arithmetic", base=base, weights=[1.0, [0.0, 1.0]], lam=lam)
    # layer position: layers.0 -> 0, layers.1 -> 1, others 0 (mergekit's rule)
    expect_lam = {"layers.0.w": 0.5, "layers.1.w": 1.5, "layers.1.b": 1.5, "head.w": 2.0, "odd": 0.5}
    expect_w1 = {"layers.0.w": 0.0, "layers.1.w": 1.0, "layers.1.b": 1.0, "head.w": 0.0, "odd": 0.0}
    for n in SHAPES:
        want = R.task_arithmetic(base[n], [m[n] for m in models], [1.0, expect_w1[n]], lam=expect_lam[n])
        assert torch.equal(out[n], want), n


def test_merge_errors_name_what_is_available():
    base, models = _zoo(2, torch.float32)
    with pytest.raises(fastsoup.ArgumentError, match="unknown merge method 'tie'.*available: linear, task_arithmetic, "
                                                     "slerp, model_stock, ties, dare_linear, dare_ties"):
        fastsoup.merge(models, "tie", base=base)
    with pytest.raises(fastsoup.ArgumentError, match="needs a base"):
        fastsoup.merge(models, "task_arithmetic")
    with pytest.raises(fastsoup.ArgumentError, match="density"):
        fastsoup.merge(models, "task_arithmetic", base=base, density=0.5)
    with pytest.raises(fastsoup.ArgumentError, match="seed"):
        fastsoup.merge(models, "task_arithmetic", base=base, seed=1)
    with pytest.raises(fastsoup.ArgumentError, match="2 weights for 1"):
        fastsoup.merge(models[:1], "task_arithmetic", base=base, weights=[1, 2])
    with pytest.raises(fastsoup.ArgumentError, match="needs t"):
        fastsoup.merge(models, "slerp")
    with pytest.raises(fastsoup.ArgumentError, match="two ingredients"):
        fastsoup.merge(models + [base], "slerp", t=0.5)
    with pytest.raises(fastsoup.ArgumentError, match="takes no weights"):
        fastsoup.merge(models, "model_stock", base=base, weights=[1, 1])


# --- Model Stock ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_model_stock_bit_for_bit_on_grid_data(dtype, k):
    base, models = _zoo(k, dtype, grid=True, shared=1.0)
    out = fastsoup.model_stock(models, base)
    _equal(out, R.merge_state_dicts("model_stock", models, base))
    ts = [C.model_stock_t(R.gram([m[n].double() - base[n].double() for m in models]).tolist()) for n in SHAPES]
    assert any(0.0 < t < 1.0 for t in ts)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_model_stock_random_data_within_one_ulp_and_exact_with_the_native_gram(dtype):
    base, models = _zoo(4, dtype, shared=1.0)
    out = fastsoup.model_stock(models, base)
    ref = R.merge_state_dicts("model_stock", models, base)
    if dtype != torch.float64:
        assert _max_ulp(out, ref) <= 1
    else:
        assert _max_ulp(out, ref) <= 1 << 30  # float32 gram: t to ~1e-7, the output relative ~1e-8
    grams = TensorGram([open_checkpoint(m) for m in models], open_checkpoint(base))
    for n in SHAPES:
        want = R.model_stock(base[n], [m[n] for m in models], gram=torch.tensor(grams(n), dtype=torch.float64))
        assert torch.equal(out[n], want), n


def test_model_stock_is_a_recipe_and_clamps(tmp_path):
    assert fastsoup.RECIPES["model_stock"].run is fastsoup.model_stock
    base, models = _zoo(2, torch.float32, grid=True)
    opposite = [models[0], {n: (2 * base[n] - models[0][n]) if n != "step" else base[n] for n in base}]
    out = fastsoup.model_stock(opposite, base)  # c = -1: t = 0, the base (mergekit divides by zero)
    for n in SHAPES:
        assert torch.equal(out[n], base[n])
    paths = [_save(tmp_path, f"m{i}.safetensors", m) for i, m in enumerate(models)]
    out = fastsoup.model_stock(paths, _save(tmp_path, "b.safetensors", base), out=tmp_path / "ms.safetensors")
    ck = open_checkpoint(out)
    _equal({n: ck.tensor(n) for n in ck}, R.merge_state_dicts("model_stock", models, base))
    assert ck.metadata["fastsoup.recipe"] == "model_stock"
    assert set(json.loads(ck.metadata["fastsoup.weights"])) == set(SHAPES)  # per-tensor coefficients


# --- SLERP ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, -0.25])
def test_slerp_bit_for_bit_on_grid_data(dtype, t):
    base, (a, b) = _zoo(2, dtype, grid=True)
    _equal(fastsoup.slerp(a, b, t), R.merge_state_dicts("slerp", [a, b], t=t))
    _equal(fastsoup.merge([a, b], "slerp", t=t, base=base), R.merge_state_dicts("slerp", [a, b], base, t=t))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_slerp_random_data_and_the_lerp_fallback(dtype):
    base, (a, b) = _zoo(2, dtype)
    out = fastsoup.slerp(a, b, 0.4)
    ref = R.merge_state_dicts("slerp", [a, b], t=0.4)
    if dtype != torch.float64:
        assert _max_ulp(out, ref) <= 1
    grams = TensorGram([open_checkpoint(a), open_checkpoint(b)])
    for n in SHAPES:
        g = grams(n)
        assert torch.equal(out[n], R.slerp(a[n], b[n], 0.4, gram=(g[0][0], g[0][1], g[1][1]))), n
    near = {n: (a[n].double() * 1.0001).to(dtype) if n != "step" else a[n] for n in a}  # |cos| > 0.9995: lerp
    out = fastsoup.slerp(a, near, 0.25)
    for n in SHAPES:
        assert torch.equal(out[n], R.weighted_sum([a[n], near[n]], [0.75, 0.25], dtype)), n
    assert out["step"].item() == a["step"].item()


def test_slerp_per_layer_t_from_a_list():
    base, (a, b) = _zoo(2, torch.float32, grid=True)
    out = fastsoup.slerp(a, b, [0.0, 1.0])
    for n in SHAPES:
        t = 1.0 if n.startswith("layers.1.") else 0.0
        assert torch.equal(out[n], R.slerp(a[n], b[n], t)), n


# --- linear ---------------------------------------------------------------------------------------------

def test_linear_is_average_and_weighted_sum():
    _, models = _zoo(3, torch.float16)
    _equal(fastsoup.merge(models, "linear", weights=[1.0, 2.0, -0.5]), fastsoup.average(models, [1.0, 2.0, -0.5]))
    _equal(fastsoup.merge(models, "linear"), fastsoup.average(models))
    _equal(fastsoup.merge(models, "linear", weights=[1.0, 2.0, -0.5], normalize=False),
           fastsoup.weighted_sum(models, [1.0, 2.0, -0.5]))


# --- configs and the command line -----------------------------------------------------------------------

def _files(tmp_path, k, dtype=torch.float32, grid=True):
    base, models = _zoo(k, dtype, grid=grid, shared=1.0)
    bpath = _save(tmp_path, "base.safetensors", base)
    paths = [_save(tmp_path, f"m{i}.safetensors", m) for i, m in enumerate(models)]
    return base, models, bpath, paths


def _read(path) -> dict:
    ck = open_checkpoint(path)
    return {n: ck.tensor(n) for n in ck}


def test_cli_merge_methods(tmp_path, capsys):
    base, models, bpath, paths = _files(tmp_path, 3)
    out = str(tmp_path / "ta.safetensors")
    assert cli_main(["merge", "--method", "task_arithmetic", "--base", bpath, *paths, "-o", out,
                     "--weights", "1", "-0.5", "0.25", "--lambda", "0.8", "--no-progress"]) == 0
    _equal(_read(out), R.merge_state_dicts("task_arithmetic", models, base, weights=[1, -0.5, 0.25], lam=0.8))
    out = str(tmp_path / "ms.safetensors")
    assert cli_main(["merge", "--method", "model_stock", "--base", bpath, *paths, "-o", out]) == 0
    _equal(_read(out), R.merge_state_dicts("model_stock", models, base))
    out = str(tmp_path / "sl.safetensors")
    assert cli_main(["merge", "--method", "slerp", *paths[:2], "-o", out, "--t", "0.3", "--dtype", "bf16"]) == 0
    _equal(_read(out), R.merge_state_dicts("slerp", models[:2], t=0.3, dtype=torch.bfloat16))
    out = str(tmp_path / "ties.safetensors")  # the sparse methods: tests/test_methods_sparse_api.py
    assert cli_main(["merge", "--method", "ties", "--base", bpath, *paths, "-o", out, "--density", "0.5"]) == 0
    _equal(_read(out), R.merge_state_dicts("ties", models, base, density=0.5))
    capsys.readouterr()
    assert cli_main(["merge", "--method", "tie", "--base", bpath, *paths, "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown merge method 'tie'" in err[0] and "task_arithmetic" in err[0]
    assert not os.path.exists(tmp_path / "x")
    assert cli_main(["merge", *paths, "-o", str(tmp_path / "y")]) == 1  # no --method
    assert "--method" in capsys.readouterr().err


def test_cli_merge_configs(tmp_path, capsys):
    base, models, bpath, paths = _files(tmp_path, 3)
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(f"""\
slices:
  - sources:
      - model: {paths[0]}
        layer_range: [0, 2]
      - model: {paths[1]}
        layer_range: [0, 2]
merge_method: slerp
base_model: {paths[0]}
parameters:
  t:
    - filter: head
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: 0.5
dtype: float32
""")
    out = str(tmp_path / "slerp.safetensors")
    assert cli_main(["merge", str(cfg), "-o", out]) == 0
    got = _read(out)
    for n in SHAPES:
        t = 0.0 if n == "head.w" else 0.5  # head.w is outside the layers: t = 0, the gradient's first value
        assert torch.equal(got[n], R.slerp(models[0][n], models[1][n], t)), n
    meta = open_checkpoint(out).metadata
    assert meta["fastsoup.recipe"] == "slerp" and json.loads(meta["fastsoup.parameters"])["config"] == str(cfg)

    ta = tmp_path / "ta.yml"
    ta.write_text(f"""\
merge_method: task_arithmetic
base_model: {bpath}
models:
  - model: {paths[0]}
    parameters: {{weight: 0.7}}
  - model: {paths[1]}
    parameters: {{weight: [0.2, 0.6]}}
  - model: {paths[2]}
    parameters: {{weight: -0.1}}
parameters:
  lambda: 0.9
dtype: bfloat16
""")
    out = str(tmp_path / "ta.safetensors")
    assert cli_main(["merge", str(ta), "-o", out]) == 0
    got = _read(out)
    for n in SHAPES:
        w1 = 0.6 if n.startswith("layers.1.") else 0.2
        want = R.task_arithmetic(base[n], [m[n] for m in models], [0.7, w1, -0.1], lam=0.9, dtype=torch.bfloat16)
        assert torch.equal(got[n], want), n
    _equal(fastsoup.merge(str(ta)), {n: got[n] for n in got})  # the Python API reads configs too

    ms = tmp_path / "ms.yml"
    ms.write_text(f"merge_method: model_stock\nbase_model: {bpath}\nmodels:\n"
                  + "".join(f"  - model: {p}\n" for p in paths))
    out = str(tmp_path / "ms.safetensors")
    assert cli_main(["merge", str(ms), "-o", out]) == 0
    _equal(_read(out), R.merge_state_dicts("model_stock", models, base))

    ties = tmp_path / "ties.yml"
    ties.write_text(f"merge_method: ties\nbase_model: {bpath}\nmodels:\n"
                    + "".join(f"  - model: {p}\n    parameters: {{weight: 1, density: 0.5}}\n" for p in paths))
    out = str(tmp_path / "t.safetensors")
    assert cli_main(["merge", str(ties), "-o", out]) == 0
    _equal(_read(out), R.merge_state_dicts("ties", models, base, weights=[1, 1, 1], density=0.5))
    capsys.readouterr()
    assert cli_main(["merge", str(ties), "--seed", "1", "-o", str(tmp_path / "t2.safetensors")]) == 1
    assert "takes no seed" in capsys.readouterr().err
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: slerp\nmodules: {}\n")
    assert cli_main(["merge", str(bad), "-o", str(tmp_path / "b.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "modules" in err[0]
    assert cli_main(["merge", str(ta), "--method", "slerp", "-o", str(tmp_path / "c")]) == 1
    assert "config" in capsys.readouterr().err


def test_the_torch_free_coefficients_are_the_references():
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        x = torch.randn(4, 9, generator=g, dtype=torch.float64)
        gram = x @ x.T
        assert C.model_stock_t(gram.tolist()) == R.model_stock_t(gram)
        for t in (0.0, 0.3, 1.0, 1.7):
            args = (float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1]), t)
            assert C.slerp_coefficients(*args) == R.slerp_coefficients(*args)
    assert C.model_stock_t([[1.0, -1.0], [-1.0, 1.0]]) == 0.0 == R.model_stock_t(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert C.task_arithmetic_coefficients([0.5, 0.5], 1.0) == [0.0, 0.5, 0.5]
