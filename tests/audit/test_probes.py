"""Linear probes: a planted feature is found from the layer it appears at, and no earlier."""

from __future__ import annotations

import pytest
import torch

from conftest import PAIRS, build_model
from unlearnlens.audit.probes import fit_linear_probes, last_prompt_residuals
from unlearnlens.errors import ConfigError
from unlearnlens.prompts import PromptSet

pytest.importorskip("sklearn")


def _planted(n, n_layers, k, d, seed, n_classes=4):
    """Residuals where the label is a direction added from layer ``k`` on, noise before."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    dirs = torch.randn(n_classes, d, generator=torch.Generator().manual_seed(99)) * 3
    resid = torch.randn(n_layers, n, d, generator=gen)
    resid[k:] += dirs[labels][None]
    return resid, labels + 10  # token ids


def test_planted_feature_found_at_the_right_layer():
    k = 3
    train, y_train = _planted(200, 6, k, 16, seed=0)
    test, y_test = _planted(200, 6, k, 16, seed=1)
    probes = fit_linear_probes(train, y_train)
    acc = probes.accuracy(test, y_test)
    assert probes.classes == (10, 11, 12, 13)
    assert acc[:k].max() < 0.45  # chance is 0.25
    assert acc[k:].min() > 0.95
    # answer vs distractor: a random distractor per row
    distractors = [[10 + (int(y) - 10 + 1) % 4] for y in y_test]
    pair = probes.pairwise_accuracy(test, y_test, distractors)
    assert pair[:k].max() < 0.7 and pair[k:].min() > 0.95
    with pytest.raises(ConfigError, match="two classes"):
        fit_linear_probes(train, torch.full((200,), 5))


def test_residuals_are_the_cached_resid_post_at_the_last_prompt_token():
    model = build_model("llama", seed=1)
    ps = PromptSet.from_pairs(model, PAIRS)
    got = last_prompt_residuals(model, ps, layers=[1, 3], batch_size=3)
    for i, (prompt, _) in enumerate(PAIRS):
        _, cache = model.run_with_cache(model.to_tokens(prompt))
        for j, layer in enumerate([1, 3]):
            expect = cache[f"blocks.{layer}.hook_resid_post"][0, -1]
            assert torch.allclose(got[j, i], expect, atol=1e-5)


def test_planted_in_a_model_from_layer_k():
    """Identical prompts; a hook writes a label direction into the residual stream at block k."""
    model = build_model("gpt2", seed=1)
    ps = PromptSet.from_pairs(model, [("the capital of France is", " Paris")] * 24)
    labels = torch.tensor([0, 1, 2] * 8)
    direction = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    k = 2

    def plant(act, hook):
        return act + 5 * direction[labels][:, None, :]

    with model.hooks(fwd_hooks=[(f"blocks.{k}.hook_resid_pre", plant)]):
        resid = last_prompt_residuals(model, ps)
    train, test = torch.arange(0, 24, 2), torch.arange(1, 24, 2)
    probes = fit_linear_probes(resid[:, train], labels[train] + 20)
    acc = probes.accuracy(resid[:, test], labels[test] + 20)
    assert acc[:k].max() <= 0.5  # identical residuals before block k: one class for all
    assert acc[k:].min() == 1.0
    assert model.hook_dict[f"blocks.{k}.hook_resid_pre"].fwd_hooks == []
