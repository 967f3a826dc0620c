"""Per-tensor parameters as mergekit users write them (fastsoup.methods.params): layer index from the
name, mergekit's gradient interpolation and filter matching, and the lookup order."""

from __future__ import annotations

import pytest

from fastsoup.methods import params as P


@pytest.mark.parametrize("name,index", [
    ("model.layers.12.mlp.up_proj.weight", 12),  # Llama, Mistral, Qwen
    ("transformer.h.3.attn.c_attn.weight", 3),  # GPT-2
    ("bert.encoder.layer.0.attention.self.query.weight", 0),  # BERT
    ("blocks.5.attn.qkv.weight", 5),  # timm ViT: at the start of the name
    ("visual.transformer.resblocks.11.ln_1.weight", 11),  # open_clip
    ("encoder.block.4.layer.1.DenseReluDense.wi.weight", 4),  # T5: the first match
    ("model.layers.2.block_sparse_moe.experts.7.w1.weight", 2),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("unet.down_blocks.1.resnets.0.conv1.weight", None),  # "down_blocks" is not "blocks"
    ("transformer.h.3", None),  # the index must be followed by a dot
    ("model.layers.x.weight", None),
])
def test_layer_index(name, index):
    assert P.layer_index(name) == index


def test_num_layers_and_position():
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.weight" for i in (0, 3, 1, 2)), "lm_head.weight"]
    assert P.num_layers(names) == 4
    assert P.num_layers(["a", "b"]) == 0
    assert P.layer_position("model.layers.0.mlp.weight", 4) == 0.0
    assert P.layer_position("model.layers.3.mlp.weight", 4) == 1.0
    assert P.layer_position("model.layers.1.mlp.weight", 4) == 1 / 3
    assert P.layer_position("model.embed_tokens.weight", 4) == 0.0  # outside the layers: t = 0, as mergekit
    assert P.layer_position("lm_head.weight", 4) == 0.0
    assert P.layer_position("model.layers.0.mlp.weight", 1) == 1.0  # one layer: t = 1, as mergekit


def _mergekit_gradient(values, t):
    """mergekit/config.py evaluate_setting, for a list of numbers."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


@pytest.mark.parametrize("values", [[0.3, 0.7], [0.0, 0.5, 1.0], [0.1, 0.9, 0.2, 0.6, 0.4], [0.25]])
def test_gradient_matches_mergekit(values):
    for n_layers in (1, 2, 7, 32):
        for i in range(n_layers):
            t = P.layer_position(f"layers.{i}.w", n_layers)
            assert P.gradient_value(values, t) == _mergekit_gradient(values, t)  # bit for bit
    assert P.gradient_value([0.0, 0.5, 1.0], 0.25) == 0.25
    assert P.gradient_value([0.2, 0.4], 1.0) == 0.4


def test_filters_first_match_wins_and_substring():
    s = P.parse_setting([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]},
                         {"filter": "layers.1", "value": 0.3}, {"value": 0.9}], "t")
    assert P.evaluate(s, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.1
    assert P.evaluate(s, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.5  # a gradient inside a filter
    assert P.evaluate(s, "model.layers.1.input_layernorm.weight", 0.5) == 0.3
    assert P.evaluate(s, "lm_head.weight", 0.0) == 0.9
    star = P.parse_setting([{"filter": "*", "value": 2}], "t")
    assert P.evaluate(star, "anything", 0.0) == 2.0
    literal = P.parse_setting([{"filter": "mlp.*", "value": 1}], "t")  # a substring, not a pattern
    assert P.evaluate(literal, "model.layers.0.mlp.up_proj", 0.0) is None
    assert P.evaluate(literal, "x.mlp.*.y", 0.0) == 1.0


def test_lookup_order_and_fallthrough():
    model = {"density": P.parse_setting([{"filter": "mlp", "value": 0.2}], "m")}
    glob = {"density": 0.7, "weight": 1.5}
    assert P.lookup([model, glob], "density", "layers.0.mlp.w", 0.0) == 0.2
    assert P.lookup([model, glob], "density", "layers.0.attn.w", 0.0) == 0.7  # no model filter matches
    assert P.lookup([model, glob], "weight", "layers.0.attn.w", 0.0) == 1.5
    assert P.lookup([model, glob], "gamma", "x", 0.0) is None
    assert P.lookup([None, {}], "gamma", "x", 0.0) is None


@pytest.mark.parametrize("raw,numeric,match", [
    ([], True, "empty"),
    ([0.1, "a"], True, "list of numbers"),
    ([0.1, True], True, "list of numbers"),
    ([{"value": 1}, 0.5], True, "mixes"),
    ([{"filter": "a"}], True, "needs a 'value'"),
    ([{"filter": "a", "value": 1, "where": 2}], True, "unknown key 'where'"),
    ([{"filter": 3, "value": 1}], True, "filter"),
    ("0.5", True, "expected a number"),
    (True, True, "expected a number"),
    ([True, False], False, "single value"),
    (0.5, False, "true/false"),
    ({"value": 1}, True, "expected a number"),
])
def test_bad_settings_are_value_errors(raw, numeric, match):
    with pytest.raises(ValueError, match=match):
        P.parse_setting(raw, "cfg.yml: parameters.x", numeric=numeric)


def test_setting_numbers_lists_every_literal():
    s = P.parse_setting([{"filter": "a", "value": [0.1, 0.9]}, {"value": 0.5}], "t")
    assert list(P.setting_numbers(s)) == [0.1, 0.9, 0.5]
