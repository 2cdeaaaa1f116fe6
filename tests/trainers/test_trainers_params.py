"""Parameter selection by TransformerLens component names and layers."""

from __future__ import annotations

import pytest

from conftest import build_model
from unlearnlens.errors import ComponentError, ConfigError, LayerError
from unlearnlens.trainers import ParamSelection, resolve_params, select_parameters


def names(d):
    return sorted(d)


def test_component_in_layers():
    model = build_model("gpt2", seed=0)
    got = select_parameters(model, [1, 2], "mlp.W_out")
    assert names(got) == ["blocks.1.mlp.W_out", "blocks.2.mlp.W_out"]
    assert got["blocks.1.mlp.W_out"] is model.blocks[1].mlp.W_out


def test_groups_expand_to_every_parameter_of_their_kind():
    model = build_model("llama", seed=0)
    every = dict(model.named_parameters())
    attn = select_parameters(model, [0], "attn")
    assert names(attn) == sorted(n for n in every if n.startswith("blocks.0.attn."))
    assert "blocks.0.attn._W_K" in attn  # grouped-query attention's own names
    ln = select_parameters(model, [3], "ln")
    assert names(ln) == sorted(n for n in every if n.startswith(("blocks.3.ln1.", "blocks.3.ln2.")))
    block = select_parameters(model, None, "block")
    assert names(block) == sorted(n for n in every if n.startswith("blocks."))


def test_gqa_alias_and_top_level_parts():
    model = build_model("llama", seed=0)
    assert names(select_parameters(model, [2], "attn.W_K")) == ["blocks.2.attn._W_K"]
    assert names(select_parameters(model, [0], ["unembed", "ln_final"])) == [
        "ln_final.w",
        "unembed.W_U",
        "unembed.b_U",
    ]


def test_missing_and_unknown_components_are_named():
    gpt2 = build_model("gpt2", seed=0)
    with pytest.raises(ComponentError, match=r"has no 'mlp.W_gate'.*mlp.W_out"):
        select_parameters(gpt2, None, "mlp.W_gate")
    with pytest.raises(ComponentError, match=r"unknown component 'mlp.W_up'.*mlp.W_in"):
        select_parameters(gpt2, None, "mlp.W_up")
    with pytest.raises(LayerError, match="out of range"):
        select_parameters(gpt2, [7], "mlp.W_out")


def test_resolve_params_forms():
    model = build_model("gpt2", seed=0)
    every = dict(model.named_parameters())
    assert names(resolve_params(model, None)) == sorted(every)
    d = resolve_params(model, {"layers": [3], "components": ["mlp.W_in", "mlp.W_out"]})
    assert names(d) == ["blocks.3.mlp.W_in", "blocks.3.mlp.W_out"]
    assert names(resolve_params(model, ParamSelection(layers=(-1,), components=("ln",)))) == [
        "blocks.3.ln1.b",
        "blocks.3.ln1.w",
        "blocks.3.ln2.b",
        "blocks.3.ln2.w",
    ]
    assert names(resolve_params(model, ["blocks.0.attn.W_Q", "embed.W_E"])) == [
        "blocks.0.attn.W_Q",
        "embed.W_E",
    ]
    assert len(resolve_params(model, "mlp.W_out")) == 4
    with pytest.raises(ComponentError, match=r"no parameter 'blocks\.9\.mlp\.W_out'"):
        resolve_params(model, ["blocks.9.mlp.W_out"])
    with pytest.raises(ComponentError, match="empty"):
        resolve_params(model, [])
    with pytest.raises(ConfigError, match="unknown keys"):
        resolve_params(model, {"layer": [1]})
