"""The mergekit YAML config reader (fastsoup.methods.config): the subset it reads, what each tensor's
parameters resolve to, and an error naming the key and the file for everything outside the subset.
Every config under examples/ parses."""

from __future__ import annotations

import glob
import os

import pytest
import torch

import fastsoup
from fastsoup import _reference as R
from fastsoup.methods import (
    METHODS,
    MergeConfig,
    MergeConfigError,
    ModelEntry,
    parse_config,
    read_config,
)
from fastsoup.methods import params as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIES = """
models:
  - model: org/orca
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/platypus
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: org/wizardmath
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: org/llama
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def _write(tmp_path, text, name="cfg.yml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_reads_a_mergekit_ties_config(tmp_path):
    cfg = read_config(_write(tmp_path, TIES))
    assert isinstance(cfg, MergeConfig)
    assert cfg.method == "ties" and cfg.base == "org/llama" and cfg.dtype == "float16"
    assert [m.path for m in cfg.models] == ["org/orca", "org/platypus", "org/wizardmath"]
    path, params = cfg.models[0]  # a (path, params) pair
    assert path == "org/orca" and isinstance(params["density"], P.Gradient)
    assert cfg.tokenizer_source is None and cfg.layer_range is None
    assert cfg.source.endswith("cfg.yml")


def test_tensor_parameters_resolve_as_mergekit(tmp_path):
    cfg = read_config(_write(tmp_path, TIES))
    n = 5  # layers 0..4: t = 0, 0.25, 0.5, 0.75, 1
    g, per = cfg.tensor_parameters("model.layers.2.mlp.up_proj.weight", n)
    assert g == {"lambda": 1.0, "normalize": True, "int8_mask": True, "rescale": False}
    assert per[0] == {"weight": 1.0, "density": 0.7}
    assert per[1] == {"weight": P.gradient_value([0, 0.3, 0.7, 1], 0.5), "density": 0.5}
    assert per[2] == {"weight": 0.5, "density": 0.33}
    _, per = cfg.tensor_parameters("model.layers.4.self_attn.q_proj.weight", n)
    assert [m["weight"] for m in per] == [1.0, 1.0, 0.0] and per[0]["density"] == 0.1
    _, per = cfg.tensor_parameters("model.embed_tokens.weight", n)  # outside the layers: t = 0
    assert per[0]["density"] == 1.0 and per[1]["weight"] == 0.0
    args = cfg.arguments("model.layers.1.mlp.down_proj.weight", n)
    assert args == {"weights": [1.0, P.gradient_value([0, 0.3, 0.7, 1], 0.25), 0.5],
                    "density": [P.gradient_value([1, 0.7, 0.1], 0.25), 0.5, 0.33],
                    "lam": 1.0, "normalize": True, "rescale": None}


def test_a_config_runs_through_the_reference():
    cfg = parse_config(TIES)
    torch.manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["model.embed_tokens.weight"]
    base = {n: torch.randn(6, 4) for n in names}
    base["step"] = torch.tensor(3)
    models = [{n: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for n, v in base.items()}
              for _ in cfg.models]
    n_layers = P.num_layers(base)
    out = R.merge_state_dicts(cfg.method, models, base, arguments=lambda name: cfg.arguments(name, n_layers),
                              dtype=torch.float16)
    for name in names:
        want = R.ties(base[name], [m[name] for m in models], dtype=torch.float16, **cfg.arguments(name, n_layers))
        assert torch.equal(out[name], want)
    assert torch.equal(out["step"], base["step"])


def test_global_parameters_apply_to_every_model_and_models_override():
    cfg = parse_config("""
merge_method: dare_ties
base_model: b
models:
  - model: x
    parameters: {weight: 1, density: [{filter: mlp, value: 0.3}]}
  - model: y
    parameters: {weight: 2}
parameters: {density: 0.6, rescale: false, lambda: 0.5}
""")
    args = cfg.arguments("layers.0.mlp.w", 1)
    assert args == {"weights": [1.0, 2.0], "density": [0.3, 0.6], "lam": 0.5, "normalize": False, "rescale": None}
    assert cfg.arguments("layers.0.attn.w", 1)["density"] == [0.6, 0.6]
    assert parse_config("merge_method: dare_linear\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]") \
        .arguments("w", 0)["rescale"] == "l1"  # mergekit's default for DARE: rescale true, the L1 rescale


def test_slerp_slices_form(tmp_path):
    cfg = read_config(os.path.join(ROOT, "examples", "slerp.yml"))
    assert cfg.method == "slerp" and cfg.layer_range == (0, 32)
    assert [m.path for m in cfg.models] == ["./models/a", "./models/b"] and cfg.base == "./models/a"
    assert cfg.arguments("model.layers.0.self_attn.q_proj.weight", 32) == {"t": 0.0}
    assert cfg.arguments("model.layers.31.mlp.up_proj.weight", 32) == {"t": 0.0}
    assert cfg.arguments("model.layers.31.input_layernorm.weight", 32) == {"t": 0.5}
    # the models: form, base listed second: the base still comes first
    cfg2 = parse_config("merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: a}]\nparameters: {t: 0.3}")
    assert [m.path for m in cfg2.models] == ["a", "b"]


def test_model_stock_and_linear():
    cfg = parse_config("merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}, {model: z}]")
    assert [m.path for m in cfg.models] == ["x", "y", "z"] and cfg.arguments("w", 0) == {}
    lin = parse_config("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}, "
                       "{model: y, parameters: {weight: 0.3}}]\ndtype: torch.bfloat16")
    assert lin.base is None and lin.dtype == "bfloat16"
    assert lin.arguments("w", 0) == {"weights": [1.0, 0.3], "normalize": True}


def test_yaml_details():
    cfg = parse_config("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1, density: 1e-1}}]"
                       "\nout_dtype: bf16\ndtype: float32\ntokenizer_source: base")
    assert cfg.models[0].parameters["density"] == 0.1  # YAML 1.2 float, as mergekit's pydantic reads it
    assert cfg.dtype == "bfloat16" and cfg.tokenizer_source == "base"


BAD = [  # (config, what the message must name)
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\nname: foo", "unknown key 'name'"),
    ("merge_method: ties\nbase_model: b\nmodules: {}", "modules"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\ntokenizer: {source: union}",
     "tokenizer"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\nchat_template: chatml",
     "chat_template"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\ntokenizer_source: union",
     "tokenizer_source"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1, densty: 0.5}}]",
     "models[0].parameters.densty"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1, lambda: 2}}]",
     "'lambda' is a global parameter"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: b, parameters: {weight: 1}}, {model: x, parameters: {weight: 1}}]",
     "base model 'b' has parameters"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1, density: 1.5}}]", "outside [0, 1]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1, density: [0.5, 2]}}]",
     "outside [0, 1]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\nparameters: {normalize: 1}",
     "parameters.normalize"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]\ndtype: int4", "dtype"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}, revision: main}]",
     "models[0].revision"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x+lora/adapter, parameters: {weight: 1}}]", "LoRA"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}, {model: x}]", "listed twice"),
    ("merge_method: ties\nmodels: [{model: x, parameters: {weight: 1}}]", "needs a base_model"),
    ("merge_method: linear\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]", "takes no base model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: b}]", "at least 1"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: x}]", "at least 2"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: x}, {model: y}]\nparameters: {filter_wise: true}",
     "filter_wise"),
    ("merge_method: slerp\nbase_model: c\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}", "slerp takes two"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}",
     "slerp takes two"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b, parameters: {weight: 1}}]",
     "slerp has no parameter 'weight'"),
    ("merge_method: frankenmerge\nmodels: [{model: a}]", "merge_method"),
    ("models: [{model: a}]", "no merge_method"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x}]\nslices: []", "exactly one of"),
    ("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n"
     "  - sources: [{model: a, layer_range: [0, 16]}, {model: b, layer_range: [0, 16]}]\n"
     "  - sources: [{model: a, layer_range: [16, 32]}, {model: b, layer_range: [16, 32]}]", "only one slice"),
    ("merge_method: slerp\nbase_model: a\nslices:\n  - sources: [{model: a, layer_range: [0, 8]}, "
     "{model: b, layer_range: [0, 8]}]\n    parameters: {t: 0.5}", "slices[0].parameters"),
    ("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n  - sources: [{model: a, layer_range: [0, 8]}, "
     "{model: b, layer_range: [0, 9]}]", "layer ranges differ"),
    ("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n  - sources: [{model: a, layer_range: [4, 8]}, "
     "{model: b, layer_range: [4, 8]}]", "only [0, N]"),
    ("merge_method: ties\nbase_model: b\nbase_model: c\nmodels: [{model: x}]", "duplicate key 'base_model'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}\n", "not valid YAML"),
    ("- just\n- a list", "expected a mapping"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: [{filter: a, valu: 1}]}}]",
     "unknown key 'valu'"),
]


@pytest.mark.parametrize("text,match", BAD, ids=[m for _, m in BAD])
def test_outside_the_subset_is_an_error_naming_key_and_file(tmp_path, text, match):
    path = _write(tmp_path, text, "bad.yml")
    with pytest.raises(MergeConfigError, match="bad.yml") as e:
        read_config(path)
    assert match in str(e.value)
    assert isinstance(e.value, fastsoup.FastsoupError) and isinstance(e.value, ValueError)


def test_a_missing_required_parameter_names_model_and_tensor():
    cfg = parse_config("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {weight: [{filter: mlp, "
                       "value: 1}]}}]", source="w.yml")
    assert cfg.arguments("layers.0.mlp.w", 1)["weights"] == [1.0]
    with pytest.raises(MergeConfigError, match=r"w.yml: parameter 'weight' of model x has no value for tensor lm_head"):
        cfg.arguments("lm_head.weight", 1)
    with pytest.raises(MergeConfigError, match="'t' has no value"):
        parse_config("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]").arguments("w", 0)


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(MergeConfigError, match="nope.yml"):
        read_config(str(tmp_path / "nope.yml"))


def test_every_method_is_declared_with_a_paper():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                            "breadcrumbs_ties", "slerp", "model_stock"}
    assert all(m.paper for m in METHODS.values())


EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yml")) + glob.glob(os.path.join(ROOT, "examples", "*.yaml")))


def test_the_examples_are_there():
    assert {os.path.basename(p) for p in EXAMPLES} >= {"ties.yml", "dare_ties.yml", "slerp.yml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_every_example_parses_and_resolves(path):
    cfg = read_config(path)
    assert cfg.method in METHODS and cfg.models
    names = [f"model.layers.{i}.{part}" for i in range(32) for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    for name in names + ["model.embed_tokens.weight", "lm_head.weight"]:
        cfg.arguments(name, 32)  # every tensor gets every parameter


def test_dare_ties_example_resolves_the_gradient_and_filter():
    cfg = read_config(os.path.join(ROOT, "examples", "dare_ties.yml"))
    assert cfg.arguments("model.layers.0.self_attn.q_proj.weight", 3)["density"] == [0.2, 0.2]
    assert cfg.arguments("model.layers.1.mlp.up_proj.weight", 3)["density"] == [0.5, 0.3]
    assert cfg.arguments("model.layers.2.self_attn.q_proj.weight", 3)["density"] == [0.8, 0.8]
    assert cfg.arguments("lm_head.weight", 3)["density"] == [0.2, 0.2]
    assert cfg.models == (ModelEntry("./models/math", {"weight": 0.6}), cfg.models[1])


def test_methods_import_neither_torch_nor_yaml_until_a_config_is_read():
    import subprocess
    import sys

    code = ("import sys, fastsoup.methods, fastsoup.methods.rng, fastsoup.methods.select\n"
            "assert 'torch' not in sys.modules and 'yaml' not in sys.modules\n"
            f"fastsoup.methods.read_config({os.path.join(ROOT, 'examples', 'ties.yml')!r})\n"
            "assert 'yaml' in sys.modules and 'torch' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
