""":func:`unlearn`: check the arguments, copy (or guard) the model, run the loop, report."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from unlearnlens._checks import check_bool, check_int, check_model
from unlearnlens._guard import preserved
from unlearnlens._progress import progress_enabled
from unlearnlens._roles import mark_unlearned
from unlearnlens._seed import deterministic_run
from unlearnlens._storage import check_writable
from unlearnlens.components import ParamSpec, resolve_params
from unlearnlens.errors import ConfigError
from unlearnlens.trainers.base import MethodConfig, TrainData
from unlearnlens.trainers.config import TrainConfig
from unlearnlens.trainers.data import TrainSet, as_train_set, eos_id
from unlearnlens.trainers.loop import _copy_model, train
from unlearnlens.trainers.registry import build_method

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["UnlearnRun", "kept_grads", "unlearn"]


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
        master_weights: The float32 master values of the trained bfloat16/float16
            parameters, on the CPU (the model holds them rounded to its dtype); empty when
            every trained parameter is float32 or ``master_weights=False``. Load them into a
            float32 copy of the model to keep updates smaller than the model dtype resolves.
    """

    model: HookedTransformer
    history: tuple[dict[str, float | int], ...]
    config: TrainConfig
    method_config: MethodConfig
    trained: tuple[str, ...]
    master_weights: dict[str, Tensor] | None = None

    def history_frame(self) -> pd.DataFrame:
        """The history as a DataFrame indexed by step (eval-only rows have NaN losses)."""
        import pandas as pd

        return pd.DataFrame(list(self.history)).set_index("step")

    def full_precision_model(self) -> HookedTransformer:
        """A float32 copy of :attr:`model` whose trained parameters hold their master values.

        For a bfloat16/float16 run, this is the training result without the final rounding
        (a new float32 model: four bytes per parameter). For a float32 run it is a copy.
        """
        out = _copy_model(self.model).to(torch.float32)
        params = dict(out.named_parameters())
        with torch.no_grad():
            for name, value in (self.master_weights or {}).items():
                params[name].copy_(value)
        return out

    @property
    def final(self) -> dict[str, float]:
        """The metrics after the last step."""
        return {k: v for k, v in self.history[-1].items() if k.startswith(("forget_", "retain_"))}


@contextlib.contextmanager
def kept_grads(model: nn.Module) -> Iterator[None]:
    """Sets every ``.grad`` of ``model`` aside for the block and puts the same tensors back.

    Stale gradients the caller left on the parameters then neither leak into the first step
    nor get lost, and gradients made inside the block (also when it is interrupted) are
    dropped.
    """
    saved = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved:
        p.grad = None
    try:
        yield
    finally:
        for p, g in saved:
            p.grad = g


def _check_steps(steps: object, epochs: object) -> tuple[int | None, int | None]:
    """``steps`` and ``epochs`` checked (at most one of them given)."""
    if steps is not None and epochs is not None:
        raise ConfigError(f"give steps or epochs, not both (got steps={steps}, epochs={epochs})")
    return (
        None if steps is None else check_int(steps, "steps", minimum=1),
        None if epochs is None else check_int(epochs, "epochs", minimum=1),
    )


def _check_checkpoint_dir(path: object) -> None:
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"checkpoint_dir must be a path, got {path!r} ({type(path).__name__})")
    check_writable(path, what="checkpoint_dir")


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
    progress: bool | None = None,
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
    grad_accum_steps: int = 1,
    answer_eos: bool | None = None,
    master_weights: bool = True,
    deterministic: bool = False,
    **method_args: Any,
) -> UnlearnRun:
    """Unlearns ``forget`` from a copy of ``model`` by fine-tuning with a registered method.

    Args:
        model: The model to unlearn from. It is copied and left untouched (weights, modes,
            grad flags, ``.grad`` tensors, hooks) unless ``inplace=True``, which trains it
            directly (its modes, grad flags and ``.grad`` tensors still come back as they
            were; its weights are those after the last completed step, also when the run
            stops early).
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
        batch_size: Forget (and retain) examples per optimizer step.
        params: Which parameters train (see :data:`~unlearnlens.components.ParamSpec`);
            the rest are frozen. Default: all, or the method's own default (RMU).
        seed: Seed of the batch order and of the method's random draws.
        progress: Show a progress bar (``None``: the library-wide setting).
        checkpoint_dir: Save checkpoints here, and resume from the newest one if present; a
            resumed run ends bit-identical to an uninterrupted one.
        inplace: Train ``model`` itself instead of a copy.
        eval_every: Record forget/retain metrics every this many steps (default: a tenth of
            the run; 0: only before and after).
        weight_decay: AdamW weight decay (never on biases and normalisation weights).
        warmup_ratio: Fraction of the steps with a linear learning-rate warm-up.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay after warm-up.
        max_grad_norm: Gradient clipping norm (``None``: no clipping).
        max_length: Chunk length for plain texts.
        eval_size: Number of forget/retain examples the metrics are computed on.
        checkpoint_every: Steps between checkpoints (0: only at the end).
        grad_accum_steps: Micro-batches per step (the step's update is the whole batch's).
        answer_eos: Score an end-of-sequence token after answers: ``True`` after every
            answer, ``None`` only after taught refusals (``idk``, ``dpo``), ``False`` never.
        master_weights: Train bfloat16/float16 parameters through float32 master copies.
        deterministic: Seed every generator from ``seed`` and use deterministic kernels
            for the run; the caller's generators are restored afterwards.
        **method_args: Fields of the method's config (``beta=0.1``, ``retain_weight=1.5``).

    Returns:
        An :class:`UnlearnRun` with the model, the history and the configuration.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        ConfigError: A bad option (named), or a method that needs ``retain`` given none.
        PromptError: An empty or malformed forget/retain set.
        ComponentError: ``params`` names an unknown component or selects nothing.
        CheckpointError: A checkpoint in ``checkpoint_dir`` lacks an entry or has a wrong one.
        FileFormatError: A checkpoint file is truncated or corrupt.
        NonFiniteLossError: The loss, gradient or update became non-finite; the exception's
            ``step`` and ``model`` attributes give the completed steps and the model at its
            last finite state (except after a non-finite update with
            ``master_weights=False``, which reaches bf16/fp16 parameters before it is seen).
    """
    check_model(model, "model")
    meth = build_method(method, method_args)
    inplace = check_bool(inplace, "inplace")
    progress_enabled(progress)  # a bad value fails here, not after the work
    _check_checkpoint_dir(checkpoint_dir)
    steps, epochs = _check_steps(steps, epochs)
    if eval_every is not None:
        check_int(eval_every, "eval_every", minimum=0)
    options = dict(
        method=method,
        lr=type(meth).default_lr if lr is None else lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        schedule=schedule,
        max_grad_norm=max_grad_norm,
        seed=seed,
        max_length=max_length,
        eval_size=eval_size,
        checkpoint_every=checkpoint_every,
        grad_accum_steps=grad_accum_steps,
        answer_eos=answer_eos,
        master_weights=master_weights,
        deterministic=deterministic,
    )
    TrainConfig(steps=1 if steps is None else steps, **options)  # every check before work
    eos = eos_id(model)
    if answer_eos is True and eos is None:
        raise ConfigError("answer_eos=True needs a model whose tokenizer has an eos token")
    pair_eos = eos if answer_eos is True else None
    forget_set = as_train_set(model, forget, max_length=max_length, what="forget", eos=pair_eos)
    retain_set = (
        None
        if retain is None
        else as_train_set(model, retain, max_length=max_length, what="retain", eos=pair_eos)
    )
    if meth.needs_retain() and retain_set is None:
        raise ConfigError(
            f"method {method!r} needs a retain set ({meth.config}); pass retain=... (or set its "
            "retain weight to 0 where it has one)"
        )
    if epochs is not None:
        n_steps = epochs * -(-len(forget_set) // batch_size)
    else:
        n_steps = type(meth).default_steps if steps is None else steps
    cfg = TrainConfig(
        steps=n_steps,
        eval_every=max(1, n_steps // 10) if eval_every is None else eval_every,
        **options,
    )
    spec = meth.default_params(model) if params is None else params
    resolve_params(model, spec)  # validate before any copy or work
    work = model if inplace else _copy_model(model)
    refusal_eos = None if answer_eos is False else eos
    masters: dict[str, Tensor] = {}
    # a copy starts with the caller's modes, grad flags and grads, and comes back with them
    with (
        preserved(work, eval_mode=False, no_grad=False),
        kept_grads(work),
        deterministic_run(seed) if deterministic else contextlib.nullcontext(),
    ):
        selected = resolve_params(work, spec)
        data = TrainData(forget_set, retain_set, batch_size, seed, tuple(selected), refusal_eos)
        history = train(
            work,
            meth,
            data,
            cfg,
            selected,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            masters=masters,
        )
    mark_unlearned(work)  # lets restored(unlearned, base) be caught as swapped
    return UnlearnRun(work, tuple(history), cfg, meth.config, tuple(selected), masters)
