"""Per-position patching: padding is left out, and positions can be aligned on the answer."""

from __future__ import annotations

import math

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS


def _krs(zb: torch.Tensor, zu: torch.Tensor, zx: torch.Tensor) -> float:
    return float(1 - ((zb - zx) ** 2).mean() / ((zb - zu) ** 2).mean())


def _hand_resid_loop(base, unlearned, pairs):
    """KRS of patching base ``resid_pre`` at one (layer, absolute position), one prompt at a
    time with no padding; ``{(layer, pos): {prompt index: krs}}`` only where the prompt has
    that position."""
    out: dict[tuple[int, int], dict[int, float]] = {}
    for i, (prompt, answer) in enumerate(pairs):
        p = base.to_tokens(prompt)
        a = base.to_tokens(answer, prepend_bos=False)
        toks = torch.cat([p, a], 1)
        n, m = p.shape[1], a.shape[1]
        sl = slice(n - 1, n + m - 1)
        with torch.no_grad():
            z_base, cache = base.run_with_cache(toks)
            z_unl = unlearned(toks)
            for layer in range(base.cfg.n_layers):
                name = f"blocks.{layer}.hook_resid_pre"
                for pos in range(toks.shape[1]):

                    def hook(act, hook, pos=pos, name=name, cache=cache):
                        act = act.clone()
                        act[:, pos] = cache[name][:, pos]
                        return act

                    z_x = unlearned.run_with_hooks(toks, fwd_hooks=[(name, hook)])
                    zb, zu, zx = (z[0, sl].float() for z in (z_base, z_unl, z_x))
                    out.setdefault((layer, pos), {})[i] = _krs(zb, zu, zx)
    return out


def test_each_position_leaves_padding_out(model_pair):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, PAIRS)
    lengths = ps.seq_lengths.tolist()
    assert len(set(lengths)) > 1  # prompts of different lengths: the short ones are padded
    res = ul.patch_residual(base, unlearned, ps, positions="each", progress=False)
    hand = _hand_resid_loop(base, unlearned, PAIRS)
    assert res.axes["pos"] == list(range(ps.seq_len))
    for layer in range(base.cfg.n_layers):
        for pos in range(ps.seq_len):
            have = hand[(layer, pos)]
            for i in range(len(PAIRS)):
                got = float(res.per_prompt[layer, pos, i])
                if i in have:
                    assert got == pytest.approx(have[i], abs=1e-4)
                else:
                    assert pos >= lengths[i]
                    assert math.isnan(got)
            expected = sum(have.values()) / len(have)
            assert float(res.scores[layer, pos]) == pytest.approx(expected, abs=1e-4)


def test_answer_aligned_positions_match_hand_alignment(model_pair):
    base, unlearned = model_pair
    ps = ul.PromptSet.from_pairs(base, PAIRS)
    n, m = ps.prompt_lengths.tolist(), ps.answer_lengths.tolist()
    res = ul.patch_residual(base, unlearned, ps, positions="each", align="answer", progress=False)
    labels = [f"prompt-{k}" for k in range(max(n), 0, -1)]
    labels += [f"answer+{j}" for j in range(max(m))]
    assert res.axes["pos"] == labels
    hand = _hand_resid_loop(base, unlearned, PAIRS)

    def absolute(label: str, i: int) -> int | None:
        kind, k = label.replace("+", "-").split("-")
        pos = n[i] - int(k) if kind == "prompt" else n[i] + int(k)
        inside = 0 <= pos < n[i] if kind == "prompt" else int(k) < m[i]
        return pos if inside else None

    for layer in range(base.cfg.n_layers):
        for s, label in enumerate(labels):
            values = []
            for i in range(len(PAIRS)):
                pos = absolute(label, i)
                got = float(res.per_prompt[layer, s, i])
                if pos is None:
                    assert math.isnan(got)
                else:
                    assert got == pytest.approx(hand[(layer, pos)][i], abs=1e-4)
                    values.append(hand[(layer, pos)][i])
            assert float(res.scores[layer, s]) == pytest.approx(sum(values) / len(values), abs=1e-4)
    # "prompt-1" is each prompt's last token: patching it there is what positions="last" does
    last = ul.patch_residual(base, unlearned, ps, positions="last", progress=False)
    assert torch.allclose(res.scores[:, labels.index("prompt-1")], last.scores, atol=1e-5)


def test_align_is_checked(model_pair):
    base, unlearned = model_pair
    with pytest.raises(ul.PromptError, match="align"):
        ul.patch_residual(base, unlearned, PAIRS, positions="each", align="end", progress=False)
    with pytest.raises(ul.PromptError, match="align"):
        ul.patch_residual(base, unlearned, PAIRS, positions="all", align="answer", progress=False)


def test_dissect_plots_answer_aligned_positions(model_pair):
    base, unlearned = model_pair
    study = ul.dissect(base, unlearned, PAIRS, analyses=["patch_resid"], progress=False)
    r = study.sweeps["unlearned"]["patch_resid"]
    assert r.axes["pos"][0].startswith("prompt-") and "answer+0" in r.axes["pos"]
    assert r.meta["align"] == "answer"


def test_each_variants_first_position_is_found_once_per_chunk(model_pair, monkeypatch):
    from unlearnlens import runner

    base, unlearned = model_pair
    calls = []
    real = runner._first_position

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(runner, "_first_position", counting)
    res = ul.patch_residual(base, unlearned, PAIRS, positions="each", batch_size=2, progress=False)
    n_chunks = math.ceil(len(PAIRS) / 2)
    assert len(calls) == res.scores.numel() * n_chunks
