"""Representation misdirection (RMU): steer forget activations towards a random direction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from unlearnlens._checks import check_int
from unlearnlens.components import ParamSelection
from unlearnlens.errors import ConfigError, LayerError
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.registry import register_method

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = ["RMU", "RMUConfig", "cache_bytes", "residual_at", "rmu_positions"]


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
    retain_cache_bytes: int = 2**30
    """Most bytes the cache of the starting model's retain activations may take on the host
    (float32, retain examples x seq x d_model). A retain set beyond it is not cached: each
    step recomputes its reference activations with the trained parameters' starting values
    put back for one no-grad forward pass to layer ``l`` (one extra partial forward per step,
    and a copy of the trained parameters' starting values instead of the cache)."""

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
        check_int(self.retain_cache_bytes, "retain_cache_bytes", minimum=0)


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


def _masked_mse(diff: Tensor, mask: Tensor, denominator: float) -> Tensor:
    sq = diff.float().pow(2).mean(-1)
    mask = mask.to(sq.device)
    return (sq * mask).sum() / denominator


def cache_bytes(retain: PromptSet, d_model: int) -> int:
    """Bytes of the float32 cache of ``retain``'s activations (examples x seq x d_model)."""
    return len(retain) * retain.seq_len * d_model * 4


@contextmanager
def _starting_values(model: HookedTransformer, start: dict[str, Tensor]) -> Iterator[None]:
    """Puts the trained parameters' starting values in place for a no-grad pass, then back."""
    params = dict(model.named_parameters())
    now = {n: params[n].data for n in start}
    try:
        for n, v in start.items():
            params[n].data = v
        yield
    finally:
        for n, v in now.items():
            params[n].data = v


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
    once before training and kept on the CPU (retain examples × seq × d_model floats) when
    they fit in ``retain_cache_bytes``; otherwise they are recomputed each step from the
    trained parameters' starting values (see :attr:`RMUConfig.retain_cache_bytes`).

    Both terms are means over tokens: the squared distance is averaged over ``d_model`` at
    each chosen position, then over all chosen positions of the batch (a long example counts
    more than a short one), as ``F.mse_loss`` over the stacked positions.
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
        self.ref_retain: Tensor | None = None
        self.start: dict[str, Tensor] | None = None
        if cache_bytes(data.retain, model.cfg.d_model) <= cfg.retain_cache_bytes:
            ref = torch.zeros(len(data.retain), data.retain.seq_len, model.cfg.d_model)
            for sl, chunk in data.retain.batches(data.batch_size):
                ref[sl, : chunk.seq_len] = residual_at(model, chunk, self.l).float().cpu()
            self.ref_retain = ref
        else:
            params = dict(model.named_parameters())
            names = data.trained or tuple(params)
            self.start = {n: params[n].detach().clone() for n in names}

    def reference(self, model: HookedTransformer, batch: Batch) -> Float[Tensor, "b seq d"]:
        """The starting model's float32 retain activations for the batch (cached or recomputed)."""
        retain_set = batch.retain_set
        if self.ref_retain is not None:
            idx = batch.retain_index
            if idx is None:
                idx = torch.arange(len(retain_set))
            return self.ref_retain[idx, : retain_set.seq_len]
        if self.start is None:
            raise RuntimeError("RMU.reference needs prepare() to have run")
        with torch.no_grad(), _starting_values(model, self.start):
            return residual_at(model, retain_set, self.l).float()

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The RMU loss: forget activations towards ``c·u``, retain activations held fixed."""
        cfg = self.config
        ref = self.reference(model, batch)  # before the grad passes, which save the weights
        h_f = residual_at(model, batch.forget, self.l)
        target = (self.c * self.u).to(h_f.device, h_f.dtype)
        n_f = batch.denominator(lambda b: rmu_positions(b.forget, cfg.positions).sum())
        forget = _masked_mse(h_f - target, rmu_positions(batch.forget, cfg.positions), n_f)
        retain_set = batch.retain_set
        h_r = residual_at(model, retain_set, self.l)
        n_r = batch.denominator(lambda b: rmu_positions(b.retain_set, cfg.positions).sum())
        mask = rmu_positions(retain_set, cfg.positions)
        retain = _masked_mse(h_r.float() - ref.to(h_r.device), mask, n_r)
        return MethodLoss(forget + cfg.alpha * retain, {"forget_mse": forget, "retain_mse": retain})
