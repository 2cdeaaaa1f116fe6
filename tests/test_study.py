from __future__ import annotations

import pytest
import torch

import unlearnlens.study as study_module
from conftest import PAIRS, build_model, perturbed
from unlearnlens import compare_coefficients
from unlearnlens.errors import ConfigError, IncompatibleModelsError, LayerError, PromptError
from unlearnlens.evaluation import evaluate
from unlearnlens.lens import logit_lens
from unlearnlens.patching import patch, patch_attention, patch_mlp_coefficients, patch_residual
from unlearnlens.prompts import PromptSet
from unlearnlens.restoration import restore_sweep
from unlearnlens.study import ANALYSES, SWEEPS, StudyResult, check_analyses, dissect


@pytest.fixture(scope="module")
def models():
    base = build_model("llama", seed=1)
    return base, {"small": perturbed(base, 0.1, seed=2), "large": perturbed(base, 0.3, seed=3)}


@pytest.fixture(scope="module")
def study(models):
    base, unlearned = models
    return dissect(
        base,
        unlearned,
        PAIRS,
        unrelated=PAIRS[2:],
        window=3,
        progress=False,
        analyses=[a for a in ANALYSES if a != "behaviour"],
    )


def test_every_sweep_equals_its_primitive(models, study):
    base, unlearned = models
    assert study.methods == ["small", "large"]
    for name, u in unlearned.items():
        got = study.sweeps[name]
        assert list(got) == [a for a in ANALYSES if a in SWEEPS or a == "logit_lens"]
        direct = {
            "patch_mlp": patch_mlp_coefficients(base, u, PAIRS, window=3, progress=False),
            "patch_attn": patch_attention(base, u, PAIRS, window=3, progress=False),
            "patch_mlp_attn": patch(
                base, u, PAIRS, hooks=["mlp.hook_post", "hook_attn_out"], window=3, progress=False
            ),
            "patch_resid": patch_residual(
                base, u, PAIRS, hook="resid_pre", positions="each", align="answer", progress=False
            ),
            "restore_w_out": restore_sweep(
                base, u, PAIRS, components="mlp.W_out", window=3, progress=False
            ),
            "restore_mlp": restore_sweep(
                base, u, PAIRS, components="mlp", window=3, progress=False
            ),
            "restore_attn": restore_sweep(
                base, u, PAIRS, components="attn", window=3, progress=False
            ),
            "logit_lens": logit_lens(u, PAIRS),
        }
        for analysis, want in direct.items():
            assert torch.equal(got[analysis].scores, want.scores), (name, analysis)
            assert got[analysis] == want, (name, analysis)
        assert got["patch_resid"].dims == ("layer", "pos")
        comp = compare_coefficients(base, u, PAIRS)
        assert study.coefficients[name].layers.equals(comp.to_dataframe())
        assert study.coefficients[name].top_by_logit.equals(comp.neurons_dataframe("logit"))
        assert study.coefficients[name].base_logit == comp.base_logit
    assert study.base_lens == logit_lens(base, PAIRS)
    assert study.evaluation is None


def test_summary_reads_the_peaks(study):
    summary = study.summary()
    assert list(summary.columns) == ["peak", "peak_layer", "mean"]
    assert len(summary) == 2 * len(SWEEPS)
    for (method, analysis), row in summary.iterrows():
        scores = study.sweeps[method][analysis].scores
        assert row["peak"] == pytest.approx(float(scores.max()))
        flat = int(scores.flatten().argmax())
        layer = flat // scores.shape[1] if scores.ndim == 2 else flat
        assert row["peak_layer"] == study.sweeps[method][analysis].axes["layer"][layer]
        assert row["mean"] == pytest.approx(float(scores.mean()), abs=1e-6)


def test_save_load_round_trip(study, tmp_path):
    study.save(tmp_path / "s")
    back = StudyResult.load(tmp_path / "s")
    assert back == study
    assert back.summary().equals(study.summary())
    for m in study.methods:
        for a, r in study.sweeps[m].items():
            assert torch.equal(back.sweeps[m][a].scores, r.scores)
    assert StudyResult.from_json(study.to_json()) == study
    # equality is not trivially true
    changed = dict(study.sweeps)
    changed["small"] = {**study.sweeps["small"]}
    r = changed["small"]["patch_mlp"]
    changed["small"]["patch_mlp"] = type(r)(
        r.scores + 1e-3, r.axes, r.metric, r.baseline, r.reference, r.meta, r.per_prompt
    )
    other = StudyResult(changed, study.evaluation, study.coefficients, study.base_lens, study.meta)
    assert other != study


def test_behaviour_is_the_evaluation_of_all_models(models):
    base, unlearned = models
    result = dissect(
        base,
        unlearned,
        PAIRS,
        unrelated=PAIRS[:2],
        analyses=["behaviour"],
        eval_max_new_tokens=3,
        progress=False,
    )
    want = evaluate(
        {"base": base, **unlearned},
        forget=PAIRS,
        unrelated=PAIRS[:2],
        reference=base,
        max_new_tokens=3,
    )
    assert result.evaluation == want
    assert result.sweeps == {"small": {}, "large": {}}
    assert result.summary().empty


def test_model_answers_follow_the_base_model(models):
    base, unlearned = models
    questions = [q for q, _ in PAIRS]
    result = dissect(
        base,
        unlearned["small"],
        questions,
        answers="model",
        max_new_tokens=3,
        analyses=["patch_mlp"],
        window=1,
        progress=False,
    )
    ps = PromptSet.from_model_answers(base, questions, max_new_tokens=3)
    assert result.methods == ["unlearned"]
    want = patch_mlp_coefficients(base, unlearned["small"], ps, progress=False)
    assert result.sweeps["unlearned"]["patch_mlp"] == want
    assert result.meta["answers"] == list(ps.answers)


def test_bad_input_is_refused_before_any_work(models, monkeypatch):
    base, unlearned = models

    def forbidden(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(study_module, "bar", forbidden)
    with pytest.raises(
        ConfigError, match=r"unknown analysis 'patching'.*valid analyses: behaviour"
    ):
        dissect(base, unlearned, PAIRS, analyses=["patch_mlp", "patching"])
    with pytest.raises(LayerError, match="odd"):
        dissect(base, unlearned, PAIRS, window=4)
    with pytest.raises(IncompatibleModelsError, match="'gpt'"):
        dissect(base, {"gpt": build_model("gpt2", seed=1)}, PAIRS)
    with pytest.raises(ConfigError, match="'base'"):
        dissect(base, {"base": unlearned["small"]}, PAIRS)
    with pytest.raises(PromptError, match="bare questions"):
        dissect(base, unlearned, ["Tolo eats"])
    with pytest.raises(PromptError, match="unrelated is empty"):
        dissect(base, unlearned, PAIRS, unrelated=[], analyses=["behaviour"])
    with pytest.raises(ConfigError, match="non-empty dict"):
        dissect(base, {}, PAIRS)
    assert check_analyses("patch_mlp, logit_lens") == ("patch_mlp", "logit_lens")
    assert check_analyses(["logit_lens", "behaviour"]) == ("behaviour", "logit_lens")


def test_models_come_back_unchanged_also_after_an_interrupt(models, monkeypatch):
    base, unlearned = models
    u = unlearned["small"]
    u.train()
    base.blocks[1].attn.W_Q.requires_grad_(False)
    try:
        state = [
            (m.training, p.requires_grad)
            for mod in (base, u)
            for m in mod.modules()
            for p in list(m.parameters(recurse=False))[:1]
        ]
        weights = [p.detach().clone() for p in u.parameters()]

        def interrupted(*args, **kwargs):
            u.blocks[0].hook_resid_pre.add_hook(lambda act, hook: act)
            raise KeyboardInterrupt

        monkeypatch.setattr("unlearnlens.restoration.restore_sweep", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dissect(
                base, u, PAIRS, analyses=["patch_mlp", "restore_w_out"], window=1, progress=False
            )
        after = [
            (m.training, p.requires_grad)
            for mod in (base, u)
            for m in mod.modules()
            for p in list(m.parameters(recurse=False))[:1]
        ]
        assert after == state
        assert all(len(hp.fwd_hooks) == 0 for hp in u.hook_dict.values())
        assert all(torch.equal(a, b) for a, b in zip(weights, u.parameters(), strict=True))
    finally:
        u.eval()
        base.blocks[1].attn.W_Q.requires_grad_(True)


def test_behaviour_without_rouge_score_leaves_out_the_drift_scores(models, monkeypatch):
    import importlib.util
    import sys

    base, unlearned = models
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "rouge_score" else real(name, *a),
    )
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # importing it now fails
    with pytest.warns(UserWarning, match="rouge-score is not installed"):
        result = dissect(base, unlearned, PAIRS, analyses=["behaviour"], progress=False)
    assert not any(c.endswith(("exact_match", "rouge_l")) for c in result.evaluation.table.columns)
    assert result.evaluation == evaluate({"base": base, **unlearned}, forget=PAIRS)
    with pytest.raises(ImportError, match=r"unlearnlens\[eval\]"):
        evaluate(base, forget=PAIRS, reference=base)
