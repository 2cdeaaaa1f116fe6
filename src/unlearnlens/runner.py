"""The engine: run a model with something changed and read logits only where metrics look.

Patching, restoration and the probes all do the same thing: run the target model with some
activations or weights changed, read the logits at the target positions, and score them. This
module is the one place that does it, and where the speed comes from:

* a change at layer ``l`` leaves layers ``< l`` untouched, so the run starts from the target's
  cached residual stream at layer ``l`` (``HookedTransformer.forward(start_at_layer=l)``);
* a change at position ``p`` leaves positions ``< p`` untouched, so only positions ``p ..``
  are run, attending to the target's cached keys and values for the earlier positions;
* positions after the last target position cannot affect any target, so they are not run;
* ``ln_final`` and the unembedding are applied at the target positions only;
* variants that start at the same layer and position share one forward pass, stacked along the
  batch dimension in chunks of ``batch_size`` rows;
* the clean runs cache only the hooks the sweep needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import apply_softcap

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = [
    "gather_targets",
    "logits_from_residual",
    "target_logits",
    "unembed",
]


def gather_targets(
    x: Float[Tensor, "batch seq ..."], prompts: PromptSet, *, offset: int = 0
) -> Float[Tensor, "batch answer ..."]:
    """Picks the target positions out of a per-position tensor.

    Args:
        x: Any ``[batch, seq, ...]`` tensor whose position axis starts at absolute position
            ``offset`` (when only a suffix of the sequence was run).
        prompts: The prompts whose ``target_positions`` to read.
        offset: Absolute position of ``x[:, 0]``.
    """
    idx = (prompts.target_positions.to(x.device) - offset).clamp(min=0)
    idx = idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def unembed(
    model: HookedTransformer, resid: Float[Tensor, "batch answer d_model"]
) -> Float[Tensor, "batch answer d_vocab"]:
    """Final norm, unembedding and logit soft-cap of a final residual stream, in float32.

    The final norm works per position, so applying it to a few gathered positions gives the
    same numbers as applying it everywhere.
    """
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = model.unembed(resid)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap).float()


def logits_from_residual(
    model: HookedTransformer,
    final_resid: Float[Tensor, "batch seq d_model"],
    prompts: PromptSet,
    *,
    offset: int = 0,
) -> Float[Tensor, "batch answer d_vocab"]:
    """Logits at the target positions from the residual stream after the last block."""
    return unembed(model, gather_targets(final_resid, prompts, offset=offset))


def target_logits(model: HookedTransformer, prompts: PromptSet) -> Float[Tensor, "batch answer d_vocab"]:
    """The model's own logits at the target positions, computed without a full unembedding.

    Runs under the caller's grad mode (so trainers can differentiate through it); wrap it in
    ``torch.no_grad()`` for analysis.
    """
    tokens = prompts.tokens.to(model.cfg.device)
    n = int(prompts.last_target_position.max()) + 1
    resid = model(
        tokens[:, :n],
        attention_mask=prompts.attention_mask[:, :n].to(model.cfg.device),
        stop_at_layer=model.cfg.n_layers,
    )
    return logits_from_residual(model, resid, prompts)
