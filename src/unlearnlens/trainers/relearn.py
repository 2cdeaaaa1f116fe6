"""The relearning attack: a few fine-tuning steps, then see whether the forgotten comes back.

If unlearning only hid the knowledge, a handful of steps on a small related (or even
unrelated) set brings the forget answers back far faster than learning them from scratch
(Lynch et al., 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs"; Deeb & Roger, 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unlearnlens._guard import preserved
from unlearnlens.prompts import Prompts, as_promptset
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.config import TrainConfig
from unlearnlens.trainers.data import TrainSet, as_train_set
from unlearnlens.trainers.loop import _copy_model, evaluate_sets, train
from unlearnlens.trainers.losses import nll
from unlearnlens.trainers.run import kept_grads

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["FineTune", "RelearnRun", "relearn"]


class FineTune(UnlearningMethod):
    """Plain fine-tuning, ``L = NLL(data)``: the relearning attack's loss (not registered)."""

    config_class = MethodConfig

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss:
        """The language-model loss on the batch's answer tokens."""
        value = nll(model, batch.forget)
        return MethodLoss(value, {"nll": value})


@dataclass(frozen=True)
class RelearnRun:
    """The result of :func:`relearn`.

    Attributes:
        model: The fine-tuned copy.
        history: Per-step losses (and the training set's metrics before and after).
        before: ``eval_accuracy`` and ``eval_logprob`` of the model before the attack (``None``
            when no ``eval`` prompts were given).
        after: The same after the attack.
        config: The training configuration.
    """

    model: HookedTransformer
    history: tuple[dict[str, float | int], ...]
    before: dict[str, float] | None
    after: dict[str, float] | None
    config: TrainConfig


def relearn(
    model: HookedTransformer,
    data: TrainSet,
    *,
    steps: int,
    lr: float,
    batch_size: int = 8,
    seed: int = 0,
    eval: Prompts | None = None,
    progress: bool | None = None,
) -> RelearnRun:
    """Fine-tunes a copy of ``model`` on ``data`` for a few steps (the relearning attack).

    Args:
        model: The (unlearned) model; left untouched.
        data: The attack's training set: a PromptSet, ``(question, answer)`` pairs or texts.
        steps: Optimizer steps (AdamW, no warm-up, clipping at 1).
        lr: Learning rate.
        batch_size: Examples per step.
        seed: Seed of the batch order.
        eval: Prompts (typically the forget questions) scored before and after the attack.
        progress: Show a progress bar (``None``: the library-wide setting).

    Raises:
        PromptError: Empty or malformed ``data`` or ``eval``.
        ConfigError: Bad ``steps``, ``lr`` or ``batch_size``.
    """
    cfg = TrainConfig(
        method="relearn",
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        warmup_ratio=0.0,
        eval_every=0,
    )
    train_set = as_train_set(model, data, max_length=cfg.max_length, what="relearning")
    eval_set = None if eval is None else as_promptset(model, eval)
    before = None if eval_set is None else evaluate_sets(model, {"eval": eval_set}, batch_size)
    work = _copy_model(model)
    selected = dict(work.named_parameters())
    method = FineTune()
    with preserved(work, eval_mode=False, no_grad=False), kept_grads(work):
        history = train(
            work,
            method,
            TrainData(train_set, None, batch_size, seed),
            cfg,
            selected,
            progress=progress,
        )
    after = None if eval_set is None else evaluate_sets(work, {"eval": eval_set}, batch_size)
    return RelearnRun(work, tuple(history), before, after, cfg)
