"""Gradient difference: ascend on the forget set, descend on the retain set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unlearnlens.errors import ConfigError
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, UnlearningMethod
from unlearnlens.trainers.losses import forget_nll, retain_nll
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["GradDiff", "GradDiffConfig"]


@dataclass(frozen=True)
class GradDiffConfig(MethodConfig):
    """Options of gradient difference."""

    forget_weight: float = 1.0
    """``w_f``: scale of the ascent term on the forget set."""
    retain_weight: float = 1.5
    """``w_r``: scale of the descent term on the retain set (1.5 in Hong et al., 2024)."""

    def __post_init__(self) -> None:
        if self.forget_weight <= 0:
            raise ConfigError(f"forget_weight must be positive, got {self.forget_weight}")
        if self.retain_weight < 0:
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight}")


@register_method("grad_diff")
class GradDiff(UnlearningMethod):
    """Gradient difference: ``L = -w_f · NLL(forget) + w_r · NLL(retain)``.

    Liu et al., 2022, "Continual Learning and Private Unlearning"; the TOFU baseline (Maini et
    al., 2024) and the method of the reference study (Hong et al., 2024, with ``w_r = 1.5``).
    """

    config_class = GradDiffConfig
    requires_retain = True
    default_lr = 5e-4
    default_steps = 30

    def needs_retain(self) -> bool:
        """A retain set is needed unless ``retain_weight`` is 0."""
        return self.config.retain_weight > 0

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """``-w_f · NLL(forget) + w_r · NLL(retain)``."""
        cfg = self.config
        forget = forget_nll(model, batch)
        total = -cfg.forget_weight * forget
        parts = {"forget_nll": forget}
        if cfg.retain_weight > 0 and batch.retain is not None:
            retain = retain_nll(model, batch)
            total = total + cfg.retain_weight * retain
            parts["retain_nll"] = retain
        return MethodLoss(total, parts)
