"""Fake quantization: round-trip error, grid layout, and recovery of a sub-step unlearning."""

from __future__ import annotations

import pytest
import torch

from conftest import PAIRS, build_model
from unlearnlens.audit.quantization import fake_quantize, quantization_step, quantize_matrix
from unlearnlens.errors import ComponentError, ConfigError
from unlearnlens.prompts import PromptSet
from unlearnlens.runner import target_logits


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 16, 24])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_within_half_a_step(bits, group_size, symmetric):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 12, generator=gen) * torch.rand(1, 12, generator=gen)
    q = quantize_matrix(w, bits, group_size=group_size, symmetric=symmetric)
    g = 40 if group_size is None else group_size
    for col in range(12):
        for start in range(0, 40, g):
            block = w[start : start + g, col]
            if symmetric:
                step = block.abs().max() / (2 ** (bits - 1) - 1)
            else:
                step = (block.max() - block.min()) / (2**bits - 1)
            err = (q[start : start + g, col] - block).abs().max()
            assert err <= step / 2 * (1 + 1e-5)
            assert len(torch.unique(q[start : start + g, col])) <= 2**bits
            steps = quantization_step(w, bits, group_size=group_size, symmetric=symmetric)
            assert torch.allclose(steps[start : start + g, col], step.expand(len(block)))


def test_channels_follow_transformer_lens_layouts():
    model = build_model("llama", seed=1)
    q = fake_quantize(model, bits=2)  # 4 levels: easy to count per output channel
    for name, p in q.named_parameters():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("W_Q", "_W_K", "_W_V"):  # [head, d_model (in), d_head]
            chans = p.permute(0, 2, 1).reshape(-1, p.shape[1])
        elif kind == "W_O":  # [head, d_head (in), d_model]
            chans = p.reshape(-1, p.shape[-1]).T
        elif kind in ("W_in", "W_gate", "W_out"):  # [in, out]
            chans = p.T
        else:
            assert torch.equal(p, dict(model.named_parameters())[name])  # norms, embeddings
            continue
        assert max(len(torch.unique(c)) for c in chans) <= 4, name
        assert not torch.equal(p, dict(model.named_parameters())[name])


def test_fake_quantize_leaves_the_model_alone_and_checks_arguments():
    model = build_model("gpt2", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake_quantize(model, bits=4, group_size=8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="bits"):
        fake_quantize(model, bits=1)
    with pytest.raises(ConfigError, match="group_size"):
        fake_quantize(model, bits=4, group_size=0)
    with pytest.raises(ComponentError):
        fake_quantize(model, bits=4, components="ln")


def _mlp_on_grid(model, bits):
    """Puts every MLP matrix on a min-max grid whose ends each column reaches."""
    levels = 2**bits - 1
    gen = torch.Generator().manual_seed(7)
    steps = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] not in ("W_in", "W_out"):
                continue
            n_in, n_out = p.shape
            level = torch.randint(0, levels + 1, (n_in, n_out), generator=gen)
            level[0], level[1] = 0, levels  # each output channel spans the whole grid
            step = 0.02 + 0.03 * torch.rand(1, n_out, generator=gen)
            zero = 7
            p.copy_((level - zero) * step)
            steps[name] = (step, level)
    return steps


def test_sub_step_unlearning_is_undone_by_4bit_quantization():
    base = build_model("gpt2", seed=1)
    steps = _mlp_on_grid(base, bits=4)
    unlearned = build_model("gpt2", seed=1)
    unlearned.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in unlearned.named_parameters():
            if name not in steps:
                continue
            step, level = steps[name]
            shift = (torch.rand(p.shape, generator=gen) - 0.5) * 0.8 * step  # |shift| < step/2
            inner = (level > 0) & (level < 15)  # the grid's ends stay, so the grid stays
            p.add_(torch.where(inner, shift, torch.zeros_like(shift)))
            assert (p - dict(base.named_parameters())[name]).abs().max() < step.max() / 2
    ps = PromptSet.from_pairs(base, PAIRS)
    with torch.no_grad():
        z_base, z_unl = target_logits(base, ps), target_logits(unlearned, ps)
        assert (z_base - z_unl).abs().max() > 1e-2  # the sub-step change moves the outputs
        q_unl = fake_quantize(unlearned, bits=4, components="mlp")
        q_base = fake_quantize(base, bits=4, components="mlp")
        for (n, a), (_, b) in zip(q_unl.named_parameters(), q_base.named_parameters()):
            assert torch.equal(a, b), n  # bit for bit the quantized base
        for n, p in q_base.named_parameters():  # and the base was on the grid already
            assert torch.allclose(p, dict(base.named_parameters())[n], atol=1e-6)
        assert torch.allclose(target_logits(q_unl, ps), z_base, atol=1e-4)
