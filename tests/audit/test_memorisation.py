"""Memorisation metrics against direct computations from ``model(tokens)`` logits."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from conftest import PAIRS, build_model, perturbed
from unlearnlens.audit.memorisation import (
    extraction_strength,
    loss_scores,
    membership_auc,
    min_k_plus_plus_scores,
    min_k_scores,
    truth_ratio_forget,
    truth_ratio_retain,
    truth_ratios,
    zlib_scores,
)
from unlearnlens.errors import ConfigError, PromptError
from unlearnlens.prompts import PromptSet


@pytest.fixture(scope="module")
def model():
    return build_model("llama", seed=1)


def _by_hand(model, pairs):
    """Per pair: the full-vocabulary log-probs at each answer position and the answer ids."""
    out = []
    for prompt, answer in pairs:
        p = model.to_tokens(prompt)[0].tolist()
        a = model.to_tokens(answer, prepend_bos=False)[0].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + a]))[0].float()
        logp = torch.log_softmax(logits, -1)
        rows = [logp[len(p) - 1 + t] for t in range(len(a))]
        out.append((rows, a, logits[len(p) - 1 : len(p) - 1 + len(a)]))
    return out


def test_loss_zlib_min_k_match_direct(model):
    hand = _by_hand(model, PAIRS)
    loss = loss_scores(model, PAIRS, batch_size=3)
    z = zlib_scores(model, PAIRS)
    mk = min_k_scores(model, PAIRS, k=0.5)
    mkpp = min_k_plus_plus_scores(model, PAIRS, k=0.5)
    for i, ((rows, ans, _), (_, answer)) in enumerate(zip(hand, PAIRS)):
        lps = [float(r[t]) for r, t in zip(rows, ans)]
        nll = -sum(lps) / len(lps)
        assert loss[i].item() == pytest.approx(nll, rel=1e-5)
        assert z[i].item() == pytest.approx(nll / len(zlib.compress(answer.encode())), rel=1e-5)
        n = max(1, int(len(lps) * 0.5))
        assert mk[i].item() == pytest.approx(-sum(sorted(lps)[:n]) / n, rel=1e-5)
        zs = []
        for r, t in zip(rows, ans):
            probs = [math.exp(float(v)) for v in r]
            mu = sum(pr * float(v) for pr, v in zip(probs, r))
            var = max(sum(pr * float(v) ** 2 for pr, v in zip(probs, r)) - mu * mu, 1e-6)
            zs.append((float(r[t]) - mu) / math.sqrt(var))
        assert mkpp[i].item() == pytest.approx(-sum(sorted(zs)[:n]) / n, rel=1e-4, abs=1e-5)


def test_membership_auc_is_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(7, generator=gen)
    h = torch.cat([torch.randn(5, generator=gen), f[:2]])  # ties count one half
    count = sum((1.0 if b > a else 0.5 if b == a else 0.0) for a in f.tolist() for b in h.tolist())
    assert membership_auc(f, h) == pytest.approx(count / (len(f) * len(h)))
    sklearn = pytest.importorskip("sklearn.metrics")
    labels = [0] * len(f) + [1] * len(h)
    assert membership_auc(f, h) == pytest.approx(
        sklearn.roc_auc_score(labels, torch.cat([f, h]).tolist())
    )
    with pytest.raises(ConfigError):
        membership_auc(torch.tensor([]), h)


def test_truth_ratio_matches_formula(model):
    correct = PAIRS[:2]
    wrong = [[(PAIRS[0][0], " Paris"), (PAIRS[0][0], " red blue")], [(PAIRS[1][0], " Rome")]]
    r = truth_ratios(model, correct, wrong)
    expect = []
    for (rows, ans, _), group in zip(_by_hand(model, correct), wrong):
        lc = -sum(float(x[t]) for x, t in zip(rows, ans)) / len(ans)
        lw = []
        for g_rows, g_ans, _ in _by_hand(model, group):
            lw.append(-sum(float(x[t]) for x, t in zip(g_rows, g_ans)) / len(g_ans))
        expect.append(math.exp(-sum(lw) / len(lw)) / (math.exp(-lc) + 1e-10))
    assert r.tolist() == pytest.approx(expect, rel=1e-4)
    assert truth_ratio_forget(r) == pytest.approx(
        sum(min(x, 1 / (x + 1e-10)) for x in expect) / 2, rel=1e-4
    )
    assert truth_ratio_retain(r) == pytest.approx(
        sum(max(0.0, 1 - x) for x in expect) / 2, rel=1e-4, abs=1e-6
    )
    flat = PromptSet.from_pairs(model, [pair for group in wrong for pair in group])
    r_flat = truth_ratios(model, correct, flat, counts=[2, 1])
    assert r_flat.tolist() == pytest.approx(expect, rel=1e-4)
    with pytest.raises(PromptError, match="counts"):
        truth_ratios(model, correct, flat, counts=[1, 1])
    with pytest.raises(PromptError, match="perturbed has 1 entries"):
        truth_ratios(model, correct, wrong[:1])


def test_extraction_strength_counts_the_completed_suffix():
    # Token-level model-free check: a model whose logits we control through the unembedding.
    model = build_model("gpt2", seed=3, tokenizer=False)
    ps = PromptSet.from_tokens([[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10]])
    z = _logits_of(model, ps)
    es = extraction_strength(model, ps)
    for i in range(len(ps)):
        m = int(ps.answer_lengths[i])
        pred = z[i, :m].argmax(-1).tolist()
        ans = ps.answer_tokens[i, :m].tolist()
        k = next(k for k in range(m + 1) if pred[k:] == ans[k:])
        assert es[i].item() == pytest.approx(1 - k / m)


def test_extraction_strength_on_a_model_that_knows_the_answer():
    model = build_model("gpt2", seed=3, tokenizer=False)
    ps = PromptSet.from_tokens([[1, 2, 3]], [[6, 7, 8]])
    z = _logits_of(model, ps)
    pred = z[0].argmax(-1).tolist()
    # Answer = the model's own greedy tokens from position 1 on, a wrong first token: ES = 2/3.
    wrong = (pred[0] + 1) % model.cfg.d_vocab
    forced = PromptSet.from_tokens([[1, 2, 3]], [[wrong, *_greedy_after(model, [1, 2, 3, wrong])]])
    assert extraction_strength(model, forced).item() == pytest.approx(2 / 3)


def _greedy_after(model, prefix, n=2):
    seq = list(prefix)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prefix) :]


def _logits_of(model, ps):
    with torch.no_grad():
        logits = model(ps.tokens)
    return logits.gather(1, ps.target_positions[..., None].expand(-1, -1, logits.shape[-1]))


def test_unlearned_model_scores_differ_and_models_unchanged(model):
    other = perturbed(model, 0.2, seed=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert not torch.equal(loss_scores(model, PAIRS), loss_scores(other, PAIRS))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError):
        min_k_scores(model, PAIRS, k=1.5)
