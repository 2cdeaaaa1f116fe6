"""Representation misdirection (RMU): steer forget activations towards a random direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from unlearnlens.components import ParamSelection
from unlearnlens.errors import ConfigError, LayerError
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = ["RMU", "RMUConfig", "residual_at", "rmu_positions"]


@dataclass(frozen=True)
class RMUConfig(MethodConfig):
    """Options of RMU."""

    layer: int | None = None
    """Layer ``l`` whose ``blocks.{l}.hook_resid_post`` is steered; ``None``: ``n_layers // 2``.
    Negative values count from the end."""
    steering_coef: float | None = None
    """Steering coefficient ``c``; ``None``: ``adaptive_scale`` times the mean norm of the
    starting model's forget activations at the layer (adaptive RMU, Dang et al., 2025)."""
    adaptive_scale: float = 5.0
    """Multiplier of the mean activation norm when ``steering_coef`` is ``None``."""
    alpha: float = 10.0
    """Weight ``α`` of the retain term."""
    positions: Literal["target", "all"] = "target"
    """Which token positions both terms average over: ``"target"`` (the positions that predict
    answer tokens; for plain texts, every position but the last) or ``"all"`` real tokens."""
    trained_layers: int = 3
    """With ``params=None``, train ``mlp.W_out`` of this many layers ending at ``l``."""

    def __post_init__(self) -> None:
        if self.steering_coef is not None and self.steering_coef <= 0:
            raise ConfigError(f"steering_coef must be positive or None, got {self.steering_coef}")
        if self.adaptive_scale <= 0:
            raise ConfigError(f"adaptive_scale must be positive, got {self.adaptive_scale}")
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        if self.positions not in ("target", "all"):
            raise ConfigError(f"positions must be 'target' or 'all', got {self.positions!r}")
        if self.trained_layers < 1:
            raise ConfigError(f"trained_layers must be at least 1, got {self.trained_layers}")


def residual_at(
    model: HookedTransformer, prompts: PromptSet, layer: int
) -> Float[Tensor, "batch seq d_model"]:
    """``blocks.{layer}.hook_resid_post`` of every real position (later layers are not run)."""
    tokens = prompts.tokens.to(model.cfg.device)
    return model(
        tokens,
        attention_mask=prompts.attention_mask.to(model.cfg.device),
        stop_at_layer=layer + 1,
    )


def rmu_positions(prompts: PromptSet, kind: str) -> Bool[Tensor, "batch seq"]:
    """Mask of the positions RMU averages over (see :attr:`RMUConfig.positions`)."""
    if kind == "all":
        return prompts.attention_mask.bool()
    pos = torch.arange(prompts.seq_len)[None, :]
    start = prompts.prompt_lengths[:, None] - 1
    return (pos >= start) & (pos <= prompts.last_target_position[:, None])


def _masked_mse(diff: Tensor, mask: Tensor) -> Tensor:
    sq = diff.float().pow(2).mean(-1)
    mask = mask.to(sq.device)
    return (sq * mask).sum() / mask.sum()


@register_method("rmu")
class RMU(UnlearningMethod):
    """Representation misdirection for unlearning.

    ``L = mean ‖h_θ(x_f) - c·u‖² + α · mean ‖h_θ(x_r) - h_ref(x_r)‖²`` where ``h`` is the
    residual stream after block ``l`` (``blocks.{l}.hook_resid_post``), ``u`` a random unit
    vector (uniform entries, normalised, drawn from the run's seed), ``c`` the steering
    coefficient and ``h_ref`` the starting model's activations; the squared norms are averaged
    over ``d_model`` and the chosen positions, as ``F.mse_loss`` does (Li et al., 2024, "The
    WMDP Benchmark", arXiv 2403.03218). With ``params=None`` only ``mlp.W_out`` of layers
    ``l-2 .. l`` train. The starting model's retain activations at layer ``l`` are computed
    once before training and kept on the CPU (retain examples × seq × d_model floats).
    """

    config_class = RMUConfig
    requires_retain = True
    default_lr = 1e-2
    default_steps = 30

    def layer(self, model: HookedTransformer) -> int:
        """The steered layer, checked against the model."""
        n = model.cfg.n_layers
        layer = n // 2 if self.config.layer is None else self.config.layer
        if not -n <= layer < n:
            raise LayerError(f"RMU layer {layer} is out of range for a model with {n} layers")
        return layer % n

    def default_params(self, model: HookedTransformer) -> ParamSelection:
        """``mlp.W_out`` of layers ``l - trained_layers + 1 .. l``."""
        top = self.layer(model)
        first = max(0, top - self.config.trained_layers + 1)
        return ParamSelection(layers=tuple(range(first, top + 1)), components=("mlp.W_out",))

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Draws ``u``, sets ``c`` and caches the starting model's retain activations."""
        cfg = self.config
        if data.retain is None:
            raise ConfigError("rmu needs a retain set")
        self.l = self.layer(model)
        gen = torch.Generator().manual_seed(int(data.seed) + 7919)
        u = torch.rand(model.cfg.d_model, generator=gen)
        self.u = u / u.norm()
        if cfg.steering_coef is not None:
            self.c = float(cfg.steering_coef)
        else:
            total, count = 0.0, 0
            for _, chunk in data.forget.batches(data.batch_size):
                h = residual_at(model, chunk, self.l).float().cpu()
                mask = rmu_positions(chunk, cfg.positions)
                total += float(h.norm(dim=-1)[mask].sum())
                count += int(mask.sum())
            self.c = cfg.adaptive_scale * total / count
        ref = torch.zeros(len(data.retain), data.retain.seq_len, model.cfg.d_model)
        for sl, chunk in data.retain.batches(data.batch_size):
            ref[sl, : chunk.seq_len] = residual_at(model, chunk, self.l).float().cpu()
        self.ref_retain = ref

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The RMU loss: forget activations towards ``c·u``, retain activations held fixed."""
        cfg = self.config
        h_f = residual_at(model, batch.forget, self.l)
        target = (self.c * self.u).to(h_f.device, h_f.dtype)
        forget = _masked_mse(h_f - target, rmu_positions(batch.forget, cfg.positions))
        retain_set = batch.retain_set
        h_r = residual_at(model, retain_set, self.l)
        idx = (
            batch.retain_index if batch.retain_index is not None else torch.arange(len(retain_set))
        )
        ref = self.ref_retain[idx, : retain_set.seq_len].to(h_r.device)
        retain = _masked_mse(h_r.float() - ref, rmu_positions(retain_set, cfg.positions))
        return MethodLoss(forget + cfg.alpha * retain, {"forget_mse": forget, "retain_mse": retain})
