"""ul.score: the unlearned model's metric as it is now, against hand-computed logits."""

from __future__ import annotations

import copy

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed


def _per_prompt_logits(model, pairs):
    """Logits at the target positions, one unpadded prompt at a time (run_with_cache)."""
    out = []
    for prompt, answer in pairs:
        p = model.to_tokens(prompt)
        a = model.to_tokens(answer, prepend_bos=False)
        toks = torch.cat([p, a], 1)
        n, m = p.shape[1], a.shape[1]
        with torch.no_grad():
            logits, _ = model.run_with_cache(toks)
        out.append((logits[0, n - 1 : n + m - 1].float(), a[0]))
    return out


def _hand_krs(base, before, after, pairs) -> float:
    values = []
    for (zb, _), (zu, _), (zx, _) in zip(
        _per_prompt_logits(base, pairs),
        _per_prompt_logits(before, pairs),
        _per_prompt_logits(after, pairs),
    ):
        values.append(1 - ((zb - zx) ** 2).mean() / ((zb - zu) ** 2).mean())
    return float(torch.stack(values).mean())


def _hand_logprob(model, pairs) -> float:
    values = []
    for z, answer in _per_prompt_logits(model, pairs):
        lp = z.log_softmax(-1).gather(-1, answer[:, None])[:, 0]
        values.append(lp.mean())
    return float(torch.stack(values).mean())


def _by_hand(base, unlearned, layers, prefix):
    """A copy of the unlearned model with the base's ``prefix`` weights in ``layers``."""
    edited = copy.deepcopy(unlearned)
    with torch.no_grad():
        for name, p in edited.named_parameters():
            if any(name.startswith(f"blocks.{layer}.{prefix}") for layer in layers):
                p.copy_(base.get_parameter(name))
    return edited


@pytest.fixture
def pair(arch):
    base = build_model(arch, seed=1)
    return base, perturbed(base, 0.15, seed=2)


def test_score_inside_restored_is_the_krs_of_that_restoration(pair):
    base, unlearned = pair
    edited = _by_hand(base, unlearned, [2, 3], "mlp.")
    expected = _hand_krs(base, unlearned, edited, PAIRS)
    with ul.restored(base, unlearned, layers=[-2, -1], components="mlp"):
        got = ul.score(base, unlearned, PAIRS, batch_size=3)
        # nested: the original is the model before the outer block
        with ul.restored(base, unlearned, layers=[0], components="attn"):
            both = ul.score(base, unlearned, PAIRS)
        logprob = ul.score(base, unlearned, PAIRS, metric="answer_logprob")
    assert got == pytest.approx(expected, abs=1e-4)
    edited_both = _by_hand(base, edited, [0], "attn.")
    assert both == pytest.approx(_hand_krs(base, unlearned, edited_both, PAIRS), abs=1e-4)
    assert logprob == pytest.approx(_hand_logprob(edited, PAIRS), abs=1e-4)
    # the restoration agrees with the sweep's point restoring the same layers
    sweep = ul.restore_sweep(base, unlearned, PAIRS, components="mlp", mode="from_top", layers=[2])
    assert float(sweep.scores[0]) == pytest.approx(expected, abs=1e-4)


def test_score_after_restore_or_an_own_edit_takes_the_original(pair):
    base, unlearned = pair
    original = copy.deepcopy(unlearned)
    ul.restore_(base, unlearned, layers=[1], components="mlp.W_out")
    hand = _by_hand(base, original, [1], "mlp.W_out")
    got = ul.score(base, unlearned, PAIRS, original=original)
    assert got == pytest.approx(_hand_krs(base, original, hand, PAIRS), abs=1e-4)
    with torch.no_grad():  # an edit of one's own
        unlearned.blocks[0].attn.W_O.mul_(0.5)
    rec = ul.score(base, unlearned, PAIRS, metric="recovery", original=original)
    m_x, m_t, m_s = (_hand_logprob(m, PAIRS) for m in (unlearned, original, base))
    assert rec == pytest.approx((m_x - m_t) / (m_s - m_t), rel=1e-4)


def test_krs_needs_something_to_compare_with(pair):
    base, unlearned = pair
    with pytest.raises(ul.MetricError, match="original="):
        ul.score(base, unlearned, PAIRS)
    assert ul.score(base, unlearned, PAIRS, metric="accuracy") in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_score_leaves_the_models_as_they_were(pair):
    base, unlearned = pair
    with ul.restored(base, unlearned, layers=[1, 2], components="block"):
        inside = {k: v.clone() for k, v in unlearned.state_dict().items()}
        ul.score(base, unlearned, PAIRS)
        assert all(torch.equal(v, inside[k]) for k, v in unlearned.state_dict().items())


def test_an_interrupt_while_the_originals_are_back_leaves_the_restoration_in_place(
    pair, monkeypatch
):
    import unlearnlens.scoring as scoring

    base, unlearned = pair
    own = {k: v.clone() for k, v in unlearned.state_dict().items()}
    real = scoring.target_logits
    calls = []

    def interrupted(model, chunk):
        calls.append(model)
        if len(calls) == 3:  # base, unlearned as now, then the originals' pass
            raise KeyboardInterrupt
        return real(model, chunk)

    monkeypatch.setattr(scoring, "target_logits", interrupted)
    with ul.restored(base, unlearned, layers=[3], components="mlp"):
        inside = {k: v.clone() for k, v in unlearned.state_dict().items()}
        with pytest.raises(KeyboardInterrupt):
            ul.score(base, unlearned, PAIRS)
        assert all(torch.equal(v, inside[k]) for k, v in unlearned.state_dict().items())
        assert torch.equal(unlearned.blocks[3].mlp.W_out, base.blocks[3].mlp.W_out)
    assert all(torch.equal(v, own[k]) for k, v in unlearned.state_dict().items())


def test_a_bad_batch_size_is_refused_not_replaced(pair):
    base, unlearned = pair
    with ul.restored(base, unlearned, layers=[-1]):
        for bad in (0, -1, True):
            with pytest.raises(ul.ConfigError, match="batch_size"):
                ul.score(base, unlearned, PAIRS, metric="answer_logprob", batch_size=bad)
