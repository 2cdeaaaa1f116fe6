"""Negative preference optimization (NPO) and its retain-regularised variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unlearnlens.errors import ConfigError
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.loop import _copy_model
from unlearnlens.trainers.losses import (
    kl_to_reference,
    npo_loss,
    per_example,
    retain_nll,
    sequence_logprob,
)
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["NPO", "NPOKL", "NPORT", "NPOConfig", "NPORetainConfig", "frozen_copy"]


def frozen_copy(model: HookedTransformer) -> HookedTransformer:
    """A copy of ``model`` in eval mode, no parameter requiring gradients, same tokenizer."""
    ref = _copy_model(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@dataclass(frozen=True)
class NPOConfig(MethodConfig):
    """Options of NPO."""

    beta: float = 0.1
    """Inverse temperature β of the preference loss (0.1 in Zhang et al., 2024)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


@dataclass(frozen=True)
class NPORetainConfig(NPOConfig):
    """Options of NPO with a retain term."""

    retain_weight: float = 1.0
    """Scale of the retain term."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retain_weight <= 0:
            raise ConfigError(f"retain_weight must be positive, got {self.retain_weight}")


@register_method("npo")
class NPO(UnlearningMethod):
    """Negative preference optimization on the forget set.

    ``L = -(2/β) · E_forget log σ(-β · (log π_θ(y|x) - log π_ref(y|x)))``, with log π the
    sum of the answer tokens' log-probabilities and π_ref the starting model (Zhang et al.,
    2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective
    Unlearning", arXiv 2404.05868). The reference log-probabilities are computed once before
    training, so no reference model stays in memory.
    """

    config_class: type[MethodConfig] = NPOConfig
    default_lr = 3e-4
    default_steps = 30

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Computes ``log π_ref(y|x)`` of every forget example."""
        self.ref_forget = per_example(model, data.forget, data.batch_size)

    def forget_loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The NPO term alone."""
        logp = sequence_logprob(model, batch.forget)
        ref = self.ref_forget[batch.forget_index].to(logp.device)
        loss = npo_loss(logp - ref, self.config.beta)
        return MethodLoss(loss, {"npo": loss, "forget_logprob": logp.mean()})

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The NPO loss on the forget batch."""
        return self.forget_loss(model, batch)


@register_method("npo_kl")
class NPOKL(NPO):
    """NPO plus a KL term that keeps the retain predictions close to the starting model.

    ``L = NPO(forget) + w_r · mean_t KL(π_ref(·|x_<t) ‖ π_θ(·|x_<t))`` over the retain answer
    positions (Zhang et al., 2024). The KL term needs the reference's full distributions on
    every retain batch, so this method keeps a frozen copy of the starting model in memory
    (twice the model's memory); ``npo_rt`` does not.
    """

    config_class = NPORetainConfig
    requires_retain = True

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Reference log-probabilities on the forget set, and a frozen reference copy."""
        super().prepare(model, data)
        self.reference = frozen_copy(model)

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """``NPO(forget) + w_r · KL(ref ‖ θ)`` on the retain batch."""
        out = self.forget_loss(model, batch)
        kl = kl_to_reference(
            model,
            self.reference,
            batch.retain_set,
            batch.denominator(lambda b: b.retain_set.answer_lengths.sum()),
        )
        return MethodLoss(
            out.total + self.config.retain_weight * kl, {**out.parts, "retain_kl": kl}
        )


@register_method("npo_rt")
class NPORT(NPO):
    """NPO plus the language-model loss on the retain set.

    ``L = NPO(forget) + w_r · NLL(retain)`` (Zhang et al., 2024's NPO-RT; open-unlearning's
    default NPO).
    """

    config_class = NPORetainConfig
    requires_retain = True

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """``NPO(forget) + w_r · NLL(retain)``."""
        out = self.forget_loss(model, batch)
        retain = retain_nll(model, batch)
        return MethodLoss(
            out.total + self.config.retain_weight * retain, {**out.parts, "retain_nll": retain}
        )
