"""Parameter restoration: restored(), restore_() and restore_sweep().

Sweep scores are checked against a loop written here: deep-copy the unlearned model, load the
window's weights from the base through ``state_dict``/``load_state_dict``, run each prompt alone
through a full forward pass, read the logits at the answer-predicting positions and compute the
metric by its formula.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from jaxtyping import TypeCheckError
from transformer_lens import HookedTransformer

from conftest import PAIRS, build_model, make_word_tokenizer, perturbed, tiny_config
from unlearnlens.errors import ComponentError, ConfigError, IncompatibleModelsError, LayerError
from unlearnlens.restoration import restore_, restore_sweep, restored

N_LAYERS = 4


# ------------------------------------------------------------------------ independent reference


def _answer_logits(model: HookedTransformer, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, (logits at positions n-1 .. n+m-2 of one unpadded forward, answer tokens)."""
    out = []
    with torch.no_grad():
        for prompt, answer in pairs:
            p = model.to_tokens(prompt)[0]
            a = model.to_tokens(answer, prepend_bos=False)[0]
            logits = model(torch.cat([p, a])[None])[0].float()
            n, m = len(p), len(a)
            out.append((logits[n - 1 : n + m - 1], a))
    return out


def _krs(zs, zt, zx) -> float:
    per_prompt = [
        1 - ((s - x) ** 2).mean() / ((s - t) ** 2).mean()
        for (s, _), (t, _), (x, _) in zip(zs, zt, zx, strict=True)
    ]
    return float(torch.stack(per_prompt).mean())


def _logprob(zx) -> float:
    per_prompt = [torch.log_softmax(z, -1)[torch.arange(len(a)), a].mean() for z, a in zx]
    return float(torch.stack(per_prompt).mean())


def _loaded(
    unlearned: HookedTransformer, base: HookedTransformer, names: list[str]
) -> HookedTransformer:
    model = copy.deepcopy(unlearned)
    state = model.state_dict()
    base_state = base.state_dict()
    for name in names:
        state[name] = base_state[name]
    model.load_state_dict(state)
    return model


def _names(
    model: HookedTransformer, layers, prefixes: tuple[str, ...], top: tuple[str, ...] = ()
) -> list[str]:
    keys = list(dict(model.named_parameters()))
    block = [
        k for k in keys for layer in layers for p in prefixes if k.startswith(f"blocks.{layer}.{p}")
    ]
    return block + [k for k in keys if k.startswith(top)] if top else block


def _reference(base, unlearned, pairs, layer_sets, prefixes, top=()):
    zs, zt = _answer_logits(base, pairs), _answer_logits(unlearned, pairs)
    krs, logprob = [], []
    for layers in layer_sets:
        zx = _answer_logits(
            _loaded(unlearned, base, _names(unlearned, layers, prefixes, top)), pairs
        )
        krs.append(_krs(zs, zt, zx))
        logprob.append(_logprob(zx))
    return torch.tensor(krs), torch.tensor(logprob), _logprob(zt)


def _window(c, w, n):
    return [layer for layer in range(c - w // 2, c + w // 2 + 1) if 0 <= layer < n]


# Per architecture: (components argument, parameter-name prefixes the test loads itself).
COMPONENTS = {
    "gpt2": [("mlp.W_out", ("mlp.W_out",)), (["attn.W_Q", "ln"], ("attn.W_Q", "ln1.", "ln2."))],
    "llama": [
        ("mlp.W_out", ("mlp.W_out",)),
        (["attn.W_K", "mlp.W_gate"], ("attn._W_K", "mlp.W_gate")),
    ],
}


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("mode", ["window", "from_top", "from_bottom"])
def test_sweep_matches_state_dict_loop(model_pair, arch, mode, which):
    base, unlearned = model_pair
    components, prefixes = COMPONENTS[arch][which]
    window = 3 if mode == "window" else 1
    if mode == "window":
        sets = [_window(c, 3, N_LAYERS) for c in range(N_LAYERS)]
    elif mode == "from_top":
        sets = [list(range(c, N_LAYERS)) for c in range(N_LAYERS)]
    else:
        sets = [list(range(0, c + 1)) for c in range(N_LAYERS)]
    ref_krs, ref_logprob, ref_baseline = _reference(base, unlearned, PAIRS, sets, prefixes)

    res = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components=components,
        window=window,
        mode=mode,
        progress=False,
        batch_size=2 if which else None,
    )
    assert res.axes == {"layer": list(range(N_LAYERS))}
    assert res.meta["restored_layers"] == sets
    assert res.meta["mode"] == mode and res.meta["window"] == window
    assert float((res.scores - ref_krs).abs().max()) <= 1e-5
    assert abs(res.baseline) <= 1e-6 and abs(res.reference - 1) <= 1e-6

    res_lp = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components=components,
        window=window,
        mode=mode,
        metric="answer_logprob",
        progress=False,
    )
    assert float((res_lp.scores - ref_logprob).abs().max()) <= 1e-5
    assert abs(res_lp.baseline - ref_baseline) <= 1e-5
    # the restorations change something, so the comparison above has teeth
    assert float((ref_logprob - ref_baseline).abs().max()) > 1e-3


def test_sweep_layer_subset_and_centres(model_pair):
    base, unlearned = model_pair
    res = restore_sweep(base, unlearned, PAIRS, layers=[-1, 1], window=5, progress=False)
    assert res.axes == {"layer": [3, 1]}
    assert res.meta["restored_layers"] == [[1, 2, 3], [0, 1, 2, 3]]
    ref_krs, _, _ = _reference(base, unlearned, PAIRS, [[1, 2, 3], [0, 1, 2, 3]], ("mlp.W_out",))
    assert float((res.scores - ref_krs).abs().max()) <= 1e-5


def _everything(arch: str) -> list[str]:
    top = ["embed", "unembed", "ln_final"] + (["pos_embed"] if arch == "gpt2" else [])
    return ["block", *top]


def test_restoring_everything_gives_the_source(model_pair, arch):
    base, unlearned = model_pair
    res = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components=_everything(arch),
        mode="from_top",
        layers=[0],
        progress=False,
    )
    assert abs(float(res.scores[0]) - 1.0) <= 1e-5
    lp = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components=_everything(arch),
        mode="from_bottom",
        layers=[N_LAYERS - 1],
        metric="answer_logprob",
        progress=False,
    )
    assert abs(float(lp.scores[0]) - lp.reference) <= 1e-5

    tokens = base.to_tokens([p + a for p, a in PAIRS[:1]])
    with torch.no_grad():
        want = base(tokens)
        with restored(base, unlearned, layers=None, components=_everything(arch)):
            got = unlearned(tokens)
    assert torch.equal(got, want)


def test_from_top_at_zero_equals_all_layers(model_pair, arch):
    base, unlearned = model_pair
    top = restore_sweep(
        base, unlearned, PAIRS, components="mlp", mode="from_top", layers=[0], progress=False
    )
    bottom = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components="mlp",
        mode="from_bottom",
        layers=[N_LAYERS - 1],
        progress=False,
    )
    wide = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components="mlp",
        window=2 * N_LAYERS - 1,
        layers=[N_LAYERS - 1],
        progress=False,
    )
    ref_krs, _, _ = _reference(base, unlearned, PAIRS, [list(range(N_LAYERS))], ("mlp.",))
    for res in (top, bottom, wide):
        assert res.meta["restored_layers"] == [list(range(N_LAYERS))]
        assert abs(float(res.scores[0] - ref_krs[0])) <= 1e-5


def test_restoring_equal_weights_gives_the_baseline(arch):
    base = build_model(arch, seed=1)
    unlearned = copy.deepcopy(base)
    with torch.no_grad():  # the models differ in layers 2 and 3 and nowhere else
        gen = torch.Generator().manual_seed(5)
        for name, p in unlearned.named_parameters():
            if name.startswith(("blocks.2.", "blocks.3.")):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    krs = restore_sweep(base, unlearned, PAIRS, components="block", layers=[0, 1], progress=False)
    assert float(krs.scores.abs().max()) <= 1e-5
    lp = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components=["mlp.W_out", "unembed"],
        layers=[0, 1],
        metric="answer_logprob",
        progress=False,
    )
    assert float((lp.scores - lp.baseline).abs().max()) <= 1e-5
    assert abs(lp.baseline - lp.reference) > 1e-3
    only_unembed = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components="unembed",
        layers=[3],
        metric="answer_logprob",
        progress=False,
    )
    assert abs(float(only_unembed.scores[0]) - only_unembed.baseline) <= 1e-6


def test_top_level_parts_are_restored_in_every_run(model_pair, arch):
    base, unlearned = model_pair
    res = restore_sweep(
        base, unlearned, PAIRS, components=["unembed", "ln_final"], layers=[0, 2], progress=False
    )
    zs, zt = _answer_logits(base, PAIRS), _answer_logits(unlearned, PAIRS)
    names = [
        n for n in dict(unlearned.named_parameters()) if n.startswith(("unembed.", "ln_final."))
    ]
    zx = _answer_logits(_loaded(unlearned, base, names), PAIRS)
    assert float((res.scores - _krs(zs, zt, zx)).abs().max()) <= 1e-5
    emb = restore_sweep(
        base, unlearned, PAIRS, components=["embed", "mlp.W_in"], layers=[2], progress=False
    )
    names = ["embed.W_E", "blocks.2.mlp.W_in"]
    zx = _answer_logits(_loaded(unlearned, base, names), PAIRS)
    assert abs(float(emb.scores[0]) - _krs(zs, zt, zx)) <= 1e-5


# ---------------------------------------------------------------------- the context manager


def _snapshot(model: HookedTransformer) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()),
        "torch_hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
        ),
    }


def _assert_same(model: HookedTransformer, snap: dict) -> None:
    now = model.state_dict()
    assert now.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now[k].dtype == v.dtype and now[k].device == v.device
        assert torch.equal(now[k], v), k  # bit for bit (no NaNs in these models)
    assert {k: id(p) for k, p in model.named_parameters()} == snap["params"]
    assert {k: p.requires_grad for k, p in model.named_parameters()} == snap["grad"]
    assert [m.training for m in model.modules()] == snap["modes"]
    assert (
        sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()) == snap["hooks"]
    )
    assert (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        == snap["torch_hooks"]
    )


@pytest.fixture
def guarded_pair(model_pair):
    """A model pair whose target has unusual flags: train mode, some frozen parameters."""
    base, unlearned = model_pair
    unlearned.train()
    unlearned.blocks[1].mlp.W_out.requires_grad_(False)
    unlearned.embed.W_E.requires_grad_(False)
    return base, unlearned


def test_inside_the_block_only_the_selection_is_the_source(guarded_pair):
    base, unlearned = guarded_pair
    before = _snapshot(unlearned)
    src = base.state_dict()
    with restored(base, unlearned, layers=[1, 2], components=["mlp.W_out", "attn"]) as r:
        chosen = set(_names(unlearned, [1, 2], ("mlp.W_out", "attn.")))
        assert set(r.names) == chosen
        for k, v in unlearned.state_dict().items():
            expect = src[k] if k in chosen else before["state"][k]
            assert torch.equal(v, expect), k
        assert {k: id(p) for k, p in unlearned.named_parameters()} == before["params"]
        assert {k: p.requires_grad for k, p in unlearned.named_parameters()} == before["grad"]
    _assert_same(unlearned, before)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [None, _Boom, KeyboardInterrupt])
def test_exit_gives_the_weights_back_bit_for_bit(guarded_pair, exc):
    base, unlearned = guarded_pair
    before, base_before = _snapshot(unlearned), _snapshot(base)
    ctx = restored(base, unlearned, layers=None, components=["block", "unembed"])

    def body():
        with ctx as r:
            assert r is ctx and r.active
            saved = [weakref.ref(t) for _, t in r._saved]
            assert len(saved) == len(r.names) > 0
            if exc is not None:
                raise exc("inside")
        return saved

    if exc is None:
        saved = body()
    else:
        with pytest.raises(exc, match="inside"):
            body()
        saved = None
    _assert_same(unlearned, before)
    _assert_same(base, base_before)
    assert not ctx.active and ctx._saved is None
    if saved is not None:
        gc.collect()
        assert all(ref() is None for ref in saved)  # the originals' copies are released


def test_saved_copies_are_released_after_an_exception(model_pair):
    base, unlearned = model_pair
    refs = []
    with pytest.raises(_Boom):
        with restored(base, unlearned, components="mlp") as r:
            refs.extend(weakref.ref(t) for _, t in r._saved)
            raise _Boom
    gc.collect()
    assert refs and all(ref() is None for ref in refs)


def test_nested_restorations_unwind(model_pair):
    base, unlearned = model_pair
    other = perturbed(base, 0.3, seed=9)
    before = _snapshot(unlearned)
    outer_names = set(_names(unlearned, [0, 1], ("mlp.W_out",)))
    inner_names = set(_names(unlearned, [1, 2], ("mlp.",)))  # overlaps the outer one in layer 1
    with restored(base, unlearned, layers=[0, 1], components="mlp.W_out"):
        outer_state = {k: v.clone() for k, v in unlearned.state_dict().items()}
        with restored(other, unlearned, layers=[1, 2], components="mlp"):
            for k, v in unlearned.state_dict().items():
                if k in inner_names:
                    assert torch.equal(v, other.state_dict()[k]), k
                elif k in outer_names:
                    assert torch.equal(v, base.state_dict()[k]), k
                else:
                    assert torch.equal(v, before["state"][k]), k
        for k, v in unlearned.state_dict().items():
            assert torch.equal(v, outer_state[k]), k
        with pytest.raises(KeyboardInterrupt):  # nested and interrupted
            with restored(other, unlearned, layers=[0], components="block"):
                with restored(other, unlearned, layers=[0, 3], components="mlp.W_out"):
                    raise KeyboardInterrupt
        for k, v in unlearned.state_dict().items():
            assert torch.equal(v, outer_state[k]), k
    _assert_same(unlearned, before)


def test_parameters_and_optimizer_references_stay_valid(model_pair):
    base, unlearned = model_pair
    opt = torch.optim.SGD(unlearned.parameters(), lr=0.1)
    w = unlearned.blocks[2].mlp.W_out
    with restored(base, unlearned, layers=2, components="mlp.W_out"):
        assert unlearned.blocks[2].mlp.W_out is w
        assert any(p is w for p in opt.param_groups[0]["params"])
        assert torch.equal(w, base.blocks[2].mlp.W_out)
        # a training step inside the block changes the target's parameter, not the source's
        base_w = base.blocks[2].mlp.W_out.detach().clone()
        w.grad = torch.ones_like(w)
        opt.step()
        assert torch.equal(base.blocks[2].mlp.W_out, base_w)
        assert torch.equal(w, base_w - 0.1)


def test_a_restoration_is_not_entered_twice_at_once(model_pair):
    base, unlearned = model_pair
    before = _snapshot(unlearned)
    ctx = restored(base, unlearned, components="mlp.W_out")
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()
    _assert_same(unlearned, before)
    with ctx:  # reusable after exit
        assert torch.equal(unlearned.blocks[0].mlp.W_out, base.blocks[0].mlp.W_out)
    _assert_same(unlearned, before)


def test_a_failed_copy_changes_nothing(model_pair):
    base, unlearned = model_pair
    before = _snapshot(unlearned)
    broken = copy.deepcopy(base)
    shape = broken.blocks[3].mlp.W_out.shape  # the last weight to copy has no data
    broken.blocks[3].mlp.W_out = torch.nn.Parameter(torch.empty(shape, device="meta"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        with restored(broken, unlearned, components="mlp.W_out"):
            pass  # pragma: no cover
    _assert_same(unlearned, before)
    with pytest.raises((RuntimeError, NotImplementedError)):
        restore_(broken, unlearned, components="mlp.W_out")
    _assert_same(unlearned, before)


def test_restore_underscore_is_permanent(model_pair):
    base, unlearned = model_pair
    before = _snapshot(unlearned)
    out = restore_(base, unlearned, layers=[0, 3], components=["mlp.W_out", "ln_final"])
    assert out is unlearned
    chosen = set(_names(unlearned, [0, 3], ("mlp.W_out",), ("ln_final.",)))
    for k, v in unlearned.state_dict().items():
        assert torch.equal(v, base.state_dict()[k] if k in chosen else before["state"][k]), k
    assert {k: id(p) for k, p in unlearned.named_parameters()} == before["params"]


def test_source_dtype_is_converted(arch):
    base = build_model(arch, seed=1)  # float32
    unlearned = perturbed(build_model(arch, seed=1, dtype=torch.bfloat16), 0.1, seed=2)
    before = _snapshot(unlearned)
    with restored(base, unlearned, layers=[1], components="mlp.W_in"):
        w = unlearned.blocks[1].mlp.W_in
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, base.blocks[1].mlp.W_in.to(torch.bfloat16))
    _assert_same(unlearned, before)


# -------------------------------------------------------------------------------- bad input


def _other_d_mlp(arch: str) -> HookedTransformer:
    tok = make_word_tokenizer()
    cfg = tiny_config(arch, d_vocab=len(tok))
    cfg.d_mlp = 96
    return HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")


def test_bad_input_is_refused_before_anything_changes(model_pair, arch):
    base, unlearned = model_pair
    before, base_before = _snapshot(unlearned), _snapshot(base)
    with pytest.raises(ComponentError, match=r"unknown component 'mlp.W_up'.*mlp\.W_out.*embed"):
        restored(base, unlearned, components="mlp.W_up")
    with pytest.raises(ComponentError, match="unknown component"):
        restore_(base, unlearned, components=["mlp.W_out", "W_out"])
    with pytest.raises(LayerError, match="layer 4 is out of range"):
        restored(base, unlearned, layers=[1, 4], components="mlp.W_out")
    with pytest.raises(LayerError, match="out of range"):
        restore_(base, unlearned, layers=-5, components="mlp.W_out")
    with pytest.raises(IncompatibleModelsError, match=r"d_mlp: 96 vs (48|64)"):
        restored(_other_d_mlp(arch), unlearned, components="mlp.W_out")
    with pytest.raises(IncompatibleModelsError, match="d_mlp"):
        restore_(_other_d_mlp(arch), unlearned, components="attn.W_Q")
    reshaped = copy.deepcopy(base)
    reshaped.blocks[2].mlp.W_out = torch.nn.Parameter(torch.zeros(10, 32))
    with pytest.raises(IncompatibleModelsError, match=r"blocks.2.mlp.W_out.*\(10, 32\)"):
        restore_(reshaped, unlearned, layers=[1, 2], components="mlp.W_out")
    for kw in [
        dict(components="mlp.W_up"),
        dict(layers=[7]),
        dict(window=2),
        dict(mode="from_top", window=3),
        dict(mode="sideways"),
    ]:
        # a bad mode is a ConfigError, or the type checker's error when annotations are checked
        with pytest.raises((ComponentError, LayerError, ConfigError, TypeCheckError)):
            restore_sweep(base, unlearned, PAIRS, progress=False, **kw)
    with pytest.raises(IncompatibleModelsError, match="d_mlp"):
        restore_sweep(_other_d_mlp(arch), unlearned, PAIRS, progress=False)
    _assert_same(unlearned, before)
    _assert_same(base, base_before)


def test_gate_on_gpt2_is_named():
    base = build_model("gpt2", seed=1)
    unlearned = perturbed(base, 0.1, seed=2)
    before = _snapshot(unlearned)
    with pytest.raises(ComponentError, match=r"has no 'mlp.W_gate'"):
        restored(base, unlearned, components="mlp.W_gate")
    with pytest.raises(ComponentError, match=r"has no 'mlp.W_gate'"):
        restore_sweep(
            base, unlearned, PAIRS, components=["mlp.W_out", "mlp.W_gate"], progress=False
        )
    _assert_same(unlearned, before)


# ------------------------------------------------------------------------- sweeps leave no trace


def test_sweep_gives_the_models_back_even_when_interrupted(guarded_pair):
    base, unlearned = guarded_pair
    before, base_before = _snapshot(unlearned), _snapshot(base)
    restore_sweep(base, unlearned, PAIRS, components="block", window=3, progress=False)
    _assert_same(unlearned, before)
    _assert_same(base, base_before)

    calls = []

    def interrupt(act, hook):  # the caller's own hook: the second run is a restored one
        calls.append(hook.name)
        if len(calls) >= 2:
            raise KeyboardInterrupt
        return act

    unlearned.blocks[3].hook_resid_post.add_hook(interrupt)
    before = _snapshot(unlearned)
    with pytest.raises(KeyboardInterrupt):
        restore_sweep(base, unlearned, PAIRS, components="block", window=1, progress=False)
    assert len(calls) == 2
    _assert_same(unlearned, before)  # weights back, the caller's hook still there
    unlearned.blocks[3].hook_resid_post.remove_hooks()


# ------------------------------------------------------------------------------------ dtypes


def test_bfloat16_smoke(arch):
    base = build_model(arch, seed=1, dtype=torch.bfloat16)
    unlearned = perturbed(base, 0.15, seed=2)
    before = _snapshot(unlearned)
    res = restore_sweep(base, unlearned, PAIRS, window=3, progress=False)
    assert res.scores.dtype == torch.float32 and bool(torch.isfinite(res.scores).all())
    full = restore_sweep(
        base,
        unlearned,
        PAIRS,
        components=_everything(arch),
        mode="from_top",
        layers=[0],
        progress=False,
    )
    assert abs(float(full.scores[0]) - 1.0) <= 1e-3
    _assert_same(unlearned, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_source_on_another_device():
    base = build_model("llama", seed=1)  # stays on the CPU
    unlearned = perturbed(base, 0.15, seed=2).to("cuda")
    before = _snapshot(unlearned)
    with restored(base, unlearned, layers=[2], components="mlp"):
        assert unlearned.blocks[2].mlp.W_gate.device.type == "cuda"
        assert torch.equal(unlearned.blocks[2].mlp.W_gate.cpu(), base.blocks[2].mlp.W_gate)
    _assert_same(unlearned, before)
    res = restore_sweep(base.to("cuda"), unlearned, PAIRS, window=3, progress=False)
    assert bool(torch.isfinite(res.scores).all())
