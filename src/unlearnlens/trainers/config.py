"""The training configuration shared by every unlearning method."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from unlearnlens._checks import check_float, check_int
from unlearnlens.errors import ConfigError

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`~unlearnlens.unlearn` trains: optimizer, schedule, batches, evaluation.

    The optimizer is AdamW over the selected parameters; the learning rate warms up linearly
    from 0 over the first ``warmup_ratio * steps`` steps, then stays constant or decays
    linearly to 0 (``schedule``). Gradients are clipped to ``max_grad_norm``.
    """

    method: str
    """Name of the registered unlearning method."""
    steps: int
    """Number of optimizer steps."""
    lr: float
    """Peak learning rate."""
    batch_size: int = 32
    """Forget examples per step (and as many retain examples, for methods that use them)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of ``steps`` over which the learning rate rises linearly from 0."""
    schedule: Literal["constant", "linear"] = "constant"
    """After warm-up: keep the peak rate, or decay it linearly to 0 at the last step."""
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

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", minimum=1)
        check_float(self.lr, "lr", positive=True)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_float(self.weight_decay, "weight_decay", minimum=0.0)
        if not 0 <= check_float(self.warmup_ratio, "warmup_ratio") < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("constant", "linear"):
            raise ConfigError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        if self.max_grad_norm is not None:
            check_float(self.max_grad_norm, "max_grad_norm", positive=True)
        if (
            not isinstance(self.betas, (tuple, list))
            or len(self.betas) != 2
            or not all(0 <= check_float(b, "betas") < 1 for b in self.betas)
        ):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        check_int(self.seed, "seed")
        check_int(self.max_length, "max_length", minimum=2)
        check_int(self.eval_every, "eval_every", minimum=0)
        check_int(self.checkpoint_every, "checkpoint_every", minimum=0)
        check_int(self.eval_size, "eval_size", minimum=1)

    @property
    def warmup_steps(self) -> int:
        """Number of warm-up steps."""
        return int(self.warmup_ratio * self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step`` (0-based): linear warm-up, then the schedule."""
        w = self.warmup_steps
        if step < w:
            return (step + 1) / (w + 1)
        if self.schedule == "linear":
            return max(0.0, (self.steps - step) / max(1, self.steps - w))
        return 1.0

    def to_dict(self) -> dict[str, object]:
        """The fields as a plain dict (for checkpoints and reports)."""
        return asdict(self)
