"""SimNPO: NPO without a reference model, length-normalised, with a margin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F

from unlearnlens.errors import ConfigError
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, UnlearningMethod
from unlearnlens.trainers.losses import retain_nll, sequence_logprob
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["SimNPO", "SimNPOConfig"]


@dataclass(frozen=True)
class SimNPOConfig(MethodConfig):
    """Options of SimNPO."""

    beta: float = 2.5
    """Inverse temperature β."""
    gamma: float = 0.0
    """Margin γ (open-unlearning's ``delta`` is ``γ/β``)."""
    retain_weight: float = 0.0
    """Scale of an optional ``NLL(retain)`` term (0: none, no retain set needed)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if self.gamma < 0:
            raise ConfigError(f"gamma must be >= 0, got {self.gamma}")
        if self.retain_weight < 0:
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight}")


@register_method("simnpo")
class SimNPO(UnlearningMethod):
    """Simple NPO: ``L = -(2/β) · E log σ(-(β/|y|) · log π_θ(y|x) - γ) + w_r · NLL(retain)``.

    The reference model of NPO is replaced by length normalisation and a margin (Fan et al.,
    2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning", arXiv 2410.07163, eq. 4). ``|y|`` is the answer's token count.
    """

    config_class = SimNPOConfig
    default_lr = 3e-4
    default_steps = 30

    def needs_retain(self) -> bool:
        """A retain set is needed only with a positive ``retain_weight``."""
        return self.config.retain_weight > 0

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The SimNPO loss (plus the retain term when its weight is positive)."""
        cfg = self.config
        logp = sequence_logprob(model, batch.forget)
        length = batch.forget.answer_lengths.to(logp.device).float()
        forget = -(2.0 / cfg.beta) * F.logsigmoid(-(cfg.beta / length) * logp - cfg.gamma).mean()
        parts = {"simnpo": forget, "forget_logprob": logp.mean()}
        total = forget
        if cfg.retain_weight > 0 and batch.retain is not None:
            retain = retain_nll(model, batch)
            total = total + cfg.retain_weight * retain
            parts["retain_nll"] = retain
        return MethodLoss(total, parts)
