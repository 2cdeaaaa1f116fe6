"""Gradient ascent: raise the language-model loss on the forget set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unlearnlens.errors import ConfigError
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, UnlearningMethod
from unlearnlens.trainers.losses import forget_nll
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["GAConfig", "GradientAscent"]


@dataclass(frozen=True)
class GAConfig(MethodConfig):
    """Options of gradient ascent."""

    forget_weight: float = 1.0
    """Scale of the ascent term."""

    def __post_init__(self) -> None:
        if self.forget_weight <= 0:
            raise ConfigError(f"forget_weight must be positive, got {self.forget_weight}")


@register_method("ga")
class GradientAscent(UnlearningMethod):
    """Gradient ascent: ``L = -NLL(forget)``.

    Maximises the forget answers' language-model loss (Jang et al., 2023, "Knowledge
    Unlearning for Mitigating Privacy Risks in Language Models"; the TOFU baseline). Unbounded
    below, so it collapses the model if run long: keep runs short.
    """

    config_class = GAConfig
    default_lr = 5e-4
    default_steps = 50

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """``-w_f · NLL(forget)``."""
        forget = forget_nll(model, batch)
        return MethodLoss(-self.config.forget_weight * forget, {"forget_nll": forget})
