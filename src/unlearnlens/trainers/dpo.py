"""Direct preference optimization for unlearning: refusals, or retain text, over the truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from unlearnlens.errors import ConfigError
from unlearnlens.trainers._refusals import DEFAULT_REFUSALS, check_refusals, refusal_set
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.losses import dpo_loss, per_example, retain_nll, sequence_logprob
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["DPO", "DPOConfig", "DPORetain", "DPORetainConfig"]


@dataclass(frozen=True)
class DPOConfig(MethodConfig):
    """Options of DPO with refusal answers."""

    beta: float = 0.1
    """Inverse temperature β."""
    refusals: tuple[str, ...] = DEFAULT_REFUSALS
    """Preferred answers; forget example ``i`` gets refusal ``i % len(refusals)``."""
    retain_weight: float = 1.0
    """Scale of a ``NLL(retain)`` term (open-unlearning's DPO uses 1; 0 needs no retain set)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        check_refusals(self.refusals)
        if self.retain_weight < 0:
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight}")


@register_method("dpo")
class DPO(UnlearningMethod):
    """DPO with a refusal preferred over the true answer.

    ``L = -(2/β) · E log σ(β · [(log π_θ - log π_ref)(y_w|x) - (log π_θ - log π_ref)(y_l|x)])
    + w_r · NLL(retain)`` with ``y_w`` a refusal ("I don't know"), ``y_l`` the forget answer
    and π_ref the starting model (Rafailov et al., 2023, "Direct Preference Optimization";
    used for unlearning in TOFU, Maini et al., 2024). The reference log-probabilities are
    computed once before training.
    """

    config_class = DPOConfig
    default_lr = 3e-4
    default_steps = 30

    def needs_retain(self) -> bool:
        """A retain set is needed only with a positive ``retain_weight``."""
        return self.config.retain_weight > 0

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Builds the refusal answers and the reference log-probabilities of both answers."""
        self.win = refusal_set(model, data.forget, self.config.refusals, data.refusal_eos)
        self.ref_win = per_example(model, self.win, data.batch_size)
        self.ref_lose = per_example(model, data.forget, data.batch_size)

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The DPO loss on the forget batch (plus the retain term)."""
        idx = batch.forget_index
        win = sequence_logprob(model, self.win[idx])
        lose = sequence_logprob(model, batch.forget)
        win_ratio = win - self.ref_win[idx].to(win.device)
        lose_ratio = lose - self.ref_lose[idx].to(lose.device)
        pref = dpo_loss(win_ratio, lose_ratio, self.config.beta)
        parts = {"dpo": pref, "forget_logprob": lose.mean(), "refusal_logprob": win.mean()}
        total = pref
        if self.config.retain_weight > 0:
            retain = retain_nll(model, batch)
            total = total + self.config.retain_weight * retain
            parts["retain_nll"] = retain
        return MethodLoss(total, parts)


@dataclass(frozen=True)
class DPORetainConfig(MethodConfig):
    """Options of DPO with retain text preferred over forget text."""

    beta: float = 0.1
    """Inverse temperature β (0.1 in Hong et al., 2024)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


@register_method("dpo_retain")
class DPORetain(UnlearningMethod):
    """DPO with a retain example preferred over a forget example (the reference study's DPO).

    ``L = -(2/β) · E log σ(β · [(log π_θ - log π_ref)(x_r) - (log π_θ - log π_ref)(x_f)])``,
    pairing the i-th retain example of a step with its i-th forget example (Hong et al., 2024,
    on Wikipedia chunks of the concept vs another concept). When the two batches differ in
    size (at an epoch's end), the longer one is cut to the shorter.
    """

    config_class = DPORetainConfig
    requires_retain = True
    default_lr = 3e-4
    default_steps = 30

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Reference log-probabilities of every forget and retain example."""
        if data.retain is None:
            raise ConfigError("dpo_retain needs a retain set")
        self.ref_forget = per_example(model, data.forget, data.batch_size)
        self.ref_retain = per_example(model, data.retain, data.batch_size)

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The DPO loss with retain examples as the preferred answers."""
        retain = batch.retain_set
        n = min(len(batch.forget), len(retain))
        f_idx = batch.forget_index[:n]
        r_idx = batch.retain_index[:n] if batch.retain_index is not None else torch.arange(n)
        forget_set = batch.forget if n == len(batch.forget) else batch.forget[:n]
        retain_set = retain if n == len(retain) else retain[:n]
        lose = sequence_logprob(model, forget_set)
        win = sequence_logprob(model, retain_set)
        win_ratio = win - self.ref_retain[r_idx].to(win.device)
        lose_ratio = lose - self.ref_forget[f_idx].to(lose.device)
        pref = dpo_loss(win_ratio, lose_ratio, self.config.beta)
        return MethodLoss(
            pref, {"dpo": pref, "forget_logprob": lose.mean(), "retain_logprob": win.mean()}
        )
