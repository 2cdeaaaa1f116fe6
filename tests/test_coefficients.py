"""MLP coefficients: read-out, streaming moments, direct logit contributions, comparison."""

from __future__ import annotations

import copy
import warnings

import matplotlib
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from conftest import PAIRS, build_model, perturbed, tiny_config
from unlearnlens.coefficients import (
    coefficient_positions,
    mlp_coefficient_stats,
    mlp_coefficients,
)
from unlearnlens.comparison import (
    CoefficientComparison,
    compare_coefficients,
    neuron_logit_contributions,
)
from unlearnlens.errors import ConfigError, IncompatibleModelsError, LayerError, PromptError
from unlearnlens.prompts import PromptSet

matplotlib.use("Agg")


# ------------------------------------------------------------------------------ helpers


def hand_positions(ps: PromptSet, kind: str) -> list[list[int]]:
    """The absolute positions each kind selects, written out per prompt."""
    out = []
    for n, m in zip(ps.prompt_lengths.tolist(), ps.answer_lengths.tolist(), strict=True):
        out.append(
            {
                "answer": list(range(n - 1, n + m - 1)),
                "prompt": list(range(n)),
                "all": list(range(n + m)),
                "last": [n - 1],
            }[kind]
        )
    return out


def full_cache(model: HookedTransformer, ps: PromptSet):
    with torch.no_grad():
        logits, cache = model.run_with_cache(ps.tokens)
    return logits, cache


def direct_logit(model, cache, vec, b, t, a):
    """Hand-written direct effect of a residual-stream component ``vec`` on logit ``a``."""
    vec = vec.detach().float()
    if model.cfg.normalization_type == "LN":
        vec = vec - vec.mean(-1, keepdim=True)
    scale = cache["ln_final.hook_scale"][b, t, 0].float()
    w, w_u = model.ln_final.w.detach().float(), model.unembed.W_U.detach().float()
    return float((vec / scale * w) @ w_u[:, a])


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grads": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(h.fwd_hooks), len(h.bwd_hooks)) for h in model.hook_dict.values()],
    }


def assert_unchanged(model, snap):
    after = snapshot(model)
    assert after["modes"] == snap["modes"]
    assert after["grads"] == snap["grads"]
    assert after["hooks"] == snap["hooks"]
    for k, v in snap["state"].items():
        assert torch.equal(after["state"][k], v), k


# ------------------------------------------------------------------------------ read-out


@pytest.mark.parametrize("kind", ["answer", "prompt", "all", "last"])
def test_mlp_coefficients_equal_cache(arch, kind):
    model = build_model(arch, seed=1)
    ps = PromptSet.from_pairs(model, PAIRS)
    layers = [0, 2, -1]
    values = mlp_coefficients(model, PAIRS, layers=layers, positions=kind, batch_size=3)
    sel = coefficient_positions(model, PAIRS, kind)
    _, cache = full_cache(model, ps)
    want_pos = hand_positions(ps, kind)
    width = max(len(p) for p in want_pos)
    assert values.shape == (3, len(PAIRS), width, model.cfg.d_mlp)
    assert sel.mask.shape == (len(PAIRS), width)
    for b, positions in enumerate(want_pos):
        assert sel.mask[b].tolist() == [j < len(positions) for j in range(width)]
        assert sel.positions[b, : len(positions)].tolist() == positions
        for i, layer in enumerate([0, 2, 3]):
            ref = cache[f"blocks.{layer}.mlp.hook_post"][b, positions]
            torch.testing.assert_close(values[i, b, : len(positions)], ref, atol=1e-5, rtol=1e-5)
            assert bool((values[i, b, len(positions) :] == 0).all())


def test_mlp_coefficients_bfloat16():
    model = build_model("llama", seed=1, dtype=torch.bfloat16)
    values = mlp_coefficients(model, PAIRS, layers=[1])
    assert values.dtype == torch.bfloat16
    _, cache = full_cache(model, PromptSet.from_pairs(model, PAIRS))
    ps = PromptSet.from_pairs(model, PAIRS)
    for b, positions in enumerate(hand_positions(ps, "answer")):
        torch.testing.assert_close(
            values[0, b, : len(positions)].float(),
            cache["blocks.1.mlp.hook_post"][b, positions].float(),
            atol=0.05,
            rtol=0.05,
        )


def test_streaming_stats_equal_full_reduction(arch):
    model = build_model(arch, seed=3)
    for kind in ("answer", "all"):
        full = mlp_coefficients(model, PAIRS, positions=kind, layers=[1, 3]).double()
        mask = coefficient_positions(model, PAIRS, kind).mask
        stats = mlp_coefficient_stats(model, PAIRS, positions=kind, layers=[1, 3], batch_size=3)
        real = full[:, mask]  # [layer, n_real, d_mlp]
        assert stats.count == int(mask.sum()) == real.shape[1]
        assert stats.layers == (1, 3)
        close = {"atol": 1e-5, "rtol": 1e-4}
        torch.testing.assert_close(stats.mean, real.mean(1).float(), **close)
        torch.testing.assert_close(stats.mean_abs, real.abs().mean(1).float(), **close)
        torch.testing.assert_close(stats.mean_sq, real.square().mean(1).float(), **close)
        torch.testing.assert_close(stats.std, real.std(1, unbiased=False).float(), **close)


# ------------------------------------------------------------------- direct contributions


def test_direct_contributions_add_up_to_the_logit(arch):
    """Neurons + embeddings + attention + biases = the model's own answer logit."""
    model = build_model(arch, seed=4)
    ps = PromptSet.from_pairs(model, PAIRS)
    contrib = neuron_logit_contributions(model, PAIRS, batch_size=3)
    assert contrib.shape == (model.cfg.n_layers, len(PAIRS), ps.max_answer_len, model.cfg.d_mlp)
    logits, cache = full_cache(model, ps)
    n_layers = model.cfg.n_layers
    for b, positions in enumerate(hand_positions(ps, "answer")):
        n = int(ps.prompt_lengths[b])
        for j, t in enumerate(positions):
            a = int(ps.tokens[b, t + 1])
            parts = [cache["hook_embed"][b, t]]
            if "hook_pos_embed" in cache:
                parts.append(cache["hook_pos_embed"][b, t])
            for layer in range(n_layers):
                parts.append(cache[f"blocks.{layer}.hook_attn_out"][b, t])
                parts.append(model.blocks[layer].mlp.b_out)
            resid = cache[f"blocks.{n_layers - 1}.hook_resid_post"][b, t]
            mlp_neurons = sum(
                cache[f"blocks.{layer}.hook_mlp_out"][b, t] - model.blocks[layer].mlp.b_out
                for layer in range(n_layers)
            )
            torch.testing.assert_close(sum(parts) + mlp_neurons, resid, atol=1e-4, rtol=1e-4)
            other = sum(direct_logit(model, cache, p, b, t, a) for p in parts)
            constant = float(model.unembed.b_U[a].detach())
            if model.cfg.normalization_type == "LN":
                constant += float(model.ln_final.b.detach() @ model.unembed.W_U[:, a].detach())
            neurons = float(contrib[:, b, j].sum())
            assert neurons + other + constant == pytest.approx(float(logits[b, t, a]), abs=2e-4)
            # each layer's neurons add up to its MLP output (minus bias) read out by hand
            for layer in range(n_layers):
                out = cache[f"blocks.{layer}.hook_mlp_out"][b, t] - model.blocks[layer].mlp.b_out
                assert float(contrib[layer, b, j].sum()) == pytest.approx(
                    direct_logit(model, cache, out, b, t, a), abs=1e-4
                )
        # one neuron, written out: coefficient x readout / scale
        layer, neuron, t, j = n_layers - 1, 5, positions[0], 0
        a = int(ps.tokens[b, t + 1])
        c = cache[f"blocks.{layer}.mlp.hook_post"][b, t, neuron]
        want = c * direct_logit(model, cache, model.blocks[layer].mlp.W_out[neuron], b, t, a)
        assert float(contrib[layer, b, j, neuron]) == pytest.approx(float(want), abs=1e-5)
        assert bool((contrib[:, b, len(positions) :] == 0).all())
        assert n >= 1


# ------------------------------------------------------------------------------ comparison


def test_compare_coefficients_against_hand_computation(model_pair):
    base, unlearned = model_pair
    ps = PromptSet.from_pairs(base, PAIRS)
    result = compare_coefficients(base, unlearned, PAIRS, top_k=7, batch_size=3)
    assert isinstance(result, CoefficientComparison)
    logits_b, cache_b = full_cache(base, ps)
    logits_u, cache_u = full_cache(unlearned, ps)
    n_layers = base.cfg.n_layers
    sums = {
        k: torch.zeros(n_layers, dtype=torch.float64)
        for k in ("abs", "rel", "cos", "eff", "coef", "cb")
    }
    z_b = z_u = 0.0
    count = 0
    for b, positions in enumerate(hand_positions(ps, "answer")):
        for t in positions:
            a = int(ps.tokens[b, t + 1])
            z_b += float(logits_b[b, t, a])
            z_u += float(logits_u[b, t, a])
            count += 1
            for layer in range(n_layers):
                name = f"blocks.{layer}.mlp.hook_post"
                cb, cu = cache_b[name][b, t], cache_u[name][b, t]
                sums["abs"][layer] += float((cu - cb).abs().mean())
                sums["rel"][layer] += float((cu - cb).norm() / cb.norm())
                sums["cos"][layer] += float(cu @ cb / (cu.norm() * cb.norm()))
                out_b = cache_b[f"blocks.{layer}.hook_mlp_out"][b, t] - base.blocks[layer].mlp.b_out
                out_u = (
                    cache_u[f"blocks.{layer}.hook_mlp_out"][b, t]
                    - unlearned.blocks[layer].mlp.b_out
                )
                dla_b = direct_logit(base, cache_b, out_b, b, t, a)
                sums["cb"][layer] += dla_b
                sums["eff"][layer] += direct_logit(unlearned, cache_u, out_u, b, t, a) - dla_b
                moved = (cu - cb) @ base.blocks[layer].mlp.W_out
                sums["coef"][layer] += direct_logit(base, cache_b, moved, b, t, a)
    assert result.n_positions == count
    assert result.base_logit == pytest.approx(z_b / count, abs=1e-4)
    assert result.unlearned_logit == pytest.approx(z_u / count, abs=1e-4)
    mean = {k: (v / count).float() for k, v in sums.items()}
    torch.testing.assert_close(result.mean_abs_delta, mean["abs"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.relative_shift, mean["rel"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.cosine, mean["cos"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.base_contribution, mean["cb"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.logit_effect, mean["eff"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.coefficient_effect, mean["coef"], atol=1e-4, rtol=1e-4)
    change = z_u / count - z_b / count
    torch.testing.assert_close(result.logit_share, mean["eff"] / change, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(
        result.coefficient_share, mean["coef"] / change, atol=1e-3, rtol=1e-3
    )
    # per-neuron tables sum to the per-layer numbers, rankings follow them
    torch.testing.assert_close(result.neuron_logit_effect.sum(-1), result.logit_effect)
    assert len(result.top_by_logit) == len(result.top_by_coefficient) == 7
    flat = result.neuron_logit_effect.abs().flatten()
    order = flat.argsort(descending=True)[:7].tolist()
    d_mlp = base.cfg.d_mlp
    assert [(r.layer, r.neuron) for r in result.top_by_logit] == [
        (i // d_mlp, i % d_mlp) for i in order
    ]
    order = result.neuron_abs_delta.flatten().argsort(descending=True)[:7].tolist()
    assert [(r.layer, r.neuron) for r in result.top_by_coefficient] == [
        (i // d_mlp, i % d_mlp) for i in order
    ]
    for r in result.top_by_logit:
        assert r.logit_effect == pytest.approx(r.coefficient_effect + r.readout_effect, abs=1e-6)
    frame = result.to_dataframe()
    assert list(frame["layer"]) == list(range(n_layers))
    assert frame["logit_effect"].tolist() == pytest.approx(result.logit_effect.tolist())
    assert len(result.neurons_dataframe("coefficient")) == 7
    import matplotlib.pyplot as plt

    panels = result.plot()
    assert len(panels) == 3 and len(panels[0].figure.axes) == 3
    _, own = plt.subplots(1, 3)
    assert tuple(result.plot(ax=own)) == tuple(own)
    assert list(own[1].get_lines()[0].get_ydata()) == pytest.approx(result.cosine.tolist())
    plt.close("all")


def test_planted_coefficient_change_is_the_top_neuron(arch):
    base = build_model(arch, seed=5)
    unlearned = copy.deepcopy(base)
    last, neuron = base.cfg.n_layers - 1, 11
    with torch.no_grad():
        unlearned.blocks[last].mlp.W_in[:, neuron] *= -3.0
    result = compare_coefficients(base, unlearned, PAIRS, layers=[1, -1], top_k=3)
    assert result.layers == (1, last)
    first = result.top_by_coefficient[0]
    assert (first.layer, first.neuron) == (last, neuron)
    assert float(result.mean_abs_delta[0]) == 0.0
    assert float(result.cosine[0]) == pytest.approx(1.0, abs=1e-6)
    others = torch.ones(base.cfg.d_mlp, dtype=torch.bool)
    others[neuron] = False
    assert float(result.neuron_abs_delta[1, others].abs().max()) == 0.0
    # only the coefficient moved in the last layer: the coefficient-only effect of the neuron
    # is its coefficient change read out with the (shared) weights and the base model's scale
    assert result.top_by_coefficient[0].coefficient_effect != 0.0


def test_compare_with_itself_is_zero():
    model = build_model("gpt2", seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compare_coefficients(model, model, PAIRS)
    assert any("undefined" in str(w.message) for w in caught)
    assert float(result.mean_abs_delta.abs().max()) == 0.0
    torch.testing.assert_close(result.cosine, torch.ones(model.cfg.n_layers))
    assert bool(result.logit_share.isnan().all())


# ------------------------------------------------------------------------------ bad input


def other_d_mlp(arch: str) -> HookedTransformer:
    base = build_model(arch, seed=1)
    cfg = tiny_config(arch, d_vocab=base.cfg.d_vocab).to_dict()
    cfg["d_mlp"] = 80
    return HookedTransformer(HookedTransformerConfig.from_dict(cfg), tokenizer=base.tokenizer)


def test_bad_input(arch):
    model = build_model(arch, seed=1)
    with pytest.raises(LayerError, match="layer 4 is out of range"):
        mlp_coefficients(model, PAIRS, layers=[0, 4])
    with pytest.raises(LayerError, match="-5"):
        mlp_coefficient_stats(model, PAIRS, layers=-5)
    with pytest.raises(PromptError, match="'answers'"):
        mlp_coefficients(model, PAIRS, positions="answers")
    with pytest.raises(PromptError, match="'each'"):
        mlp_coefficient_stats(model, PAIRS, positions="each")
    with pytest.raises(PromptError):
        mlp_coefficients(model, [])
    with pytest.raises(ConfigError, match="batch_size"):
        mlp_coefficients(model, PAIRS, batch_size=0)
    with pytest.raises(IncompatibleModelsError, match="d_mlp"):
        compare_coefficients(model, other_d_mlp(arch), PAIRS)
    with pytest.raises(LayerError, match="out of range"):
        compare_coefficients(model, model, PAIRS, layers=[7])
    with pytest.raises(ConfigError, match="top_k"):
        compare_coefficients(model, model, PAIRS, top_k=0)


# ------------------------------------------------------------------------------ guards


def test_models_come_back_unchanged():
    base = build_model("gpt2", seed=1)
    unlearned = perturbed(base, 0.15, seed=2)
    base.train()
    unlearned.blocks[1].train()
    for p in list(unlearned.parameters())[::3]:
        p.requires_grad_(False)
    before = [snapshot(base), snapshot(unlearned)]
    mlp_coefficients(base, PAIRS)
    mlp_coefficient_stats(unlearned, PAIRS, positions="all")
    neuron_logit_contributions(unlearned, PAIRS)
    compare_coefficients(base, unlearned, PAIRS)
    assert_unchanged(base, before[0])
    assert_unchanged(unlearned, before[1])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_models_unchanged_after_an_error_midway(error):
    base = build_model("llama", seed=1)
    unlearned = perturbed(base, 0.1, seed=3)
    unlearned.train()

    def boom(act, hook):
        raise error("stop")

    unlearned.blocks[2].hook_resid_post.add_hook(boom)  # the caller's own hook
    before = [snapshot(base), snapshot(unlearned)]
    with pytest.raises(error):
        mlp_coefficients(unlearned, PAIRS, layers=[0, 3])
    with pytest.raises(error):
        compare_coefficients(base, unlearned, PAIRS)
    assert_unchanged(base, before[0])
    assert_unchanged(unlearned, before[1])
    assert len(unlearned.blocks[2].hook_resid_post.fwd_hooks) == 1
    unlearned.reset_hooks()
