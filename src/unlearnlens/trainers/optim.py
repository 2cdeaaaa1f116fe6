"""AdamW over float32 master copies of the trained parameters, written back after each step.

A bfloat16 weight near 0.02 is stored to about 6e-5; an update of 1e-5 (a typical learning
rate times Adam's unit-sized step) rounds away, so plain AdamW on a bf16 model changes only
the smallest weights. Mixed-precision training (Micikevicius et al., 2018; DeepSpeed's bf16
mode, which the reference study used) keeps a float32 master copy of every trained weight:
gradients are accumulated and clipped in float32, the optimizer state is float32, the update
lands on the master, and the model receives the master rounded to its own dtype. Small updates
accumulate in the master until they move the rounded weight; the float32 values themselves are
the training result (:attr:`~unlearnlens.UnlearnRun.master_weights`).

The same scheme runs for float32 models (the master is then a plain copy). It is what lets a
run stop at the last finite state: the model is written only from a master update known to be
finite in the model's dtype, so an overflowing step never reaches the model.

float16 models also get dynamic loss scaling: the loss is multiplied by a scale (2**16 at the
start) before the backward pass so that small gradients do not flush to zero; a step whose
scaled gradients overflow is recomputed at half the scale, and the scale doubles again after
``GROWTH_INTERVAL`` clean steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["GROWTH_INTERVAL", "MasterOptimizer", "is_low_precision", "no_decay_names"]

GROWTH_INTERVAL = 200
"""Clean float16 steps after which the loss scale doubles."""
_INITIAL_SCALE = 2.0**16
_MAX_SCALE = 2.0**24


def is_low_precision(dtype: torch.dtype) -> bool:
    """Whether a parameter dtype is too coarse to take small updates (bf16, fp16)."""
    return dtype in (torch.bfloat16, torch.float16)


def no_decay_names(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The names among ``names`` that get no weight decay: biases and normalisation weights.

    The rule of Hugging Face's ``Trainer``: parameters of normalisation modules (any module
    whose class name contains ``Norm``: TransformerLens's ``LayerNorm``, ``RMSNorm`` and their
    ``Pre`` forms, ``torch.nn.LayerNorm``) and biases (TransformerLens's ``b_*``, ``_b_*``
    and ``b``, and any name containing ``bias``) are not decayed; every weight matrix and
    embedding is.
    """
    wanted = set(names)
    out: set[str] = set()
    for mod_name, mod in model.named_modules():
        if "Norm" in type(mod).__name__:
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if full in wanted:
                    out.add(full)
    for name in wanted:
        leaf = name.rsplit(".", 1)[-1].lstrip("_")  # GQA's shared keys/values: _W_K, _b_K
        if leaf == "b" or leaf.startswith("b_") or "bias" in leaf:
            out.add(name)
    return out


def _names(names: list[str], skip: set[str], in_skip: bool) -> list[str]:
    return [n for n in names if (n in skip) == in_skip]


class MasterOptimizer:
    """AdamW on float32 masters of ``params``; the model's parameters receive rounded values.

    Use per step: :meth:`zero_grad`, then for each micro-batch ``backward`` of
    ``loss * loss_scale`` followed by :meth:`accumulate`, then :meth:`clip`, :meth:`step`,
    :meth:`update_is_finite` and :meth:`write_back`.

    Args:
        model: The model that owns ``params`` (used to find biases and norm weights).
        params: The trained parameters by full name.
        lr: Initial learning rate (set per step by :meth:`step`).
        betas: AdamW's moment coefficients.
        weight_decay: Decoupled weight decay of the decayed group.
        masters: ``False`` trains bfloat16/float16 parameters in their own dtype (their
            "master" is the parameter itself: no copy, no loss scaling, and small updates
            round away). float32 parameters always get a master copy.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        masters: bool = True,
    ) -> None:
        self.names = list(params)
        self.params = list(params.values())
        self.masters = [
            p
            if not masters and is_low_precision(p.dtype)
            else nn.Parameter(p.detach().to(torch.float32, copy=True), requires_grad=False)
            for p in self.params
        ]
        skip = no_decay_names(model, self.names)
        decay = [m for n, m in zip(self.names, self.masters, strict=True) if n not in skip]
        keep = [m for n, m in zip(self.names, self.masters, strict=True) if n in skip]
        groups = [
            {
                "params": decay,
                "weight_decay": weight_decay,
                "names": _names(self.names, skip, False),
            },
            {"params": keep, "weight_decay": 0.0, "names": _names(self.names, skip, True)},
        ]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
        self.scaled = any(
            p.dtype == torch.float16 and m is not p
            for p, m in zip(self.params, self.masters, strict=True)
        )
        self.loss_scale = _INITIAL_SCALE if self.scaled else 1.0
        self.good_steps = 0
        self._pending_write = False

    @property
    def in_place(self) -> bool:
        """Whether some parameters are their own master (``masters=False`` in bf16/fp16).

        Their update lands in the model before it can be checked, so after a non-finite
        update the model is not at its last finite state.
        """
        return any(m is p for p, m in zip(self.params, self.masters, strict=True))

    # ------------------------------------------------------------------------- gradients

    def zero_grad(self) -> None:
        """Drops the gradients of the model's trained parameters and of the masters."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.grad = None
            m.grad = None

    def accumulate(self) -> None:
        """Moves the model's fresh gradients into the masters' float32 gradients (unscaled)."""
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None or m is p:
                continue
            g = p.grad.detach().to(torch.float32)
            p.grad = None
            if self.loss_scale != 1.0:
                g = g / self.loss_scale
            if m.grad is None:
                m.grad = g
            else:
                m.grad.add_(g)

    def clip(self, max_norm: float | None) -> float:
        """The global float32 gradient norm (before clipping); clips to ``max_norm`` if given."""
        grads = [m.grad for m in self.masters if m.grad is not None]
        if not grads:
            return 0.0
        if max_norm is None:
            return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        return float(torch.nn.utils.clip_grad_norm_(self.masters, max_norm))

    def reduce_scale(self) -> bool:
        """Halves the float16 loss scale after an overflow; ``False`` when it cannot fall."""
        if self.loss_scale <= 1.0:
            return False
        self.loss_scale /= 2.0
        self.good_steps = 0
        return True

    # ------------------------------------------------------------------------- updates

    def step(self, lr: float) -> None:
        """One AdamW step on the masters at learning rate ``lr`` (the model is not touched)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.scaled:
            self.good_steps += 1
            if self.good_steps >= GROWTH_INTERVAL and self.loss_scale < _MAX_SCALE:
                self.loss_scale *= 2.0
                self.good_steps = 0

    def update_is_finite(self) -> bool:
        """Whether every master is finite once rounded to its parameter's dtype.

        One reduction pair per tensor and a single device sync: the largest and smallest
        entries must lie within the dtype's range (NaN fails the comparison).
        """
        checks = []
        for p, m in zip(self.params, self.masters, strict=True):
            top = torch.finfo(p.dtype).max
            ok = (m.amax() <= top) & (m.amin() >= -top)
            checks.append(ok.to(self.masters[0].device))  # models split over devices
        return bool(torch.stack(checks).all()) if checks else True

    def write_back(self) -> None:
        """Copies the masters into the model's parameters (rounded to their dtypes).

        If interrupted part-way, :meth:`finish` completes the copy.
        """
        self._pending_write = True
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if m is not p:
                    p.copy_(m)
        self._pending_write = False

    def finish(self) -> None:
        """Completes a write-back an exception cut short, so no parameter holds half a step."""
        if self._pending_write:
            self.write_back()
        self.zero_grad()

    def master_state(self) -> dict[str, torch.Tensor]:
        """The masters by parameter name, detached, on their devices.

        They are float32 unless ``masters=False`` left a low-precision parameter as its own.
        """
        return {n: m.detach() for n, m in zip(self.names, self.masters, strict=True)}

    def load_masters(self, values: dict[str, torch.Tensor]) -> None:
        """Sets the masters from float32 values of the same names and shapes."""
        with torch.no_grad():
            for n, m in zip(self.names, self.masters, strict=True):
                m.copy_(values[n].to(m.device, m.dtype))
