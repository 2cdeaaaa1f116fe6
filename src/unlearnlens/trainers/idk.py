"""IDK: teach the model to answer forget questions with a refusal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unlearnlens.errors import ConfigError
from unlearnlens.trainers._refusals import DEFAULT_REFUSALS, check_refusals, refusal_set
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.losses import nll, retain_nll
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["IDK", "IDKConfig"]


@dataclass(frozen=True)
class IDKConfig(MethodConfig):
    """Options of IDK fine-tuning."""

    refusals: tuple[str, ...] = DEFAULT_REFUSALS
    """Target answers; forget example ``i`` gets refusal ``i % len(refusals)``."""
    retain_weight: float = 1.0
    """Scale of the ``NLL(retain)`` term (TOFU's IDK uses 1; 0 needs no retain set)."""

    def __post_init__(self) -> None:
        check_refusals(self.refusals)
        if self.retain_weight < 0:
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight}")


@register_method("idk")
class IDK(UnlearningMethod):
    """Supervised refusals: ``L = NLL(refusal | forget prompt) + w_r · NLL(retain)``.

    The forget answers are replaced by "I don't know"-style refusals and learned with the
    ordinary language-model loss (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning
    for LLMs", the IDK baseline).
    """

    config_class = IDKConfig
    default_lr = 3e-4
    default_steps = 30

    def needs_retain(self) -> bool:
        """A retain set is needed only with a positive ``retain_weight``."""
        return self.config.retain_weight > 0

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Attaches a refusal to every forget prompt."""
        self.targets = refusal_set(model, data.forget, self.config.refusals, data.refusal_eos)

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """``NLL(refusals) + w_r · NLL(retain)``."""
        refuse = nll(
            model,
            self.targets[batch.forget_index],
            batch.denominator(lambda b: self.targets[b.forget_index].answer_lengths.sum()),
        )
        parts = {"refusal_nll": refuse}
        total = refuse
        if self.config.retain_weight > 0:
            retain = retain_nll(model, batch)
            total = total + self.config.retain_weight * retain
            parts["retain_nll"] = retain
        return MethodLoss(total, parts)
