"""Patching speed against the TransformerLens way, measured in the same run.

1. ``patch_residual(..., positions="each")`` vs TransformerLens's ``get_act_patch_resid_pre``
   (same numbers; target >= 5x).
2. The study's sweep (``mlp.hook_post``, window 5, all positions, every layer, KRS) vs the
   straightforward loop: one ``run_with_hooks`` full forward per window (target >= 2x).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformer_lens import patching as tl_patching

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, gpt2_small_pair, prompts

import unlearnlens as ul
from unlearnlens.metrics import answer_logprob, krs


def main() -> dict[str, float]:
    torch.manual_seed(0)
    base, unlearned = gpt2_small_pair()
    ps = prompts(equal=True)
    results: dict[str, float] = {}

    # --- 1. residual stream, every layer x position
    def tl_each():
        with torch.no_grad():
            _, cache = base.run_with_cache(ps.tokens)

            def metric(logits):
                z = logits.gather(
                    1, ps.target_positions[..., None].expand(-1, -1, logits.shape[-1])
                )
                return answer_logprob(z, ps).mean()

            return tl_patching.get_act_patch_resid_pre(unlearned, ps.tokens, cache, metric)

    def ours_each():
        return ul.patch_residual(
            base, unlearned, ps, positions="each", metric="answer_logprob", progress=False
        )

    t_tl, ref = best_of(tl_each, 1)
    t_ours, res = best_of(ours_each, 1)
    diff = float((ref - res.scores).abs().max())
    results["resid_each_ratio"] = t_tl.wall / t_ours.wall
    results["resid_each_cpu_ratio"] = t_tl.cpu / t_ours.cpu
    print(
        f"patch_residual(positions='each'): TransformerLens {t_tl.wall:.2f}s, unlearnlens "
        f"{t_ours.wall:.2f}s -> {t_tl.ratio(t_ours)} faster (max |diff| {diff:.1e})"
    )

    # --- 2. the study's sweep: MLP coefficients, window 5, all positions, KRS
    ps2 = prompts(equal=False, seed=1)
    n = base.cfg.n_layers

    def straightforward():
        with torch.no_grad():
            tokens, mask = ps2.tokens, ps2.attention_mask
            _, cache = base.run_with_cache(
                tokens,
                attention_mask=mask,
                names_filter=lambda name: name.endswith("mlp.hook_post"),
            )
            tp = ps2.target_positions[..., None]
            zs = base(tokens, attention_mask=mask).gather(1, tp.expand(-1, -1, base.cfg.d_vocab))
            zt = unlearned(tokens, attention_mask=mask).gather(
                1, tp.expand(-1, -1, base.cfg.d_vocab)
            )
            out = []
            for centre in range(n):
                hooks = [
                    (f"blocks.{layer}.mlp.hook_post", lambda act, hook: cache[hook.name])
                    for layer in range(max(0, centre - 2), min(n, centre + 3))
                ]
                logits = unlearned.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
                z = logits.gather(1, tp.expand(-1, -1, base.cfg.d_vocab))
                out.append(krs(z, ps2, source_logits=zs, target_logits=zt).nanmean())
            return torch.stack(out)

    def ours_sweep():
        return ul.patch_mlp_coefficients(base, unlearned, ps2, window=5, progress=False)

    t_plain, ref2 = best_of(straightforward, 1)
    t_ours2, res2 = best_of(ours_sweep, 1)
    diff2 = float((ref2 - res2.scores).abs().max())
    results["study_sweep_ratio"] = t_plain.wall / t_ours2.wall
    results["study_sweep_cpu_ratio"] = t_plain.cpu / t_ours2.cpu
    print(
        f"study sweep (mlp.hook_post, window 5, KRS): run_with_hooks loop {t_plain.wall:.2f}s, "
        f"unlearnlens {t_ours2.wall:.2f}s -> {t_plain.ratio(t_ours2)} faster "
        f"(max |diff| {diff2:.1e})"
    )
    return results


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"torch threads: {torch.get_num_threads()}")
    main()
