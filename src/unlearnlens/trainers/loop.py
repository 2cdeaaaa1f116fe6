"""The training loop shared by every unlearning method: one optimizer step, the whole run."""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from unlearnlens._guard import preserved
from unlearnlens._progress import bar as progress_bar
from unlearnlens.errors import ConfigError, NonFiniteLossError
from unlearnlens.metrics import accuracy, answer_logprob
from unlearnlens.runner import target_logits
from unlearnlens.trainers.base import Batch, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from unlearnlens.trainers.config import TrainConfig
from unlearnlens.trainers.data import batch_indices
from unlearnlens.trainers.optim import MasterOptimizer, is_low_precision

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = ["evaluate_sets", "train"]


def evaluate_sets(
    model: HookedTransformer, sets: dict[str, PromptSet], batch_size: int
) -> dict[str, float]:
    """``{name}_accuracy`` and ``{name}_logprob`` (mean answer log-prob) of each set."""
    out: dict[str, float] = {}
    with preserved(model):
        for name, prompts in sets.items():
            acc, logp = [], []
            for _, chunk in prompts.batches(batch_size):
                z = target_logits(model, chunk)
                acc.append(accuracy(z, chunk))
                logp.append(answer_logprob(z, chunk))
            out[f"{name}_accuracy"] = float(torch.cat(acc).mean())
            out[f"{name}_logprob"] = float(torch.cat(logp).mean())
    return out


def _copy_model(model: HookedTransformer) -> HookedTransformer:
    """A deep copy of ``model`` that shares its tokenizer (the tokenizer holds no weights)."""
    memo = {id(model.tokenizer): model.tokenizer} if model.tokenizer is not None else {}
    return copy.deepcopy(model, memo)


def _make_batch(forget: PromptSet, retain: PromptSet | None, cfg: TrainConfig, step: int) -> Batch:
    f_idx = batch_indices(len(forget), cfg.batch_size, step, cfg.seed)
    r_idx = (
        None if retain is None else batch_indices(len(retain), cfg.batch_size, step, cfg.seed + 1)
    )
    return Batch(
        forget=forget[f_idx],
        forget_index=f_idx,
        retain=None if retain is None or r_idx is None else retain[r_idx],
        retain_index=r_idx,
        step=step,
    )


def _as_loss(out: MethodLoss | torch.Tensor, name: str) -> MethodLoss:
    if isinstance(out, torch.Tensor):
        out = MethodLoss(out)
    if not isinstance(out, MethodLoss) or not isinstance(out.total, torch.Tensor):
        raise ConfigError(
            f"method {name!r} must return a tensor or a MethodLoss, got {type(out).__name__}"
        )
    if out.total.ndim != 0:
        raise ConfigError(
            f"method {name!r} returned a loss of shape {tuple(out.total.shape)}; it must be a "
            "scalar"
        )
    if not out.total.requires_grad:
        raise ConfigError(
            f"the loss of method {name!r} does not depend on any trained parameter; check params"
        )
    return out


def _fingerprint(
    method: UnlearningMethod, cfg: TrainConfig, names: list[str], data: TrainData
) -> dict[str, Any]:
    keep = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ("eval_every", "eval_size", "checkpoint_every")
    }
    return {
        "method": method.name or type(method).__name__,
        "method_config": repr(method.config),
        **{f"train.{k}": repr(v) for k, v in keep.items()},
        "trained": ",".join(names),
        "forget": repr(tuple(data.forget.tokens.shape)),
        "retain": repr(None if data.retain is None else tuple(data.retain.tokens.shape)),
    }


def _micro_batches(batch: Batch, k: int) -> list[Batch]:
    """Cuts a step's batch into at most ``k`` micro-batches (forget and retain alike)."""
    n_f = len(batch.forget)
    n_r = n_f if batch.retain is None else len(batch.retain)
    k = min(k, n_f, n_r)
    if k == 1:
        return [batch]
    f_parts = torch.tensor_split(torch.arange(n_f), k)
    r_parts = torch.tensor_split(torch.arange(n_r), k)
    out = []
    for fi, ri in zip(f_parts, r_parts, strict=True):
        out.append(
            Batch(
                forget=batch.forget[fi],
                forget_index=batch.forget_index[fi],
                retain=None if batch.retain is None else batch.retain[ri],
                retain_index=None if batch.retain_index is None else batch.retain_index[ri],
                step=batch.step,
                whole=batch,
            )
        )
    return out


def _non_finite(
    name: str,
    what: str,
    step: int,
    detail: str,
    cfg: TrainConfig,
    model: Any,
    *,
    reached_model: bool = False,
) -> Any:
    state = (
        "the parameters trained without master copies (master_weights=False) already hold "
        "the non-finite update, so the model is not finite"
        if reached_model
        else f"the model is left as it was after {step} step(s)"
    )
    err = NonFiniteLossError(
        f"method {name!r} gave a non-finite {what} at step {step} ({detail}); training stopped "
        f"and {state}. Lower lr (now {cfg.lr:g}) or check the method's loss"
    )
    err.step = step  # type: ignore[attr-defined]
    err.model = model  # type: ignore[attr-defined]
    return err


def _autocast(model: HookedTransformer) -> contextlib.AbstractContextManager[Any]:
    """On CUDA, autocast in a bf16/fp16 model's own dtype.

    Softmax, exponentials and reductions then run in float32 (TransformerLens already
    computes its norms in float32, and the losses are float32). CPU autocast changes none of
    these ops, so it is left off there.
    """
    dtype = model.cfg.dtype
    if not is_low_precision(dtype) or torch.device(model.cfg.device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _step(
    model: HookedTransformer,
    method: UnlearningMethod,
    data: TrainData,
    cfg: TrainConfig,
    opt: MasterOptimizer,
    step: int,
    name: str,
) -> dict[str, float | int]:
    """One optimizer step (all micro-batches); returns its history row.

    Raises:
        NonFiniteLossError: The loss, the gradient norm or the updated weights are not finite;
            the model then still holds the weights from before this step.
    """
    lr = cfg.lr * cfg.lr_factor(step)  # the schedule is a function of the step alone
    batch = _make_batch(data.forget, data.retain, cfg, step)
    micro = _micro_batches(batch, cfg.grad_accum_steps)
    while True:
        opt.zero_grad()
        loss, parts = 0.0, {}
        for mb in micro:
            with _autocast(model):
                out = _as_loss(method.loss(model, mb), name)
            share = mb.share
            total = out.total if share == 1.0 else out.total * share
            (total * opt.loss_scale if opt.loss_scale != 1.0 else total).backward()
            opt.accumulate()
            loss += float(total.detach())
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0.0) + share * float(v.detach())
        grad_norm = opt.clip(cfg.max_grad_norm)
        if math.isfinite(loss) and not math.isfinite(grad_norm) and opt.reduce_scale():
            continue  # a float16 overflow of the scaled gradients: the same step, half the scale
        break
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        opt.zero_grad()
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise _non_finite(name, what, step, f"loss={loss}, grad_norm={grad_norm}", cfg, model)
    try:
        opt.step(lr)
        finite = opt.update_is_finite()
    except RuntimeError as exc:  # AdamW's step size itself overflows float32 (lr ~ 1e38)
        if "overflow" not in str(exc):
            raise
        finite = False
    if not finite:
        opt.zero_grad()
        raise _non_finite(
            name,
            "weight update",
            step,
            f"lr={lr:g} overflows the {model.cfg.dtype}",
            cfg,
            model,
            reached_model=opt.in_place,
        )
    opt.write_back()
    opt.zero_grad()
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, **parts}


def train(
    model: HookedTransformer,
    method: UnlearningMethod,
    data: TrainData,
    cfg: TrainConfig,
    params: dict[str, nn.Parameter],
    *,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    masters: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, float | int]]:
    """Trains ``model`` in place with ``method``'s loss; returns the history.

    The caller guards the model's modes, grad flags and gradients; this function sets them
    freely. A checkpoint is read and checked before any work, and applied after ``prepare``.
    When ``masters`` is a dict, it receives the final float32 masters of the trained
    low-precision parameters (on the CPU).
    """
    name = method.name or type(method).__name__
    model.eval()
    opt = MasterOptimizer(
        model,
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        masters=cfg.master_weights,
    )
    fingerprint = _fingerprint(method, cfg, list(params), data)
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = read_checkpoint(checkpoint_dir, optimizer=opt, fingerprint=fingerprint)
    with torch.no_grad():
        method.prepare(model, data)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    eval_sets = {"forget": data.forget[: cfg.eval_size]}
    if data.retain is not None:
        eval_sets["retain"] = data.retain[: cfg.eval_size]
    start, history = 0, []
    try:
        if checkpoint is not None:
            restore_checkpoint(checkpoint, opt)
            opt.write_back()
            start, history = checkpoint.step, list(checkpoint.history)
        if start == 0:
            history = [{"step": 0, **evaluate_sets(model, eval_sets, cfg.batch_size)}]
        bar = progress_bar(
            range(start, cfg.steps),
            progress=progress,
            desc=f"unlearn[{name}]",
            initial=start,
            total=cfg.steps,
        )
        for step in bar:
            model.train()
            row = _step(model, method, data, cfg, opt, step, name)
            done = step + 1
            if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                row.update(evaluate_sets(model, eval_sets, cfg.batch_size))
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if checkpoint_dir is not None and (
                done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            ):
                save_checkpoint(
                    checkpoint_dir,
                    step=done,
                    optimizer=opt,
                    history=history,
                    fingerprint=fingerprint,
                )
        bar.close()
    finally:
        opt.finish()
    if masters is not None:
        masters.update(
            {
                n: m.detach().cpu()
                for n, m in opt.master_state().items()
                if is_low_precision(params[n].dtype) and m.dtype == torch.float32
            }
        )
    model.eval()
    return history
