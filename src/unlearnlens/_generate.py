"""Greedy continuation with TransformerLens's key/value cache, one prompt at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["greedy_continuations"]


@torch.no_grad()
def greedy_continuations(
    model: HookedTransformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> list[list[int]]:
    """Returns each prompt's greedy continuation (EOS not included), up to ``max_new_tokens``.

    Prompts run one at a time so that no padding can shift positions; a key/value cache keeps
    each step to one token's work.
    """
    device = model.cfg.device
    out: list[list[int]] = []
    for ids in prompts:
        budget = min(max_new_tokens, model.cfg.n_ctx - len(ids))
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
        step_in = torch.tensor([ids], dtype=torch.long, device=device)
        mask = torch.ones_like(step_in)
        answer: list[int] = []
        for _ in range(budget):
            logits = model(step_in, attention_mask=mask, past_kv_cache=cache)
            nxt = int(logits[0, -1].argmax())
            if eos_token_id is not None and nxt == eos_token_id:
                break
            answer.append(nxt)
            step_in = torch.tensor([[nxt]], dtype=torch.long, device=device)
            mask = torch.ones_like(step_in)
        out.append(answer)
    return out
