"""How well a model knows a toy world: greedy answer accuracy on each split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unlearnlens._guard import preserved
from unlearnlens.metrics import accuracy
from unlearnlens.prompts import PromptSet
from unlearnlens.runner import target_logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.toy.world import World

__all__ = ["accuracy_by_split", "split_pairs"]


def split_pairs(world: World) -> dict[str, list[tuple[str, str]]]:
    """Every evaluation split of a world by name.

    ``forget``, ``retain``, ``unrelated`` (training templates), ``paraphrase_forget``,
    ``paraphrase_retain``, ``paraphrase_unrelated`` (held-out templates) and ``capability``
    (held-out copying probes).
    """
    out = {"forget": world.forget, "retain": world.retain, "unrelated": world.unrelated}
    for name, pairs in world.paraphrases.items():
        out[f"paraphrase_{name}"] = pairs
    out["capability"] = world.capability_pairs
    return out


def accuracy_by_split(
    model: HookedTransformer, world: World, *, batch_size: int = 256
) -> dict[str, float]:
    """Greedy accuracy on each split: the share of prompts whose argmax is the answer token.

    The model is read at the last prompt position (and, for longer answers, every target
    position); it comes back unchanged (modes, grad flags, hooks).

    Args:
        model: A model with the world's tokenizer (as :func:`train_base` returns).
        world: The world whose splits to score (see :func:`split_pairs`).
        batch_size: Prompts per forward pass.

    Returns:
        ``{split name: accuracy in [0, 1]}``.
    """
    splits = split_pairs(world)
    prompt_sets = {name: PromptSet.from_pairs(model, pairs) for name, pairs in splits.items()}
    out: dict[str, float] = {}
    with preserved(model):
        for name, ps in prompt_sets.items():
            hits = []
            for _, chunk in ps.batches(batch_size):
                chunk = chunk.to(model.cfg.device)
                hits.append(accuracy(target_logits(model, chunk), chunk))
            out[name] = float(torch.cat(hits).mean())
    return out
