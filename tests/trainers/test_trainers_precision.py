"""Low-precision training: float32 masters keep the updates a bf16/fp16 model cannot hold."""

from __future__ import annotations

import pytest
import torch

from conftest import PAIRS, build_model
from unlearnlens.trainers import unlearn

FAST = dict(progress=False, eval_every=0, warmup_ratio=0.0)
BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: relative rounding up to 2**-8


def realistic(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny model with weights of a trained LM's scale (std 0.02, norm scales near 1)."""
    model = build_model(arch, seed=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (name.endswith(".w") or name.endswith("_w")):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(dtype)


def float_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def flat(d: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([d[n].flatten() for n in names])


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_bf16_run_tracks_the_float32_run(method):
    """A bf16 run with masters follows a float32 run of the same steps from the same weights.

    Bounds: AdamW moves each weight by about ``lr`` per step whatever the gradient's size, so
    where the bf16 gradient (relative error ~2**-8) has the float32 gradient's sign, the
    updates agree; they can differ only where the gradient is near zero. We require the
    median weight difference to stay under 5% of the median movement and the 99th
    percentile under 20% of the movement's 99th percentile. Losses are computed by a bf16
    forward on bf16-rounded weights, so each may be off by bf16's relative precision:
    ``|loss_bf16 - loss_f32| <= 2**-8 |loss_f32|``. Without masters (the control) the bf16
    weights barely move at lr 1e-4 (a 0.02 weight is stored to ~6e-5), and the median
    difference is ~20% of the movement.
    """
    b16 = realistic("llama", torch.bfloat16)
    f32 = realistic("llama", torch.bfloat16).float()  # the same rounded starting weights
    kw = dict(method=method, steps=10, lr=1e-4, batch_size=4, **FAST)
    ref = unlearn(f32, PAIRS, **kw)
    start, end = float_weights(f32), float_weights(ref.model)
    names = list(start)
    move = (flat(end, names) - flat(start, names)).abs()

    run = unlearn(b16, PAIRS, **kw)
    assert set(run.master_weights) == set(names)
    diff = (flat(run.master_weights, names) - flat(end, names)).abs()
    assert diff.median() <= 0.05 * move.median()
    assert diff.quantile(0.99) <= 0.2 * move.quantile(0.99)
    for got, want in zip(run.history[1:], ref.history[1:], strict=True):
        assert abs(got["loss"] - want["loss"]) <= BF16_EPS * abs(want["loss"])
    # the model holds the masters rounded to bf16, exactly
    for n, p in run.model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, run.master_weights[n].to(torch.bfloat16)), n

    control = unlearn(b16, PAIRS, master_weights=False, **kw)
    assert control.master_weights == {}
    lost = (flat(float_weights(control.model), names) - flat(end, names)).abs()
    assert lost.median() > 0.1 * move.median()


def test_three_small_bf16_steps_change_almost_every_weight():
    """3 gradient-ascent steps at lr 1e-5: the float32 masters change >= 99% of the weights.

    The bf16 weights themselves can change only where the update exceeds half their rounding
    step; without masters each step is rounded on its own, so even fewer change.
    """
    model = realistic("llama", torch.bfloat16)
    start = float_weights(model)
    kw = dict(method="ga", steps=3, lr=1e-5, batch_size=4, **FAST)
    run = unlearn(model, PAIRS, **kw)
    names = list(start)
    changed = (flat(run.master_weights, names) != flat(start, names)).float().mean()
    assert changed >= 0.99
    rounded = (flat(float_weights(run.model), names) != flat(start, names)).float().mean()
    plain = unlearn(model, PAIRS, master_weights=False, **kw)
    plain_changed = (flat(float_weights(plain.model), names) != flat(start, names)).float().mean()
    assert plain_changed < rounded < changed
    # the float32 result: a float32 model carrying the masters
    full = run.full_precision_model()
    assert all(p.dtype == torch.float32 for p in full.parameters())
    for n, p in full.named_parameters():
        assert torch.equal(p, run.master_weights[n]), n


def test_float32_run_keeps_no_separate_masters():
    model = build_model("gpt2", seed=3)
    run = unlearn(model, PAIRS, method="ga", steps=2, lr=1e-3, **FAST)
    assert run.master_weights == {}
    full = run.full_precision_model()
    for p, q in zip(full.parameters(), run.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fp16_run_with_loss_scaling_tracks_float32():
    """float16 adds dynamic loss scaling; with masters the run follows float32 as bf16 does.

    float16 has 11 significant bits, so the bounds of the bf16 test hold with room.
    """
    f16 = realistic("gpt2", torch.float16)
    f32 = realistic("gpt2", torch.float16).float()
    kw = dict(method="ga", steps=6, lr=1e-4, batch_size=4, **FAST)
    ref = unlearn(f32, PAIRS, **kw)
    run = unlearn(f16, PAIRS, **kw)
    start, end = float_weights(f32), float_weights(ref.model)
    names = list(start)
    move = (flat(end, names) - flat(start, names)).abs()
    diff = (flat(run.master_weights, names) - flat(end, names)).abs()
    assert diff.median() <= 0.05 * move.median()
    for got, want in zip(run.history[1:], ref.history[1:], strict=True):
        assert abs(got["loss"] - want["loss"]) <= BF16_EPS * abs(want["loss"])
