"""The training loop shared by every unlearning method, and :func:`unlearn`."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from unlearnlens._guard import preserved
from unlearnlens._roles import mark_unlearned
from unlearnlens.components import ParamSpec, resolve_params
from unlearnlens.errors import ConfigError, NonFiniteLossError
from unlearnlens.metrics import accuracy, answer_logprob
from unlearnlens.runner import target_logits
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.checkpoint import load_checkpoint, save_checkpoint
from unlearnlens.trainers.config import TrainConfig
from unlearnlens.trainers.data import TrainSet, as_train_set, batch_indices
from unlearnlens.trainers.registry import build_method

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = ["UnlearnRun", "evaluate_sets", "train", "unlearn"]


@dataclass(frozen=True)
class UnlearnRun:
    """The result of :func:`unlearn`.

    Attributes:
        model: The unlearned model (a copy of the input unless ``inplace=True``).
        history: One dict per step (``step``, ``loss``, ``lr``, ``grad_norm`` and the method's
            named terms), with forget/retain metrics (``forget_accuracy``, ``forget_logprob``,
            ``retain_accuracy``, ``retain_logprob``) on the evaluated steps; step 0 holds the
            metrics before training.
        config: The training configuration.
        method_config: The method's configuration.
        trained: Full names of the parameters that trained.
    """

    model: HookedTransformer
    history: tuple[dict[str, float | int], ...]
    config: TrainConfig
    method_config: MethodConfig
    trained: tuple[str, ...]

    def history_frame(self) -> pd.DataFrame:
        """The history as a DataFrame indexed by step (eval-only rows have NaN losses)."""
        import pandas as pd

        return pd.DataFrame(list(self.history)).set_index("step")

    @property
    def final(self) -> dict[str, float]:
        """The metrics after the last step."""
        return {k: v for k, v in self.history[-1].items() if k.startswith(("forget_", "retain_"))}


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


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(
            torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            )
        )
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


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


def _check_finite(
    loss: float,
    grad_norm: float,
    step: int,
    name: str,
    cfg: TrainConfig,
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Stops the run before ``optimizer.step()`` when the loss or gradient is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    optimizer.zero_grad(set_to_none=True)
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    err = NonFiniteLossError(
        f"method {name!r} gave a non-finite {what} at step {step} (loss={loss}, "
        f"grad_norm={grad_norm}); training stopped and the model is left as it was after "
        f"{step} step(s). Lower lr (now {cfg.lr:g}) or check the method's loss"
    )
    err.step = step  # type: ignore[attr-defined]
    err.model = model  # type: ignore[attr-defined]
    raise err


def train(
    model: HookedTransformer,
    method: UnlearningMethod,
    data: TrainData,
    cfg: TrainConfig,
    params: dict[str, nn.Parameter],
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, float | int]]:
    """Trains ``model`` in place with ``method``'s loss; returns the history.

    The caller guards the model's modes and grad flags; this function sets them freely.
    """
    name = method.name or type(method).__name__
    model.eval()
    with torch.no_grad():
        method.prepare(model, data)
    model.requires_grad_(False)
    trained = list(params.values())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        trained, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    eval_sets = {"forget": data.forget[: cfg.eval_size]}
    if data.retain is not None:
        eval_sets["retain"] = data.retain[: cfg.eval_size]
    fingerprint = _fingerprint(method, cfg, list(params), data)
    start, history = 0, []
    if checkpoint_dir is not None:
        resumed = load_checkpoint(
            checkpoint_dir, params=params, optimizer=optimizer, fingerprint=fingerprint
        )
        if resumed is not None:
            start, history = resumed
    if start == 0:
        history = [{"step": 0, **evaluate_sets(model, eval_sets, cfg.batch_size)}]
    bar = tqdm(
        range(start, cfg.steps),
        disable=not progress,
        desc=f"unlearn[{name}]",
        initial=start,
        total=cfg.steps,
    )
    for step in bar:
        model.train()
        lr = cfg.lr * cfg.lr_factor(step)  # the schedule is a function of the step alone
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _make_batch(data.forget, data.retain, cfg, step)
        out = _as_loss(method.loss(model, batch), name)
        loss = float(out.total.detach())
        out.total.backward()
        grad_norm = _grad_norm(trained, cfg.max_grad_norm)
        _check_finite(loss, grad_norm, step, name, cfg, model, optimizer)
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        row.update({k: float(v.detach()) for k, v in out.parts.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
            row.update(evaluate_sets(model, eval_sets, cfg.batch_size))
        history.append(row)
        bar.set_postfix(loss=f"{loss:.4g}")
        if checkpoint_dir is not None and (
            done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        ):
            save_checkpoint(
                checkpoint_dir,
                step=done,
                params=params,
                optimizer=optimizer,
                history=history,
                fingerprint=fingerprint,
            )
    bar.close()
    model.eval()
    return history


def _resolve_steps(
    steps: int | None, epochs: int | None, default: int, n: int, batch_size: int
) -> int:
    if steps is not None and epochs is not None:
        raise ConfigError(f"give steps or epochs, not both (got steps={steps}, epochs={epochs})")
    if epochs is not None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
        return epochs * -(-n // batch_size)
    return default if steps is None else steps


def unlearn(
    model: HookedTransformer,
    forget: TrainSet,
    *,
    retain: TrainSet | None = None,
    method: str = "npo",
    steps: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 32,
    params: ParamSpec = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    inplace: bool = False,
    eval_every: int | None = None,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    schedule: str = "constant",
    max_grad_norm: float | None = 1.0,
    max_length: int = 128,
    eval_size: int = 64,
    checkpoint_every: int = 0,
    **method_args: Any,
) -> UnlearnRun:
    """Unlearns ``forget`` from a copy of ``model`` by fine-tuning with a registered method.

    Args:
        model: The model to unlearn from. It is copied and left untouched (weights, modes,
            grad flags, hooks) unless ``inplace=True``, which trains it directly (its modes and
            grad flags still come back as they were).
        forget: What to forget: a PromptSet or ``(question, answer)`` pairs (loss on the answer
            tokens), or plain texts (cut into ``max_length``-token chunks, loss on every token).
        retain: What to keep, in the same forms; required by methods with a retain term.
        method: A registered method name (see :func:`available_methods`): ``ga``,
            ``grad_diff``, ``npo``, ``npo_kl``, ``npo_rt``, ``simnpo``, ``dpo``,
            ``dpo_retain``, ``rmu``, ``idk`` or your own.
        steps: Optimizer steps (default: the method's ``default_steps``).
        epochs: Alternatively, passes over the forget set.
        lr: Peak learning rate (default: the method's ``default_lr``, tuned on the toy world;
            1e-5 to 5e-5 is typical for 7B models).
        batch_size: Forget (and retain) examples per step.
        params: Which parameters train (see :data:`~unlearnlens.components.ParamSpec`);
            the rest are frozen. Default: all, or the method's own default (RMU).
        seed: Seed of the batch order and of the method's random draws.
        progress: Show a progress bar.
        checkpoint_dir: Save checkpoints here, and resume from the newest one if present; a
            resumed run ends bit-identical to an uninterrupted one.
        inplace: Train ``model`` itself instead of a copy.
        eval_every: Record forget/retain metrics every this many steps (default: a tenth of
            the run; 0: only before and after).
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the steps with a linear learning-rate warm-up.
        schedule: ``"constant"`` or ``"linear"`` decay after warm-up.
        max_grad_norm: Gradient clipping norm (``None``: no clipping).
        max_length: Chunk length for plain texts.
        eval_size: Number of forget/retain examples the metrics are computed on.
        checkpoint_every: Steps between checkpoints (0: only at the end).
        **method_args: Fields of the method's config (``beta=0.1``, ``retain_weight=1.5``).

    Returns:
        An :class:`UnlearnRun` with the model, the history and the configuration.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        ConfigError: A bad option, or a method that needs ``retain`` given none.
        PromptError: An empty or malformed forget/retain set.
        ComponentError: ``params`` names an unknown component or selects nothing.
        NonFiniteLossError: The loss or gradient became non-finite; the exception's ``step``
            and ``model`` attributes give the step and the model at its last finite state.
    """
    meth = build_method(method, method_args)
    forget_set = as_train_set(model, forget, max_length=max_length, what="forget")
    retain_set = (
        None
        if retain is None
        else as_train_set(model, retain, max_length=max_length, what="retain")
    )
    if meth.needs_retain() and retain_set is None:
        raise ConfigError(
            f"method {method!r} needs a retain set ({meth.config}); pass retain=... (or set its "
            "retain weight to 0 where it has one)"
        )
    n_steps = _resolve_steps(steps, epochs, type(meth).default_steps, len(forget_set), batch_size)
    cfg = TrainConfig(
        method=method,
        steps=n_steps,
        lr=type(meth).default_lr if lr is None else lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        schedule=schedule,  # type: ignore[arg-type]
        max_grad_norm=max_grad_norm,
        seed=seed,
        max_length=max_length,
        eval_every=max(1, n_steps // 10) if eval_every is None else eval_every,
        eval_size=eval_size,
        checkpoint_every=checkpoint_every,
    )
    spec = meth.default_params(model) if params is None else params
    resolve_params(model, spec)  # validate before any copy or work
    work = model if inplace else _copy_model(model)
    data = TrainData(forget_set, retain_set, batch_size, seed)
    # a copy starts with the caller's modes and grad flags, and comes back with them too
    with preserved(work, eval_mode=False, no_grad=False):
        selected = resolve_params(work, spec)
        history = train(
            work, meth, data, cfg, selected, progress=progress, checkpoint_dir=checkpoint_dir
        )
    mark_unlearned(work)  # lets restored(unlearned, base) be caught as swapped
    return UnlearnRun(work, tuple(history), cfg, meth.config, tuple(selected))
