"""Activation patching against independent computations: TransformerLens's own patching
functions, and the study's experiment written out with hand-made hooks, prompt by prompt."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import patching as tl_patching

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens.errors import (
    HookError,
    IncompatibleModelsError,
    LayerError,
    MetricError,
    PromptError,
)

EQUAL_PAIRS = [
    ("the capital of France", " Paris Rome"),
    ("Tolo eats bread and", " fish rice"),
    ("Mira was born in", " Rome Paris"),
]


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values()),
    )


def _assert_unchanged(model, snap):
    state, modes, grads, n_hooks = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values()) == n_hooks


def _logprob_metric(ps):
    """A TransformerLens-style metric: full logits -> mean answer log-prob (written out)."""

    def metric(logits):
        logp = torch.log_softmax(logits.float(), -1)
        vals = []
        for i in range(len(ps)):
            n, m = int(ps.prompt_lengths[i]), int(ps.answer_lengths[i])
            toks = ps.tokens[i, n : n + m]
            vals.append(logp[i, n - 1 : n + m - 1].gather(-1, toks[:, None]).mean())
        return torch.stack(vals).mean()

    return metric


@pytest.mark.parametrize(
    ("hook", "tl_fn"),
    [
        ("hook_resid_pre", tl_patching.get_act_patch_resid_pre),
        ("hook_attn_out", tl_patching.get_act_patch_attn_out),
        ("hook_mlp_out", tl_patching.get_act_patch_mlp_out),
    ],
)
def test_each_position_matches_transformer_lens(model_pair, hook, tl_fn):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, EQUAL_PAIRS)
    assert len(set(ps.seq_lengths.tolist())) == 1
    with torch.no_grad():
        _, base_cache = base.run_with_cache(ps.tokens)
        expected = tl_fn(unlearned, ps.tokens, base_cache, _logprob_metric(ps))
    got = ul.patch(
        base, unlearned, ps, hooks=hook, positions="each", metric="answer_logprob", progress=False
    )
    assert got.dims == ("layer", "pos")
    assert got.scores.shape == expected.shape
    assert (got.scores - expected).abs().max() <= 1e-5


def _study_loop(base, unlearned, pairs, hooks, window):
    """The study's experiment written literally: one prompt at a time (no padding), the
    base's activations patched at all positions over a window, KRS over target positions."""
    n_layers = base.cfg.n_layers
    half = window // 2
    per_layer = []
    for centre in range(n_layers):
        layers = range(max(0, centre - half), min(n_layers, centre + half + 1))
        krs_values = []
        for prompt, answer in pairs:
            p = base.to_tokens(prompt)
            a = base.to_tokens(answer, prepend_bos=False)
            toks = torch.cat([p, a], 1)
            n, m = p.shape[1], a.shape[1]
            with torch.no_grad():
                z_base, cache = base.run_with_cache(toks)
                z_unl = unlearned(toks)
                fwd = [
                    (f"blocks.{layer}.{h}", lambda act, hook, cache=cache: cache[hook.name])
                    for layer in layers
                    for h in hooks
                ]
                z_x = unlearned.run_with_hooks(toks, fwd_hooks=fwd)
            sl = slice(n - 1, n + m - 1)
            zb, zu, zx = (z[0, sl].float() for z in (z_base, z_unl, z_x))
            krs_values.append(1 - ((zb - zx) ** 2).mean() / ((zb - zu) ** 2).mean())
        per_layer.append(torch.stack(krs_values).mean())
    return torch.stack(per_layer)


@pytest.mark.parametrize("hooks", [["mlp.hook_post"], ["mlp.hook_post", "hook_attn_out"]])
def test_study_sweep_matches_literal_hook_loop(model_pair, hooks):
    base, unlearned = model_pair
    expected = _study_loop(base, unlearned, PAIRS, hooks, window=5)
    got = ul.patch(base, unlearned, PAIRS, hooks=hooks, window=5, metric="krs", progress=False)
    assert got.metric == "krs"
    assert (got.scores - expected).abs().max() <= 1e-5
    assert got.baseline == pytest.approx(0.0, abs=1e-6)
    assert got.reference == pytest.approx(1.0, abs=1e-6)
    # the named form is the same sweep
    if hooks == ["mlp.hook_post"]:
        named = ul.patch_mlp_coefficients(base, unlearned, PAIRS, window=5, progress=False)
        assert torch.equal(named.scores, got.scores)


def test_chunked_batches_give_the_same_scores(model_pair):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, PAIRS)
    whole = ul.patch_attention(base, unlearned, ps, window=3, progress=False)
    chunked = ul.patch_attention(base, unlearned, ps, window=3, batch_size=1, progress=False)
    assert (whole.scores - chunked.scores).abs().max() <= 1e-5
    each = ul.patch_residual(
        base, unlearned, ps, positions="each", metric="answer_logprob", progress=False
    )
    each_chunked = ul.patch_residual(
        base, unlearned, ps, positions="each", metric="answer_logprob", batch_size=3, progress=False
    )
    assert (each.scores - each_chunked.scores).abs().max() <= 1e-5


def test_patching_a_model_with_itself_gives_the_baseline(arch):
    model = build_model(arch, seed=3)
    for positions in ["all", "last", "each"]:
        res = ul.patch(
            model,
            model,
            PAIRS,
            hooks=["mlp.hook_post", "hook_attn_out"],
            positions=positions,
            metric="answer_logprob",
            progress=False,
        )
        assert res.baseline == pytest.approx(res.reference, abs=1e-6)
        if positions != "each":
            assert (res.scores - res.baseline).abs().max() <= 1e-5
            continue
        # per position, each prompt that has the position scores as the unpatched model
        ps = ul.PromptSet.from_pairs(model, PAIRS)
        with torch.no_grad():
            logits = model(ps.tokens, attention_mask=ps.attention_mask)
        rows = torch.arange(len(ps))[:, None]
        own = ul.metrics.answer_logprob(logits[rows, ps.target_positions].float(), ps)
        have = ~res.per_prompt.isnan()
        assert bool(have.any(-1).all())
        diff = (res.per_prompt - own).abs()
        assert float(diff[have].max()) <= 1e-5


def test_resid_pre_layer0_recovers_source_when_models_differ_only_in_embedding(arch):
    base = build_model(arch, seed=4)
    unlearned = copy.deepcopy(base)
    with torch.no_grad():
        unlearned.embed.W_E.add_(0.5 * torch.randn_like(unlearned.embed.W_E))
    res = ul.patch_residual(base, unlearned, PAIRS, layers=[0], progress=False)
    assert res.scores[0] == pytest.approx(1.0, abs=1e-5)
    # and at the other end: the last block's output carries everything when the models share
    # only the final norm and unembedding
    other = perturbed(base, 0.2, seed=5)
    other.load_state_dict(
        {
            **other.state_dict(),
            **{k: v for k, v in base.state_dict().items() if k.startswith(("unembed", "ln_final"))},
        }
    )
    last = base.cfg.n_layers - 1
    res = ul.patch_residual(base, other, PAIRS, hook="resid_post", layers=[last], progress=False)
    assert res.scores[0] == pytest.approx(1.0, abs=1e-5)


def test_window_one_equals_a_single_layer_hook(model_pair):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, PAIRS)
    res = ul.patch_attention(base, unlearned, ps, window=1, metric="answer_logprob", progress=False)
    metric = _logprob_metric(ps)
    with torch.no_grad():
        _, cache = base.run_with_cache(ps.tokens, attention_mask=ps.attention_mask)
        for layer in range(base.cfg.n_layers):
            name = f"blocks.{layer}.hook_attn_out"
            logits = unlearned.run_with_hooks(
                ps.tokens,
                attention_mask=ps.attention_mask,
                fwd_hooks=[(name, lambda act, hook: cache[hook.name])],
            )
            assert res.scores[layer] == pytest.approx(float(metric(logits)), abs=1e-5)


def test_positions_after_the_last_target_change_nothing(model_pair):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, PAIRS)
    res = ul.patch_residual(
        base, unlearned, ps, positions="each", metric="answer_logprob", progress=False
    )
    # per prompt: positions past that prompt's own last target leave it at its baseline, and
    # its padding is left out (NaN)
    pp = res.per_prompt
    base_pp = ul.patch(
        unlearned,
        unlearned,
        ps,
        hooks="hook_resid_pre",
        layers=[0],
        metric="answer_logprob",
        progress=False,
    ).per_prompt[0]
    for i in range(len(ps)):
        after, length = int(ps.last_target_position[i]) + 1, int(ps.seq_lengths[i])
        tail = pp[:, after:length, i]
        assert tail.numel() > 0
        assert torch.allclose(tail, base_pp[i].expand_as(tail), atol=1e-5)
        assert bool(pp[:, length:, i].isnan().all())
    first_unused = int(ps.last_target_position.max()) + 1
    assert first_unused < ps.seq_len
    for pos in range(first_unused, ps.seq_len):
        have = pos < ps.seq_lengths
        expected = base_pp[have].mean().expand(base.cfg.n_layers)
        assert torch.allclose(res.scores[:, pos], expected, atol=1e-5)


@pytest.mark.parametrize("positions", ["prompt", "answer", "last"])
def test_position_subsets_match_a_hand_hook(model_pair, positions):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, PAIRS)
    layer = 1
    res = ul.patch(
        base,
        unlearned,
        ps,
        hooks="mlp.hook_post",
        layers=[layer],
        positions=positions,
        metric="answer_logprob",
        progress=False,
    )
    mask = ps.position_mask(positions)
    with torch.no_grad():
        _, cache = base.run_with_cache(ps.tokens, attention_mask=ps.attention_mask)
        name = f"blocks.{layer}.mlp.hook_post"

        def hook(act, hook):
            return torch.where(mask[..., None], cache[name], act)

        logits = unlearned.run_with_hooks(
            ps.tokens, attention_mask=ps.attention_mask, fwd_hooks=[(name, hook)]
        )
    assert res.scores[0] == pytest.approx(float(_logprob_metric(ps)(logits)), abs=1e-5)


def test_bfloat16_models_score_in_float32(arch):
    base = build_model(arch, seed=1, dtype=torch.bfloat16)
    unlearned = perturbed(base, 0.15, seed=2)
    res = ul.patch_mlp_coefficients(base, unlearned, PAIRS, window=3, progress=False)
    assert res.scores.dtype == torch.float32
    assert torch.isfinite(res.scores).all()
    assert res.baseline == pytest.approx(0.0, abs=1e-6) and res.reference == pytest.approx(
        1.0, abs=1e-6
    )
    # the same sweep in float32 on the same (upcast) weights agrees roughly
    base32, unl32 = copy.deepcopy(base).float(), copy.deepcopy(unlearned).float()
    res32 = ul.patch_mlp_coefficients(base32, unl32, PAIRS, window=3, progress=False)
    assert (res.scores - res32.scores).abs().max() < 0.15


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_models_come_back_unchanged_when_the_metric_raises(model_pair, interrupt):
    base, unlearned = model_pair
    unlearned.train()
    unlearned.blocks[0].mlp.W_in.requires_grad_(False)
    snaps = _snapshot(base), _snapshot(unlearned)
    calls = {"n": 0}

    def exploding(logits, prompts):
        calls["n"] += 1
        if calls["n"] == 5:
            raise interrupt("stop here")
        return logits[:, 0, 0]

    with pytest.raises(interrupt):
        ul.patch(
            base,
            unlearned,
            PAIRS,
            hooks=["mlp.hook_post", "hook_attn_out"],
            positions="each",
            metric=exploding,
            progress=False,
        )
    assert calls["n"] == 5
    _assert_unchanged(base, snaps[0])
    _assert_unchanged(unlearned, snaps[1])
    assert unlearned.training and not base.training


def test_callers_hooks_are_kept(model_pair):
    base, unlearned = model_pair
    seen = []
    unlearned.add_hook("blocks.0.hook_resid_pre", lambda act, hook: seen.append(1))
    ul.patch_attention(base, unlearned, PAIRS, progress=False)
    assert len(unlearned.hook_dict["blocks.0.hook_resid_pre"].fwd_hooks) == 1
    unlearned.reset_hooks()


def test_bad_input_is_rejected_before_any_work(model_pair):
    base, unlearned = model_pair
    calls = []

    def counting(logits, prompts):
        calls.append(1)
        return logits[:, 0, 0]

    with pytest.raises(HookError, match=r"valid hooks: .*mlp\.hook_post"):
        ul.patch(base, unlearned, PAIRS, hooks="mlp.hook_nonsense", metric=counting)
    with pytest.raises(LayerError, match="layer 9 is out of range"):
        ul.patch(base, unlearned, PAIRS, hooks="hook_attn_out", layers=[0, 9], metric=counting)
    for bad in (0, 2, -3):
        with pytest.raises(LayerError, match="positive odd"):
            ul.patch(base, unlearned, PAIRS, hooks="hook_attn_out", window=bad, metric=counting)
    with pytest.raises(PromptError, match="positions must be one of"):
        ul.patch(base, unlearned, PAIRS, hooks="hook_attn_out", positions="middle", metric=counting)
    with pytest.raises(PromptError, match="empty"):
        ul.patch(base, unlearned, [], hooks="hook_attn_out", metric=counting)
    with pytest.raises(MetricError, match="unknown metric"):
        ul.patch(base, unlearned, PAIRS, hooks="hook_attn_out", metric="bleu")
    assert not calls
    other = build_model("gpt2" if base.cfg.normalization_type == "RMS" else "llama", seed=1)
    with pytest.raises(IncompatibleModelsError):
        ul.patch(base, other, PAIRS, hooks="hook_attn_out")
    with pytest.raises(MetricError, match=r"shape \[batch\]"):
        ul.patch(base, unlearned, PAIRS, hooks="hook_attn_out", metric=lambda z, p: z.mean())
    with pytest.raises(HookError):
        ul.patch_residual(base, unlearned, PAIRS, hook="attn_out")


def test_krs_undefined_when_models_agree(arch):
    model = build_model(arch, seed=3)
    with pytest.raises(ValueError, match="KRS is undefined"):
        ul.patch_attention(model, model, PAIRS, progress=False)


def test_sweep_result_round_trip_and_table(tmp_path, model_pair):
    base, unlearned = model_pair
    res = ul.patch_residual(base, unlearned, PAIRS, positions="each", progress=False)
    path = res.save(tmp_path / "each.safetensors")
    back = ul.SweepResult.load(path)
    assert back == res
    assert torch.equal(back.scores.nan_to_num(), res.scores.nan_to_num())
    frame = res.to_dataframe()
    assert list(frame.columns) == ["layer", "pos", "score"]
    assert len(frame) == res.scores.numel()
    row = frame[(frame.layer == 2) & (frame.pos == 3)].score.item()
    assert row == pytest.approx(float(res.scores[2, 3]), nan_ok=True)
    (where, best) = res.peak()
    assert best == pytest.approx(float(res.scores.nan_to_num(-1e9).max()))
    assert set(where) == {"layer", "pos"}


def test_sweep_result_plots(model_pair):
    import matplotlib

    matplotlib.use("Agg")
    base, unlearned = model_pair
    line = ul.patch_attention(base, unlearned, PAIRS, progress=False).plot()
    assert len(line.get_lines()) == 3  # the sweep, baseline, reference
    ul.patch_mlp_coefficients(base, unlearned, PAIRS, progress=False).plot(ax=line)
    assert len(line.get_lines()) == 4  # a second sweep on the same axes adds only its line
    heat = ul.patch_residual(base, unlearned, PAIRS, positions="each", progress=False).plot()
    assert heat.get_xlabel() == "pos" and heat.get_ylabel() == "layer"
