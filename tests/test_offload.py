"""A source model on another device than the target: block-by-block clean runs.

Every analysis is run twice: once with both models resident on one device (the engine's
ordinary path, checked against TransformerLens elsewhere), and once on the block-by-block path,
which :func:`unlearnlens._offload.forced` takes on one device (it copies each block's weights
as it would between devices). The numbers must agree to 1e-5 in float32. The path itself is
checked against TransformerLens's own forward pass and unembedding. With CUDA, the source stays
on the CPU and the target goes to the GPU, and the results are compared with both on the GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from conftest import PAIRS, build_model, perturbed, tiny_config
from unlearnlens import _offload
from unlearnlens.coefficients import mlp_coefficient_stats, mlp_coefficients
from unlearnlens.comparison import compare_coefficients
from unlearnlens.errors import ConfigError
from unlearnlens.patching import patch, patch_attention, patch_mlp_coefficients, patch_residual
from unlearnlens.prompts import PromptSet
from unlearnlens.restoration import restore_, restore_sweep, restored
from unlearnlens.study import ANALYSES, dissect

TOL = 1e-5
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def spy(monkeypatch):
    """Counts the block-by-block passes."""
    calls = []
    real = _offload.run_blocks

    def counted(*args, **kwargs):
        calls.append(kwargs["device"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_offload, "run_blocks", counted)
    return calls


def _snapshot(model: HookedTransformer) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "dicts": [(id(m._parameters), id(m._buffers)) for m in model.modules()],
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()),
    }


def _assert_same(model: HookedTransformer, snap: dict) -> None:
    now = model.state_dict()
    assert now.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now[k].device == v.device and now[k].dtype == v.dtype, k
        assert torch.equal(now[k], v), k
    assert {k: id(p) for k, p in model.named_parameters()} == snap["params"]
    assert [(id(m._parameters), id(m._buffers)) for m in model.modules()] == snap["dicts"]
    assert {k: p.requires_grad for k, p in model.named_parameters()} == snap["grad"]
    assert [m.training for m in model.modules()] == snap["modes"]
    assert (
        sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()) == snap["hooks"]
    )


def _close(a: object, b: object, what: str) -> None:
    """Equal up to TOL: tensors (NaN where the other is NaN), floats, and anything else."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, what
        assert torch.allclose(a.float().cpu(), b.float().cpu(), atol=TOL, rtol=0, equal_nan=True), (
            what
        )
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=TOL, nan_ok=True), what
    elif isinstance(a, (tuple, list)) and a and dataclasses.is_dataclass(a[0]):
        assert len(a) == len(b), what
        for x, y in zip(a, b):
            _close(x, y, what)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _close(getattr(a, f.name), getattr(b, f.name), f"{what}.{f.name}")
    else:
        assert a == b, what


def _close_sweeps(a, b) -> None:
    _close(a.scores, b.scores, "scores")
    _close(a.per_prompt, b.per_prompt, "per_prompt")
    _close(a.baseline, b.baseline, "baseline")
    _close(a.reference, b.reference, "reference")
    assert a.axes == b.axes and a.meta == b.meta


def _close_tables(a, b) -> None:
    """Two CoefficientTables: every float column to TOL (NaN where NaN), the rest equal."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not hasattr(x, "columns"):
            _close(x, y, f.name)
            continue
        assert x.shape == y.shape and list(x.columns) == list(y.columns), f.name
        for col in x.columns:
            if x[col].dtype.kind == "f":
                assert np.allclose(x[col], y[col], atol=TOL, rtol=0, equal_nan=True), col
            else:
                assert (x[col] == y[col]).all(), col


# ---------------------------------------------------------------- the path against TransformerLens


@pytest.mark.parametrize("padded", [False, True])
def test_blocks_on_their_own_give_the_forward_pass(arch, padded):
    model = build_model(arch, seed=1)
    ps = PromptSet.from_pairs(model, PAIRS if padded else PAIRS[:1])
    before = _snapshot(model)
    seen = []
    w_q = model.blocks[2].attn.W_Q

    def check(act, hook):  # inside block 2's pass its weights are the copies, not the originals
        seen.append(
            model.blocks[2].attn.W_Q is not w_q and torch.equal(model.blocks[2].attn.W_Q, w_q)
        )
        return act

    with torch.no_grad():
        for stop in (1, 3, 4):
            want = model(ps.tokens, attention_mask=ps.attention_mask, stop_at_layer=stop)
            with model.hooks(fwd_hooks=[("blocks.2.hook_resid_mid", check)]):
                got = _offload.run_blocks(
                    model, ps.tokens, ps.attention_mask, device=CPU, stop_at_layer=stop
                )
            assert torch.allclose(got, want, atol=TOL, rtol=0), stop
    assert seen == [True, True]
    _assert_same(model, before)


def test_the_unembedding_streams_a_slice_at_a_time():
    cfg = tiny_config("llama", d_vocab=3000)  # W_U holds more than a block: several slices
    model = HookedTransformer(cfg)
    block = sum(t.numel() for t in model.blocks[0].parameters())
    assert model.cfg.d_vocab * model.cfg.d_model > 2 * block
    x = torch.randn(3, 5, cfg.d_model)
    sizes = []

    def size(act, hook):
        sizes.append(act.shape[-1])
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[("unembed.hook_out", size)]):
        got = _offload.logits(model, x, CPU)
        want = model.unembed(x)
    assert sizes == [cfg.d_vocab, cfg.d_vocab]  # the hook sees the whole output, once
    assert torch.allclose(got, want, atol=TOL, rtol=0)


def test_the_streamed_unembedding_applies_the_final_norm_and_the_soft_cap():
    from unlearnlens.runner import unembed

    cfg = dataclasses.replace(tiny_config("llama", d_vocab=3000), output_logits_soft_cap=2.0)
    model = HookedTransformer(cfg)
    x = 4 * torch.randn(3, 5, cfg.d_model)
    before = _snapshot(model)
    with torch.no_grad():
        logits = model.unembed(model.ln_final(x))
        want = 2.0 * torch.tanh(logits / 2.0)
        assert float((logits - want).abs().max()) > 0.1  # the cap changes these logits
        got = unembed(model, x, CPU)
        resident = unembed(model, x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert torch.allclose(resident, want, atol=TOL, rtol=0)
    _assert_same(model, before)


def test_offload_device_follows_where_the_tensors_live():
    model = build_model("gpt2", seed=1)
    assert _offload.offload_device(model, CPU) is None
    meta = torch.device("meta")
    assert _offload.offload_device(model, meta) == meta
    # a pair split alike over several devices runs where it is
    assert _offload.offload_device(model, meta, {CPU, meta}) is None
    with _offload.forced():
        assert _offload.offload_device(model, CPU) == CPU
        assert _offload.pair_offload(model, model) == CPU
    assert not _offload.is_forced()
    assert _offload.pair_offload(model, model) is None


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_moved_puts_the_originals_back(exc):
    model = build_model("llama", seed=1)
    before = _snapshot(model)
    with pytest.raises(exc), _offload.moved(CPU, model.blocks[1], model.ln_final):
        assert model.blocks[1].mlp.W_in is not before["state"]["blocks.1.mlp.W_in"]
        assert not isinstance(model.blocks[1].mlp.W_in, torch.nn.Parameter)
        raise exc
    _assert_same(model, before)


# ------------------------------------------------------------ every analysis: forced == resident

SWEEPS = {
    "patch_mlp_w3": lambda b, u, **kw: patch_mlp_coefficients(b, u, PAIRS, window=3, **kw),
    "patch_attn_answer": lambda b, u, **kw: patch_attention(b, u, PAIRS, positions="answer", **kw),
    "patch_resid_each": lambda b, u, **kw: patch_residual(b, u, PAIRS, positions="each", **kw),
    "patch_two_hooks": lambda b, u, **kw: patch(
        b, u, PAIRS, hooks=["mlp.hook_post", "hook_attn_out"], window=3, **kw
    ),
    "restore_w_out": lambda b, u, **kw: restore_sweep(b, u, PAIRS, window=3, **kw),
    "restore_block_top": lambda b, u, **kw: restore_sweep(
        b, u, PAIRS, components="block", mode="from_top", **kw
    ),
    "restore_mlp_embed": lambda b, u, **kw: restore_sweep(
        b, u, PAIRS, components=["mlp", "embed", "unembed"], **kw
    ),
}


@pytest.mark.parametrize("batch_size", [None, 2])  # 2: several chunks, caches rebuilt per chunk
@pytest.mark.parametrize("name", list(SWEEPS))
def test_sweeps_give_the_resident_numbers(model_pair, name, batch_size, spy):
    base, unlearned = model_pair
    run = SWEEPS[name]
    resident = run(base, unlearned, batch_size=batch_size, progress=False)
    assert spy == []
    before = _snapshot(base)
    with _offload.forced():
        offloaded = run(base, unlearned, batch_size=batch_size, progress=False)
    assert spy and all(d == CPU for d in spy)
    _close_sweeps(resident, offloaded)
    _assert_same(base, before)


def test_compare_coefficients_gives_the_resident_numbers(model_pair, spy):
    base, unlearned = model_pair
    resident = compare_coefficients(base, unlearned, PAIRS, top_k=5, batch_size=3)
    with _offload.forced():
        offloaded = compare_coefficients(base, unlearned, PAIRS, top_k=5, batch_size=3)
    assert len(spy) == 2  # the base's pass per chunk; the unlearned model runs as it is
    _close(resident, offloaded, "comparison")


def test_coefficient_read_outs_give_the_resident_numbers(model_pair, spy):
    base, _ = model_pair
    for positions in ("answer", "all"):
        want = mlp_coefficients(base, PAIRS, positions=positions, layers=[0, 2])
        stats = mlp_coefficient_stats(base, PAIRS, positions=positions, batch_size=2)
        assert spy == []
        with _offload.forced():
            got = mlp_coefficients(base, PAIRS, positions=positions, layers=[0, 2], device="cpu")
            got_stats = mlp_coefficient_stats(base, PAIRS, positions=positions, batch_size=2)
        assert len(spy) == 3
        spy.clear()
        _close(want, got, positions)
        _close(stats, got_stats, positions)


def test_a_bad_device_is_refused(model_pair):
    base, _ = model_pair
    with pytest.raises(ConfigError, match="device"):
        mlp_coefficients(base, PAIRS, device="nowhere")
    with pytest.raises(ConfigError, match="device"):
        mlp_coefficient_stats(base, PAIRS, device="cuda:x")


def test_dissect_gives_the_resident_numbers(spy):
    base = build_model("llama", seed=1)
    unlearned = perturbed(base, 0.15, seed=2)
    analyses = [a for a in ANALYSES if a not in ("behaviour", "logit_lens")]
    resident = dissect(base, unlearned, PAIRS, window=3, analyses=analyses, progress=False)
    with _offload.forced():
        offloaded = dissect(base, unlearned, PAIRS, window=3, analyses=analyses, progress=False)
    assert len(spy) >= len(analyses)
    for name, sweep in resident.sweeps["unlearned"].items():
        _close_sweeps(sweep, offloaded.sweeps["unlearned"][name])
    _close_tables(resident.coefficients["unlearned"], offloaded.coefficients["unlearned"])


def test_bfloat16_models_give_the_resident_numbers(arch):
    base = build_model(arch, seed=1, dtype=torch.bfloat16)
    unlearned = perturbed(base, 0.15, seed=2)
    resident = patch_mlp_coefficients(base, unlearned, PAIRS, window=3, progress=False)
    with _offload.forced():
        offloaded = patch_mlp_coefficients(base, unlearned, PAIRS, window=3, progress=False)
    # Both paths compute every block in bf16 with the same kernels on one device.
    assert torch.allclose(resident.scores, offloaded.scores, atol=1e-3, rtol=0)


# ------------------------------------------------------------------- the source comes back


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_the_source_comes_back_after_an_interrupt_in_a_block(model_pair, exc):
    base, unlearned = model_pair
    base.train()
    base.blocks[0].attn.W_Q.requires_grad_(False)
    before = _snapshot(base)

    def stop(act, hook):  # the caller's own hook, inside the source's block-by-block pass
        raise exc

    base.blocks[2].hook_resid_mid.add_hook(stop)
    before["hooks"] += 1
    try:
        for run in (
            lambda: patch_mlp_coefficients(base, unlearned, PAIRS, window=3, progress=False),
            lambda: compare_coefficients(base, unlearned, PAIRS),
            lambda: mlp_coefficients(base, PAIRS),
        ):
            with _offload.forced(), pytest.raises(exc):
                run()
            _assert_same(base, before)
    finally:
        base.blocks[2].hook_resid_mid.remove_hooks()


# ------------------------------------------------------------------------------ CUDA: two devices


@pytest.fixture
def cuda_pair():
    """(base on the CPU, unlearned on CUDA, a copy of base on CUDA)."""
    base = build_model("llama", seed=1)
    unlearned = perturbed(base, 0.15, seed=2)
    cuda = torch.device("cuda")
    copy = perturbed(base, 0.0, seed=0)
    return base, unlearned.to(cuda, print_details=False), copy.to(cuda, print_details=False)


@needs_cuda
@pytest.mark.parametrize("name", list(SWEEPS))
def test_cuda_sweeps_with_the_source_on_the_cpu(cuda_pair, name, spy):
    base, unlearned, base_cuda = cuda_pair
    run = SWEEPS[name]
    before = _snapshot(base)
    offloaded = run(base, unlearned, progress=False)
    assert spy and all(d.type == "cuda" for d in spy)
    _assert_same(base, before)
    spy.clear()
    resident = run(base_cuda, unlearned, progress=False)
    assert spy == []
    _close_sweeps(resident, offloaded)


@needs_cuda
def test_cuda_comparison_and_read_outs_with_the_source_on_the_cpu(cuda_pair):
    base, unlearned, base_cuda = cuda_pair
    _close(
        compare_coefficients(base_cuda, unlearned, PAIRS, top_k=5),
        compare_coefficients(base, unlearned, PAIRS, top_k=5),
        "comparison",
    )
    got = mlp_coefficients(base, PAIRS, device="cuda")
    assert got.device.type == "cuda"
    _close(mlp_coefficients(base_cuda, PAIRS), got, "coefficients")
    analyses = ["patch_mlp", "restore_w_out", "coefficients"]
    a = dissect(base_cuda, unlearned, PAIRS, window=3, analyses=analyses, progress=False)
    b = dissect(base, unlearned, PAIRS, window=3, analyses=analyses, progress=False)
    for name, sweep in a.sweeps["unlearned"].items():
        _close_sweeps(sweep, b.sweeps["unlearned"][name])
    _close_tables(a.coefficients["unlearned"], b.coefficients["unlearned"])


@needs_cuda
def test_cuda_restoration_copies_only_the_restored_tensors(cuda_pair):
    base, unlearned, _ = cuda_pair
    before = _snapshot(base)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    with restored(unlearned, base, layers=[1], components="mlp.W_out"):
        w = base.blocks[1].mlp.W_out
        # the target's saved copy of the one restored tensor, nothing of the rest of the source
        assert torch.cuda.memory_allocated() - start <= 2 * w.numel() * w.element_size() + 4096
        assert torch.equal(unlearned.blocks[1].mlp.W_out.cpu(), w)
    restore_(unlearned, base, layers=[3], components="attn.W_O")
    assert torch.equal(unlearned.blocks[3].attn.W_O.cpu(), base.blocks[3].attn.W_O)
    _assert_same(base, before)
