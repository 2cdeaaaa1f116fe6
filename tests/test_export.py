"""Tests for unlearnlens.save_hf: Hugging Face logits and an exact load_hf round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_model, make_word_tokenizer
from test_models import ARCHS, TEXTS, make_hf
from unlearnlens.errors import UnsupportedArchitectureError
from unlearnlens.export import save_hf
from unlearnlens.models import load_hf

TOL = 1e-4


def _tokens(model):
    return model.to_tokens(TEXTS)


def _hf_logits(directory, tokens):
    hf = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


def _assert_same_parameters(a, b):
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_converted_models_round_trip(name, tmp_path):
    source = make_hf(name)
    model = load_hf(source, device="cpu", tokenizer=make_word_tokenizer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_hf(model, tmp_path / "hf")
    tokens = _tokens(model)
    with torch.no_grad():
        expected = source(tokens).logits.float()  # the original Hugging Face model
    assert (_hf_logits(tmp_path / "hf", tokens) - expected).abs().max() <= TOL
    again = load_hf(tmp_path / "hf", device="cpu")
    _assert_same_parameters(model, again)
    assert again.cfg.original_architecture == model.cfg.original_architecture
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_models_built_in_code(arch, tmp_path):
    model = build_model(arch, seed=3)
    if arch == "llama":  # LLaMA has no MLP or unembedding biases
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("mlp.b_in", "mlp.b_out", "unembed.b_U")):
                    p.zero_()
    else:
        with torch.no_grad():
            model.unembed.b_U.zero_()
    save_hf(model, tmp_path)
    tokens = _tokens(model)
    with torch.no_grad():
        expected = model(tokens).float()
    assert (_hf_logits(tmp_path, tokens) - expected).abs().max() <= TOL
    _assert_same_parameters(model, load_hf(tmp_path, device="cpu"))


def test_parameter_the_class_lacks_is_named(tmp_path):
    model = build_model("llama", seed=3)  # random non-zero MLP biases
    with pytest.raises(UnsupportedArchitectureError, match=r"mlp\.b_in"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_architecture_and_non_models(tmp_path):
    model = build_model("gpt2", seed=3)
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM"):
        save_hf(model, tmp_path, architecture="BertForMaskedLM")
    with pytest.raises(TypeError):
        save_hf(object(), tmp_path)


def test_unlearn_command_writes_a_hugging_face_checkpoint(tmp_path, capsys):
    import json

    from conftest import PAIRS
    from unlearnlens.cli import main
    from unlearnlens.models import save_model

    model = build_model("gpt2", seed=3)
    with torch.no_grad():
        model.unembed.b_U.zero_()
    save_model(model, tmp_path / "base")
    (tmp_path / "forget.json").write_text(json.dumps([list(p) for p in PAIRS[:2]]))
    args = ["unlearn", "--model", str(tmp_path / "base"), "--forget", str(tmp_path / "forget.json")]
    args += ["--method", "ga", "--steps", "1", "--lr", "1e-3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "out"), "--format", "hf"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    unlearned = load_hf(tmp_path / "out", device="cpu")
    tokens = _tokens(unlearned)
    with torch.no_grad():
        expected = unlearned(tokens).float()
    assert (_hf_logits(tmp_path / "out", tokens) - expected).abs().max() <= TOL
    assert not torch.equal(unlearned.blocks[0].mlp.W_in, model.blocks[0].mlp.W_in)


def test_unlearn_command_refuses_format_hf_for_a_model_that_does_not_fit(
    tmp_path, capsys, monkeypatch
):
    import json

    from conftest import PAIRS
    from unlearnlens import trainers
    from unlearnlens.cli import main
    from unlearnlens.models import save_model

    model = build_model("gpt2", seed=3)  # a non-zero unembed.b_U: GPT-2 has no such bias
    assert model.unembed.b_U.any()
    save_model(model, tmp_path / "base")
    (tmp_path / "forget.json").write_text(json.dumps([list(p) for p in PAIRS[:2]]))

    def unlearn(*args, **kwargs):
        raise AssertionError("training ran for a model that cannot be written as asked")

    monkeypatch.setattr(trainers, "unlearn", unlearn)
    args = ["unlearn", "--model", str(tmp_path / "base"), "--forget", str(tmp_path / "forget.json")]
    args += ["--method", "ga", "--steps", "1", "--no-progress", "--out", str(tmp_path / "out")]
    assert main([*args, "--format", "hf"]) == 2
    assert "unembed.b_U" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
