"""Loss building blocks shared by the methods (all in float32, differentiable).

Conventions (those of open-unlearning / TOFU):

* ``log π(y|x)`` is the **sum** of the answer tokens' log-probabilities
  (:func:`sequence_logprob`);
* ``NLL`` is the mean over all answer tokens of the batch of ``-log p(token)``, the
  language-model loss of Hugging Face's ``labels`` convention (:func:`nll`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from unlearnlens.metrics import answer_token_logprobs
from unlearnlens.runner import target_logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet
    from unlearnlens.trainers.base import Batch

__all__ = [
    "answer_logprobs",
    "dpo_loss",
    "forget_nll",
    "kl_to_reference",
    "nll",
    "npo_loss",
    "per_example",
    "retain_nll",
    "sequence_logprob",
]


def answer_logprobs(model: HookedTransformer, prompts: PromptSet) -> Float[Tensor, "batch answer"]:
    """``log p(answer token)`` at every answer slot (0 in padded slots)."""
    return answer_token_logprobs(target_logits(model, prompts), prompts)


def sequence_logprob(model: HookedTransformer, prompts: PromptSet) -> Float[Tensor, " batch"]:
    """``log π(y|x)``: the sum over each answer's tokens of their log-probabilities."""
    return answer_logprobs(model, prompts).sum(-1)


def nll(
    model: HookedTransformer, prompts: PromptSet, denominator: float | None = None
) -> Float[Tensor, ""]:
    """Mean over all answer tokens of the batch of ``-log p(token)``.

    ``denominator`` replaces the batch's answer-token count (see :meth:`Batch.denominator`,
    which makes micro-batches of an accumulated step add up to the whole step's mean).
    """
    lp = answer_logprobs(model, prompts)
    if denominator is None:
        return -lp.sum() / prompts.answer_lengths.sum().to(lp.device)
    return -lp.sum() / denominator


def forget_nll(model: HookedTransformer, batch: Batch) -> Float[Tensor, ""]:
    """:func:`nll` of the forget examples, normalised by the whole step's answer tokens."""
    return nll(model, batch.forget, batch.denominator(lambda b: b.forget.answer_lengths.sum()))


def retain_nll(model: HookedTransformer, batch: Batch) -> Float[Tensor, ""]:
    """:func:`nll` of the retain examples, normalised by the whole step's answer tokens."""
    return nll(
        model, batch.retain_set, batch.denominator(lambda b: b.retain_set.answer_lengths.sum())
    )


def npo_loss(log_ratio: Float[Tensor, " batch"], beta: float) -> Float[Tensor, ""]:
    """``-(2/β) · mean log σ(-β · log_ratio)`` with ``log_ratio = log π_θ - log π_ref``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def dpo_loss(
    win_ratio: Float[Tensor, " batch"], lose_ratio: Float[Tensor, " batch"], beta: float
) -> Float[Tensor, ""]:
    """``-(2/β) · mean log σ(β · (win_ratio - lose_ratio))`` on log π_θ - log π_ref ratios."""
    return -(2.0 / beta) * F.logsigmoid(beta * (win_ratio - lose_ratio)).mean()


def kl_to_reference(
    model: HookedTransformer,
    reference: HookedTransformer,
    prompts: PromptSet,
    denominator: float | None = None,
) -> Float[Tensor, ""]:
    """Mean over real target positions of ``KL(π_ref(·|x_<t) ‖ π_θ(·|x_<t))``.

    The reference runs without gradients; the model with them. ``denominator`` replaces the
    count of target positions, as in :func:`nll`.
    """
    with torch.no_grad():
        ref_logp = torch.log_softmax(target_logits(reference, prompts), dim=-1)
    logp = torch.log_softmax(target_logits(model, prompts), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    mask = prompts.answer_mask.to(kl.device)
    return (kl * mask).sum() / (mask.sum() if denominator is None else denominator)


def per_example(
    model: HookedTransformer, prompts: PromptSet, batch_size: int
) -> Float[Tensor, " batch"]:
    """:func:`sequence_logprob` of every example, in chunks, without gradients, on the CPU."""
    out = []
    with torch.no_grad():
        for _, chunk in prompts.batches(batch_size):
            out.append(sequence_logprob(model, chunk).cpu())
    return torch.cat(out)
