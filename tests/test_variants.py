"""Explicit variants in restore_sweep and patch, against separate restorations and hook runs."""

from __future__ import annotations

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed


@pytest.fixture
def pair(arch):
    base = build_model(arch, seed=1)
    return base, perturbed(base, 0.15, seed=2)


def _runs(pairs, model):
    """(tokens, target slice) of each prompt, unpadded."""
    out = []
    for prompt, answer in pairs:
        p = model.to_tokens(prompt)
        a = model.to_tokens(answer, prepend_bos=False)
        out.append((torch.cat([p, a], 1), slice(p.shape[1] - 1, p.shape[1] + a.shape[1] - 1)))
    return out


def _krs(zb, zu, zx) -> float:
    return float(1 - ((zb - zx) ** 2).mean() / ((zb - zu) ** 2).mean())


def test_restore_variants_match_separate_restorations(pair):
    base, unlearned = pair
    variants = {
        "last 2 attn + W_out": dict(layers=[-2, -1], components=["attn", "mlp.W_out"]),
        "W_out everywhere": dict(layers=None, components="mlp.W_out"),
        "layers 0 and 2, whole MLP": dict(layers=[0, 2], components="mlp"),
        "embedding": dict(layers=None, components="embed"),
        "default components, layer 1": dict(layers=1),
    }
    res = ul.restore_sweep(base, unlearned, PAIRS, variants=variants, components="mlp.W_in")
    assert res.dims == ("variant",) and res.axes["variant"] == list(variants)
    runs = _runs(PAIRS, base)
    with torch.no_grad():
        z_base = [base(t)[0, sl].float() for t, sl in runs]
        z_unl = [unlearned(t)[0, sl].float() for t, sl in runs]
    for i, spec in enumerate(variants.values()):
        comps = spec.get("components", "mlp.W_in")
        with ul.restored(base, unlearned, layers=spec["layers"], components=comps):
            with torch.no_grad():
                z_x = [unlearned(t)[0, sl].float() for t, sl in runs]
        expected = sum(_krs(b, u, x) for b, u, x in zip(z_base, z_unl, z_x)) / len(runs)
        assert float(res.scores[i]) == pytest.approx(expected, abs=1e-4), list(variants)[i]
    assert res.meta["variants"][0]["layers"] == [2, 3]


def test_a_list_of_variants_is_named_after_what_it_restores(pair):
    base, unlearned = pair
    res = ul.restore_sweep(
        base,
        unlearned,
        PAIRS,
        variants=[dict(layers=[-2, -1], components=["attn", "mlp.W_out"]), dict(layers=[3])],
        metric="answer_logprob",
    )
    assert res.axes["variant"] == ["attn+mlp.W_out @ layers -2,-1", "mlp.W_out @ layers 3"]
    # the same restoration as the sweep's single-layer window
    sweep = ul.restore_sweep(base, unlearned, PAIRS, layers=[3], metric="answer_logprob")
    assert float(res.scores[1]) == pytest.approx(float(sweep.scores[0]), abs=1e-5)


def _hand_patch(base, unlearned, pairs, layers, hooks, where):
    values = []
    for (toks, sl), (prompt, _) in zip(_runs(pairs, base), pairs):
        n = base.to_tokens(prompt).shape[1]
        with torch.no_grad():
            z_base, cache = base.run_with_cache(toks)
            z_unl = unlearned(toks)

            def hook(act, hook, n=n, cache=cache):
                act = act.clone()
                if where == "last":
                    act[:, n - 1] = cache[hook.name][:, n - 1]
                else:
                    act[:] = cache[hook.name]
                return act

            fwd = [(f"blocks.{layer}.{h}", hook) for layer in layers for h in hooks]
            z_x = unlearned.run_with_hooks(toks, fwd_hooks=fwd)
        values.append(_krs(*(z[0, sl].float() for z in (z_base, z_unl, z_x))))
    return sum(values) / len(values)


def test_patch_variants_match_manual_hook_runs(pair):
    base, unlearned = pair
    variants = {
        "late coefficients": dict(layers=[-2, -1], hooks="mlp.hook_post"),
        "coef + attn, layers 0,1,3": dict(layers=[0, 1, 3], hooks=["mlp.hook_post", "attn_out"]),
        "resid at the last prompt token": dict(layers=[2], hooks="resid_pre", positions="last"),
        "default hooks everywhere": dict(layers=None),
    }
    res = ul.patch(base, unlearned, PAIRS, hooks="hook_attn_out", variants=variants)
    assert res.axes["variant"] == list(variants)
    cases = [
        ([2, 3], ["mlp.hook_post"], "all"),
        ([0, 1, 3], ["mlp.hook_post", "hook_attn_out"], "all"),
        ([2], ["hook_resid_pre"], "last"),
        ([0, 1, 2, 3], ["hook_attn_out"], "all"),
    ]
    for i, (layers, hooks, where) in enumerate(cases):
        expected = _hand_patch(base, unlearned, PAIRS, layers, hooks, where)
        assert float(res.scores[i]) == pytest.approx(expected, abs=1e-4), list(variants)[i]


def test_bad_variants_are_refused_before_any_work(pair):
    base, unlearned = pair
    bad = [
        (dict(variants=[dict(layers=[1], component="mlp")]), "unknown keys"),
        (dict(variants=[dict(components="mlp")]), "needs 'layers'"),
        (dict(variants={"": dict(layers=1)}), "non-empty"),
        (dict(variants=[]), "empty"),
        (dict(variants=[dict(layers=1)], layers=[1]), "leave layers"),
        (dict(variants=[dict(layers=1)], mode="from_top"), "leave layers"),
    ]
    for kw, match in bad:
        with pytest.raises(ul.ConfigError, match=match):
            ul.restore_sweep(base, unlearned, PAIRS, **kw)
    with pytest.raises(ul.LayerError):
        ul.restore_sweep(base, unlearned, PAIRS, variants=[dict(layers=[9])])
    with pytest.raises(ul.ComponentError):
        ul.restore_sweep(base, unlearned, PAIRS, variants=[dict(layers=1, components="mlp.W_up")])
    with pytest.raises(ul.HookError, match="names no hooks"):
        ul.patch(base, unlearned, PAIRS, variants=[dict(layers=1)])
    with pytest.raises(ul.PromptError, match="positions='each'"):
        ul.patch(
            base, unlearned, PAIRS, variants=[dict(layers=1, hooks="attn_out", positions="each")]
        )
    with pytest.raises(ul.ConfigError, match="leave layers"):
        ul.patch(base, unlearned, PAIRS, hooks="attn_out", window=3, variants=[dict(layers=1)])


def test_the_models_are_compared_once_per_sweep(pair, monkeypatch):
    import unlearnlens.models as models

    base, unlearned = pair
    calls = []
    real = models.check_compatible

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(models, "check_compatible", counting)
    variants = [dict(layers=[i], components="mlp.W_out") for i in range(3)]
    ul.restore_sweep(base, unlearned, PAIRS, variants=variants, progress=False)
    assert len(calls) == 1
    ul.restore_sweep(base, unlearned, PAIRS, window=3, progress=False)
    assert len(calls) == 2
    with ul.restored(base, unlearned, layers=[0]):
        pass
    assert len(calls) == 3


def test_variants_get_the_same_checks_before_work_as_the_sweep(pair, monkeypatch):
    import copy

    from transformer_lens import HookedTransformer

    base, unlearned = pair
    twin = copy.deepcopy(base)
    b, u = copy.deepcopy(base), copy.deepcopy(unlearned)
    u.set_use_attn_result(True)

    def forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was refused")

    monkeypatch.setattr(HookedTransformer, "forward", forward)
    one = [dict(layers=1)]
    for metric in ("krs", "recovery"):
        with pytest.raises(ul.IncompatibleModelsError, match="undefined"):
            ul.restore_sweep(base, twin, PAIRS, variants=one, metric=metric, progress=False)
        with pytest.raises(ul.IncompatibleModelsError, match="undefined"):
            ul.patch(base, twin, PAIRS, hooks="attn_out", variants=one, metric=metric)
    with pytest.raises(ul.HookError, match="on the source model but never fires"):
        ul.patch(b, u, PAIRS, hooks="attn.hook_result", variants=one, progress=False)
    scans = []
    monkeypatch.setattr(ul.models, "check_distinct", lambda *a, **k: scans.append(1))
    with pytest.raises(ul.ConfigError, match="batch_size"):
        ul.restore_sweep(base, unlearned, PAIRS, variants=one, batch_size=0)
    with pytest.raises(ul.ConfigError, match="batch_size"):
        ul.patch(base, unlearned, PAIRS, hooks="attn_out", variants=one, batch_size=0)
    assert scans == []  # refused before the models are compared
