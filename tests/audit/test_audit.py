"""ul.audit: rows against direct computations, save/load, errors, models left as they came."""

from __future__ import annotations

import math

import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens.audit import AuditResult, available_probes, fake_quantize
from unlearnlens.errors import ConfigError, FileFormatError, UnknownProbeError

HOLDOUT = [("Question : Who is Mira ? Answer :", " red"), ("Tolo eats", " Paris")]
PARAPHRASES = [("Question : Where was Zorblax born ? Answer :", " Quen"), ("Tolo eats", " bread")]


@pytest.fixture(scope="module")
def models():
    base = build_model("llama", seed=1)
    return base, perturbed(base, 0.2, seed=2)


def _logprob(model, pairs):
    """Mean over pairs of the mean answer-token log-prob, from full ``model(tokens)`` logits."""
    out = []
    for prompt, answer in pairs:
        p = model.to_tokens(prompt)[0].tolist()
        a = model.to_tokens(answer, prepend_bos=False)[0].tolist()
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + a]))[0].float(), -1)
        out.append(sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(a)) / len(a))
    return sum(out) / len(out)


def _losses(model, pairs):
    out = []
    for prompt, answer in pairs:
        p = model.to_tokens(prompt)[0].tolist()
        a = model.to_tokens(answer, prepend_bos=False)[0].tolist()
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + a]))[0].float(), -1)
        out.append(-sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(a)) / len(a))
    return out


@pytest.fixture(scope="module")
def result(models):
    base, unl = models
    return ul.audit(
        base,
        {"u": unl},
        PAIRS,
        retain=PAIRS[2:],
        holdout=HOLDOUT,
        paraphrases=PARAPHRASES,
        probes=["mia_loss", "quant4", "in_context", "paraphrase", "extraction", "restore_w_out"],
        metric="answer_logprob",
        progress=False,
    )


def test_rows_match_direct_computations(models, result):
    base, unl = models
    frame = result.to_dataframe()
    names = ["mia_loss", "quant4", "in_context", "paraphrase", "extraction", "restore_w_out"]
    assert list(frame.index) == [("u", p) for p in names]
    q4 = result[("u", "quant4")]
    assert q4.base == pytest.approx(_logprob(base, PAIRS), abs=1e-4)
    assert q4.unlearned == pytest.approx(_logprob(unl, PAIRS), abs=1e-4)
    assert q4.attacked == pytest.approx(_logprob(fake_quantize(unl, 4), PAIRS), abs=1e-4)
    assert frame.loc[("u", "quant4"), "recovered"] == pytest.approx(
        (q4.attacked - q4.unlearned) / (q4.base - q4.unlearned)
    )
    para = result[("u", "paraphrase")]
    assert para.attacked == pytest.approx(_logprob(unl, PARAPHRASES), abs=1e-4)
    icl = result[("u", "in_context")]
    shots = [PAIRS[2 + (i * 3 + j) % 2] for i in range(4) for j in range(3)]
    icl_pairs = [
        (" ".join(p + a for p, a in shots[3 * i : 3 * i + 3]) + " " + prompt, answer)
        for i, (prompt, answer) in enumerate(PAIRS)
    ]
    assert icl.attacked == pytest.approx(_logprob(unl, icl_pairs), abs=1e-4)
    restored = perturbed(unl, 0.0, seed=0)
    with torch.no_grad():
        for b, r in zip(base.blocks, restored.blocks):
            r.mlp.W_out.copy_(b.mlp.W_out)
    assert result[("u", "restore_w_out")].attacked == pytest.approx(
        _logprob(restored, PAIRS), abs=1e-4
    )
    mia = result[("u", "mia_loss")]
    f, h = _losses(base, PAIRS), _losses(base, HOLDOUT)
    pairs = [(1.0 if b > a else 0.5 if b == a else 0.0) for a in f for b in h]
    assert mia.base == pytest.approx(sum(pairs) / len(pairs))
    assert mia.kind == "metric" and math.isnan(mia.attacked) and math.isnan(mia.recovered)


def test_save_load_is_exact(result, tmp_path):
    path = result.save(tmp_path / "audit.json")
    back = AuditResult.load(path)
    assert back == result
    assert back.to_dataframe().equals(result.to_dataframe())
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(FileFormatError, match=r"bad\.json"):
        AuditResult.load(tmp_path / "bad.json")
    with pytest.raises(FileFormatError, match="missing"):
        AuditResult.load(tmp_path / "missing.json")


def test_plot_returns_axes(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert result.plot(ax=ax) is ax
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "quant4",
        "in_context",
        "paraphrase",
        "restore_w_out",
    ]


def test_sub_step_unlearning_recovered_by_the_quant4_probe():
    base = build_model("gpt2", seed=1)
    unl = build_model("gpt2", seed=1)
    gen = torch.Generator().manual_seed(0)
    q = fake_quantize(base, 4, components="mlp")
    with torch.no_grad():  # move MLP weights within their rounding cells, grid ends kept
        for (name, p), (_, g) in zip(unl.named_parameters(), q.named_parameters()):
            if name.rsplit(".", 1)[-1] in ("W_in", "W_out"):
                step = (g.amax(0, keepdim=True) - g.amin(0, keepdim=True)) / 15
                inner = (g > g.amin(0, keepdim=True)) & (g < g.amax(0, keepdim=True))
                shift = (torch.rand(p.shape, generator=gen) - 0.5) * 0.8 * step
                p.copy_(torch.where(inner, g + shift, g))
    r = ul.audit(base, unl, PAIRS, probes=["quant4"], metric="answer_logprob", progress=False)
    row = r[("unlearned", "quant4")]
    assert row.unlearned != pytest.approx(row.base, abs=1e-3)
    assert row.attacked == pytest.approx(row.details["base_quantized"], abs=1e-5)
    assert row.details["rounded_differently"] == 0.0 and row.details["changed"] > 0.3


def test_arguments_are_checked_before_work(models):
    base, unl = models
    with pytest.raises(UnknownProbeError, match="registered probes"):
        ul.audit(base, unl, PAIRS, probes=["nope"], progress=False)
    with pytest.raises(ConfigError, match="holdout"):
        ul.audit(base, unl, PAIRS, probes=["mia_loss"], progress=False)
    with pytest.raises(ConfigError, match="metric"):
        ul.audit(base, unl, PAIRS, probes=["quant4"], metric="krs", progress=False)
    with pytest.raises(ConfigError, match="twice"):
        ul.audit(base, unl, PAIRS, probes=["quant4", "quant4"], progress=False)
    with pytest.raises(ul.PromptError, match="perturbed"):
        ul.audit(base, unl, PAIRS, perturbed=[[" red"]], probes=["quant4"], progress=False)
    with pytest.raises(ul.IncompatibleModelsError):
        ul.audit(base, build_model("gpt2", seed=1), PAIRS, probes=["quant4"], progress=False)


def _state(model):
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grad_flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            (len(h.fwd_hooks), len(h.bwd_hooks))
            for h in model.modules()
            if isinstance(h, HookPoint)
        ],
    }


def _same(a, b):
    assert a["modes"] == b["modes"] and a["grad_flags"] == b["grad_flags"]
    assert a["hooks"] == b["hooks"]
    assert all(torch.equal(v, b["weights"][k]) for k, v in a["weights"].items())
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("probe", available_probes())
def test_models_come_back_unchanged_also_when_interrupted(probe, monkeypatch):
    base = build_model("llama", seed=1)
    unl = perturbed(base, 0.2, seed=2)
    unl.blocks[1].train()
    unl.blocks[0].mlp.W_in.requires_grad_(False)
    unl.blocks[2].attn.W_Q.grad = torch.ones_like(unl.blocks[2].attn.W_Q)
    unl.blocks[3].hook_resid_pre.add_hook(lambda act, hook: act)  # the caller's own hook
    before = [_state(base), _state(unl)]
    kw = dict(
        retain=PAIRS[2:], holdout=HOLDOUT, paraphrases=PARAPHRASES, probes=[probe], progress=False
    )
    calls = {"n": 0, "stop": None}
    forward = HookedTransformer.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] >= calls["stop"]:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(HookedTransformer, "forward", counting)
    ul.audit(base, unl, PAIRS, **kw)
    _same(_state(base), before[0])
    _same(_state(unl), before[1])
    total, calls["n"], calls["stop"] = calls["n"], 0, calls["n"] // 2 + 1
    assert total >= 2
    with pytest.raises(KeyboardInterrupt):
        ul.audit(base, unl, PAIRS, **kw)
    _same(_state(base), before[0])
    _same(_state(unl), before[1])


def test_default_probes_skip_what_lacks_inputs(models, monkeypatch):
    from unlearnlens.audit import builtin
    from unlearnlens.audit.base import ProbeScore

    for name in builtin.__all__:  # only the choice of probes is under test here
        monkeypatch.setattr(getattr(builtin, name), "run", lambda *a: ProbeScore(1.0, 0.0, 0.5))
    base, unl = models
    r = ul.audit(base, unl, PAIRS[:2], probes=None, progress=False)
    assert "mia_loss" in r.meta["skipped"] and "holdout" in r.meta["skipped"]["mia_loss"]
    assert "in_context" in r.meta["skipped"]
    assert set(r.probes) | set(r.meta["skipped"]) == set(available_probes())
    assert set(r.probes).isdisjoint(r.meta["skipped"])
    assert r[("unlearned", "quant4")].recovered == 0.5


def test_dissect_keeps_the_audit_and_reports_it(models, result, tmp_path):
    from unlearnlens.study import StudyResult, dissect

    base, unl = models
    study = dissect(
        base,
        {"u": unl},
        PAIRS,
        analyses=["restore_w_out"],
        window=1,
        progress=False,
        audit=result,
    )
    assert study.audit is result
    index = study.report(tmp_path / "report")
    text = index.read_text()
    assert "Recovery attacks and memorisation metrics" in text and "in_context" in text
    assert (tmp_path / "report" / "audit_recovered.png").is_file()
    assert StudyResult.load(tmp_path / "report") == study
    assert StudyResult.load(study.save(tmp_path / "saved")).audit == result
