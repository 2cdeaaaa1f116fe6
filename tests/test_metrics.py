"""Each metric against a direct computation written out here, prompt by prompt."""

from __future__ import annotations

import math

import pytest
import torch

import unlearnlens as ul
from unlearnlens.errors import MetricError
from unlearnlens.metrics import resolve_metric


@pytest.fixture
def case():
    ps = ul.PromptSet.from_tokens([[1, 2, 3], [1, 4], [1, 5, 6, 7]], [[8, 9], [3], [2, 4, 6]])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 11, generator=gen)
    return ps, logits


def _answers(ps):
    out = []
    for i in range(len(ps)):
        m = int(ps.answer_lengths[i])
        out.append([int(t) for t in ps.answer_tokens[i, :m]])
    return out


def test_answer_logprob_and_prob(case):
    ps, logits = case
    got_lp = ul.metrics.answer_logprob(logits, ps)
    got_p = ul.metrics.answer_prob(logits, ps)
    for i, answer in enumerate(_answers(ps)):
        lps, ps_ = [], []
        for j, tok in enumerate(answer):
            row = logits[i, j].double()
            lp = float(row[tok] - torch.logsumexp(row, 0))
            lps.append(lp)
            ps_.append(math.exp(lp))
        assert float(got_lp[i]) == pytest.approx(sum(lps) / len(lps), abs=1e-6)
        assert float(got_p[i]) == pytest.approx(sum(ps_) / len(ps_), abs=1e-6)


def test_accuracy(case):
    ps, logits = case
    logits = logits.clone()
    answers = _answers(ps)
    for j, tok in enumerate(answers[0]):
        logits[0, j, tok] = 100.0  # prompt 0 all right
    logits[1, 0, answers[1][0]] = 100.0  # prompt 1 right
    logits[2, 0, answers[2][0]] = 100.0  # prompt 2 right only at its first token
    logits[2, 1, answers[2][1]] = -100.0
    logits[1, 1:, :] = 0.0  # padded slots of prompt 1 never count
    assert ul.metrics.accuracy(logits, ps).tolist() == [1.0, 1.0, 0.0]


def test_krs_by_formula(case):
    ps, logits = case
    gen = torch.Generator().manual_seed(1)
    z_s = torch.randn(logits.shape, generator=gen)
    z_t = torch.randn(logits.shape, generator=gen)
    got = ul.metrics.krs(logits, ps, source_logits=z_s, target_logits=z_t)
    for i in range(len(ps)):
        m = int(ps.answer_lengths[i])
        num = ((z_s[i, :m] - logits[i, :m]) ** 2).mean()
        den = ((z_s[i, :m] - z_t[i, :m]) ** 2).mean()
        assert float(got[i]) == pytest.approx(float(1 - num / den), abs=1e-6)
    assert torch.allclose(
        ul.metrics.krs(z_t, ps, source_logits=z_s, target_logits=z_t), torch.zeros(3)
    )
    assert torch.allclose(
        ul.metrics.krs(z_s, ps, source_logits=z_s, target_logits=z_t), torch.ones(3)
    )


def test_krs_leaves_out_prompts_where_models_agree(case):
    ps, logits = case
    z_s = torch.randn(logits.shape)
    z_t = z_s.clone()
    z_t[0] += 1.0
    got = ul.metrics.krs(logits, ps, source_logits=z_s, target_logits=z_t)
    assert not torch.isnan(got[0]) and torch.isnan(got[1:]).all()
    bound = resolve_metric("krs")
    with pytest.warns(UserWarning, match="leaves out 2 of 3"):
        left = bound.check_references(z_s, z_t, ps)
    assert left.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="undefined for every prompt"):
        bound.check_references(z_s, z_s.clone(), ps)


def test_metrics_are_float32_for_low_precision_logits(case):
    ps, logits = case
    lp16 = ul.metrics.answer_logprob(logits.bfloat16(), ps)
    assert lp16.dtype == torch.float32
    assert torch.allclose(lp16, ul.metrics.answer_logprob(logits.bfloat16().float(), ps))


def test_recovery():
    assert ul.metrics.recovery(-2.0, source=-1.0, target=-3.0) == pytest.approx(0.5)
    with pytest.raises(MetricError):
        ul.metrics.recovery(-2.0, source=-1.0, target=-1.0)
    bound = resolve_metric("recovery")
    per = torch.tensor([[-2.0, -4.0]])
    assert float(bound.aggregate(per, baseline=-5.0, reference=-1.0)[0]) == pytest.approx(0.5)


def test_resolve_metric_errors_and_custom():
    with pytest.raises(MetricError, match="known metrics"):
        resolve_metric("rouge")
    with pytest.raises(MetricError):
        resolve_metric(3)

    def top_logit(logits, prompts):
        return logits[:, 0].max(-1).values

    bound = resolve_metric(top_logit)
    assert bound.name == "top_logit"
    ps = ul.PromptSet.from_tokens([[1, 2]], [[3]])
    z = torch.randn(1, 1, 5)
    assert torch.equal(bound(z, ps, z, z), z[:, 0].max(-1).values)
