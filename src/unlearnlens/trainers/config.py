"""The training configuration shared by every unlearning method."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from unlearnlens._checks import check_bool, check_float, check_int
from unlearnlens.errors import ConfigError

__all__ = ["SCHEDULES", "TrainConfig"]

SCHEDULES = ("constant", "linear", "cosine")
"""The learning-rate schedules after warm-up."""


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`~unlearnlens.unlearn` trains: optimizer, schedule, batches, evaluation.

    The optimizer is AdamW over float32 master copies of the selected parameters (see
    :mod:`unlearnlens.trainers.optim`), with no weight decay on biases and normalisation
    weights. The learning rate warms up linearly over the first ``warmup_ratio * steps``
    steps, then follows ``schedule`` (:meth:`lr_factor` gives the formula). Gradients are
    clipped to ``max_grad_norm``.
    """

    method: str
    """Name of the registered unlearning method."""
    steps: int
    """Number of optimizer steps."""
    lr: float
    """Peak learning rate."""
    batch_size: int = 32
    """Forget examples per optimizer step (and as many retain examples, for methods that use
    them), whatever ``grad_accum_steps`` is."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay, on every trained parameter except biases and
    normalisation weights."""
    warmup_ratio: float = 0.1
    """Fraction of ``steps`` over which the learning rate rises linearly from 0."""
    schedule: str = "constant"
    """After warm-up: keep the peak rate, decay it linearly, or follow a half cosine."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; ``None`` turns clipping off."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment coefficients."""
    seed: int = 0
    """Seed of the batch order and of any randomness a method draws (RMU's control vector)."""
    max_length: int = 128
    """Token length of the chunks plain texts are cut into (clipped to the model's n_ctx)."""
    eval_every: int = 0
    """Record forget/retain metrics every this many steps (and before and after); 0: only
    before and after."""
    eval_size: int = 64
    """Evaluate on the first this many forget (and retain) examples."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps when a checkpoint directory is given (0: only
    at the end)."""
    grad_accum_steps: int = 1
    """Split each step's batch into this many micro-batches, one forward and backward pass
    each, gradients summed in float32 before the one optimizer step: the same update as the
    whole batch at a fraction of the activation memory."""
    answer_eos: bool | None = None
    """Score an end-of-sequence token after each answer. ``True``: after every forget, retain
    and refusal answer (open-unlearning's and ConceptVectors' convention); ``None``: only
    after the refusals that ``idk`` and ``dpo`` teach, so the model learns to stop there;
    ``False``: never. Plain-text chunks never get one."""
    master_weights: bool = True
    """Keep float32 master copies of bfloat16/float16 trained parameters (see
    :mod:`~unlearnlens.trainers.optim`); ``False`` updates those parameters in their own
    dtype, where small updates round away and a non-finite update reaches the model before
    it is detected (the model of the :class:`~unlearnlens.NonFiniteLossError` is then not
    at its last finite state)."""
    deterministic: bool = False
    """Run with every random generator seeded from ``seed`` and PyTorch's deterministic
    algorithms on (see :func:`unlearnlens.seed_everything`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"method must be a non-empty string, got {self.method!r}")
        check_int(self.steps, "steps", minimum=1)
        check_float(self.lr, "lr", positive=True)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_float(self.weight_decay, "weight_decay", minimum=0.0)
        check_float(self.warmup_ratio, "warmup_ratio", minimum=0.0)
        if not self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {self.schedule!r}"
            )
        if self.max_grad_norm is not None:
            check_float(self.max_grad_norm, "max_grad_norm", positive=True)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ConfigError(f"betas must be a tuple of two numbers, got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_float(b, f"betas[{i}]", minimum=0.0)
            if not b < 1:
                raise ConfigError(f"betas[{i}] must be in [0, 1), got {b}")
        check_int(self.seed, "seed", minimum=0)
        check_int(self.max_length, "max_length", minimum=2)
        check_int(self.eval_every, "eval_every", minimum=0)
        check_int(self.checkpoint_every, "checkpoint_every", minimum=0)
        check_int(self.eval_size, "eval_size", minimum=1)
        check_int(self.grad_accum_steps, "grad_accum_steps", minimum=1)
        if self.grad_accum_steps > self.batch_size:
            raise ConfigError(
                f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed batch_size "
                f"({self.batch_size}): every micro-batch needs at least one example"
            )
        if self.answer_eos is not None:
            check_bool(self.answer_eos, "answer_eos")
        check_bool(self.master_weights, "master_weights")
        check_bool(self.deterministic, "deterministic")

    @property
    def warmup_steps(self) -> int:
        """Number of warm-up steps: ``int(warmup_ratio * steps)``."""
        return int(self.warmup_ratio * self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step`` (0-based).

        With ``w`` warm-up steps and ``n`` steps: ``(step + 1) / (w + 1)`` during warm-up, then
        with ``t = (step - w) / (n - w)`` (0 at the first step after warm-up): ``1``
        (constant), ``1 - t`` (linear) or ``(1 + cos(π t)) / 2`` (cosine). ``t`` stays below
        1, so the last step still has a positive rate.
        """
        w = self.warmup_steps
        if step < w:
            return (step + 1) / (w + 1)
        t = (step - w) / max(1, self.steps - w)
        if self.schedule == "linear":
            return max(0.0, (self.steps - step) / max(1, self.steps - w))
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    def to_dict(self) -> dict[str, object]:
        """The fields as a plain dict (for checkpoints and reports)."""
        return asdict(self)
