"""Step time of ``unlearn(method="npo")`` against a minimal hand-written PyTorch loop.

Both train a copy of the same 6-layer, d_model 256 model on the same forget set, in the same
batch order, with the same loss (NPO on summed answer log-probs, reference log-probs computed
once up front), AdamW and gradient clipping. The hand-written loop runs the full model and
takes log_softmax over every position; ``unlearn`` reads logits at the answer positions only.
Prints both times per step and their ratio (target: at most 1.10).

Run: ``.venv/bin/python benchmarks/bench_unlearn.py [--steps 30] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from unlearnlens.prompts import PromptSet
from unlearnlens.trainers import unlearn
from unlearnlens.trainers.data import batch_indices


def build(seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=6,
        d_model=256,
        d_head=32,
        n_heads=8,
        d_mlp=1024,
        n_ctx=128,
        d_vocab=8000,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def forget_set(n: int, prompt_len: int, answer_len: int, d_vocab: int) -> PromptSet:
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, d_vocab, (n, prompt_len), generator=gen)
    answers = torch.randint(1, d_vocab, (n, answer_len), generator=gen)
    return PromptSet.from_tokens(prompts, answers)


def hand_loop(
    model: HookedTransformer, data: PromptSet, steps: int, batch_size: int, lr: float, beta: float
) -> HookedTransformer:
    work = copy.deepcopy(model)
    n, m = int(data.prompt_lengths[0]), int(data.answer_lengths[0])
    tokens = data.tokens

    def seq_logp(mdl, toks):
        logp = torch.log_softmax(mdl(toks).float(), dim=-1)[:, n - 1 : n + m - 1]
        return logp.gather(-1, toks[:, n:, None])[..., 0].sum(-1)

    with torch.no_grad():
        ref = torch.cat(
            [seq_logp(work, tokens[i : i + batch_size]) for i in range(0, len(data), batch_size)]
        )
    opt = torch.optim.AdamW(work.parameters(), lr=lr, weight_decay=0.01)
    work.train()
    for step in range(steps):
        idx = batch_indices(len(data), batch_size, step, seed=0)
        ratio = seq_logp(work, tokens[idx]) - ref[idx]
        loss = -(2 / beta) * F.logsigmoid(-beta * ratio).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(work.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return work


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build()
    data = forget_set(64, 16, 16, model.cfg.d_vocab)
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=1e-5, beta=0.1)

    def ours():
        unlearn(
            model,
            data,
            method="npo",
            steps=args.steps,
            batch_size=args.batch_size,
            lr=1e-5,
            beta=0.1,
            warmup_ratio=0.0,
            eval_every=0,
            eval_size=8,
            progress=False,
        )

    def theirs():
        hand_loop(model, data, **kw)

    ours(), theirs()  # warm-up
    t_ours, t_hand = [], []
    for _ in range(args.repeats):
        for fn, out in ((ours, t_ours), (theirs, t_hand)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    best_ours, best_hand = min(t_ours), min(t_hand)
    print(
        f"model: 6 layers, d_model 256, d_vocab 8000; {args.steps} steps of batch "
        f"{args.batch_size}, sequences of 32 tokens; {torch.get_num_threads()} threads"
    )
    print(f"unlearn(method='npo'): {1e3 * best_ours / args.steps:.1f} ms/step (whole call)")
    print(f"hand-written loop    : {1e3 * best_hand / args.steps:.1f} ms/step (whole loop)")
    print(f"ratio unlearn / hand : {best_ours / best_hand:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
