"""A model with NaN or infinite weights is refused before an analysis, naming the parameter."""

from __future__ import annotations

import math

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens._finite import check_finite
from unlearnlens.errors import NonFiniteModelError, UnlearnLensError


def broken(model, name, value, index=(0, 0)):
    with torch.no_grad():
        dict(model.named_parameters())[name][index] = value
    return model


@pytest.fixture(scope="module")
def models():
    base = build_model("gpt2", seed=1)
    good = perturbed(base, 0.2, seed=2)
    bad = broken(perturbed(base, 0.2, seed=3), "blocks.2.mlp.W_out", math.nan)
    return base, good, bad


def _calls(base, good, bad):
    questions = [q for q, _ in PAIRS]
    return {
        "patch": lambda: ul.patch_mlp_coefficients(base, bad, PAIRS, progress=False),
        "patch source": lambda: ul.patch_attention(bad, good, PAIRS, progress=False),
        "restore_sweep": lambda: ul.restore_sweep(base, bad, PAIRS, progress=False),
        "mlp_coefficients": lambda: ul.mlp_coefficients(bad, PAIRS),
        "compare_coefficients": lambda: ul.compare_coefficients(base, bad, PAIRS),
        "logit_lens": lambda: ul.logit_lens(bad, PAIRS),
        "evaluate": lambda: ul.evaluate({"base": base, "bad": bad}, forget=PAIRS),
        "dissect": lambda: ul.dissect(base, {"ok": good, "bad": bad}, PAIRS, progress=False),
        "from_model_answers": lambda: ul.PromptSet.from_model_answers(bad, questions),
    }


@pytest.mark.parametrize(
    "which",
    [
        "patch",
        "patch source",
        "restore_sweep",
        "mlp_coefficients",
        "compare_coefficients",
        "logit_lens",
        "evaluate",
        "dissect",
        "from_model_answers",
    ],
)
def test_every_analysis_refuses_a_nan_model_before_work(models, which, no_forward):
    base, good, bad = models
    before = dict(bad.named_parameters())["blocks.2.mlp.W_out"].detach().clone()
    with pytest.raises(NonFiniteModelError, match=r"blocks\.2\.mlp\.W_out") as info:
        _calls(base, good, bad)[which]()
    assert info.value.parameter == "blocks.2.mlp.W_out"
    assert "1 NaN" in str(info.value)
    assert isinstance(info.value, UnlearnLensError)
    after = dict(bad.named_parameters())["blocks.2.mlp.W_out"].detach()
    assert torch.equal(before.isnan(), after.isnan())  # the caller's model is not "repaired"


def test_the_first_bad_parameter_is_named_and_the_others_counted():
    model = build_model("llama", seed=4)
    broken(model, "blocks.1.attn.W_Q", math.inf, index=(0, 0, 0))
    broken(model, "blocks.3.mlp.W_in", -math.inf)
    broken(model, "blocks.3.mlp.W_in", math.nan, index=(1, 1))
    with pytest.raises(NonFiniteModelError) as info:
        check_finite(model, "unlearned model 'npo'")
    message = str(info.value)
    assert info.value.parameter == "blocks.1.attn.W_Q"
    assert "unlearned model 'npo'" in message
    assert "0 NaN and 1 infinite" in message
    assert "1 more parameters" in message


def test_half_precision_models_are_checked_too():
    model = build_model("gpt2", seed=5, dtype=torch.bfloat16)
    check_finite(model)  # a healthy model passes, its -inf attention masks included
    broken(model, "unembed.W_U", math.nan)
    with pytest.raises(NonFiniteModelError, match=r"unembed\.W_U"):
        check_finite(model)


def test_a_healthy_pair_still_runs(models):
    base, good, _ = models
    out = ul.patch_mlp_coefficients(base, good, PAIRS, layers=[0], progress=False)
    assert torch.isfinite(out.scores).all()


def test_dissect_reads_each_model_for_non_finite_weights_once(models, monkeypatch):
    """dissect checks its models up front; the analyses it runs do not scan them again."""
    import unlearnlens._finite as finite

    base, good, _ = models
    other = perturbed(base, 0.2, seed=4)
    scans: list[int] = []
    real = finite._scan

    def counting(model, what):
        scans.append(id(model))
        return real(model, what)

    monkeypatch.setattr(finite, "_scan", counting)
    ul.dissect(base, {"a": good, "b": other}, PAIRS, window=3, progress=False)
    assert sorted(scans) == sorted([id(base), id(good), id(other)])
    scans.clear()
    ul.patch_attention(base, good, PAIRS, progress=False)  # outside dissect: checked again
    assert sorted(scans) == sorted([id(base), id(good)])
