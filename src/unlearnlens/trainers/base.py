"""What an unlearning method is: a typed config, an optional set-up, and one loss.

A method is a small class::

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        weight: float = 1.0
        \"\"\"How much the forget term counts.\"\"\"

    @register_method("mine")
    class Mine(UnlearningMethod):
        config_class = MyConfig
        def loss(self, model, batch):
            return -self.config.weight * nll(model, batch.forget)

The shared loop (:func:`~unlearnlens.unlearn`) draws batches, calls :meth:`loss`, and takes
care of the optimizer, clipping, guards, evaluation and checkpoints.

With gradient accumulation, :meth:`loss` sees micro-batches and the loop weights each one's
loss by :attr:`Batch.share`, its fraction of the step's forget examples: a mean over the
batch's examples is then exact as written. For a mean over tokens, divide the token sum by
``batch.denominator(lambda b: <token count of b>)`` (as :func:`~.losses.forget_nll` does), so
that the micro-batches add up to the whole step's mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from jaxtyping import Float, Int
from torch import Tensor

from unlearnlens.errors import ConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.components import ParamSpec
    from unlearnlens.prompts import PromptSet

__all__ = ["Batch", "MethodConfig", "MethodLoss", "TrainData", "UnlearningMethod"]


@dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs: frozen dataclasses, validated in ``__post_init__``."""


@dataclass(frozen=True)
class MethodLoss:
    """A method's loss for one batch, with the named terms it is made of (for the history)."""

    total: Float[Tensor, ""]
    """The scalar that is minimised."""
    parts: Mapping[str, Tensor] = field(default_factory=dict)
    """Named scalar terms (such as ``forget_loss``, ``retain_loss``), logged per step."""


@dataclass(frozen=True)
class TrainData:
    """The whole forget and retain sets, as :meth:`UnlearningMethod.prepare` sees them."""

    forget: PromptSet
    """Every forget example."""
    retain: PromptSet | None
    """Every retain example, if any."""
    batch_size: int
    """The training batch size (a good chunk size for precomputing)."""
    seed: int = 0
    """The run's seed, for any randomness a method draws in ``prepare``."""
    trained: tuple[str, ...] = ()
    """Full names of the parameters that train (for methods that keep their starting values)."""
    refusal_eos: int | None = None
    """Token id to end taught refusal answers with (``None``: refusals end without one)."""


@dataclass(frozen=True)
class Batch:
    """One training step's examples."""

    forget: PromptSet
    """The forget examples of this step."""
    forget_index: Int[Tensor, " batch"]
    """Their indices in the whole forget set (to look up values precomputed in ``prepare``)."""
    retain: PromptSet | None
    """The retain examples of this step (``None`` when no retain set was given)."""
    retain_index: Int[Tensor, " retain"] | None
    """Their indices in the whole retain set."""
    step: int
    """The 0-based optimizer step."""
    whole: Batch | None = None
    """With gradient accumulation, the optimizer step's whole batch this micro-batch is part
    of (``None``: this batch is the whole step)."""

    @property
    def share(self) -> float:
        """This micro-batch's fraction of the step's forget examples (1.0 without accumulation).

        The loop weights each micro-batch's loss by its share, so a loss that is a mean over
        the batch's forget examples sums to the whole batch's loss exactly.
        """
        if self.whole is None:
            return 1.0
        return len(self.forget) / len(self.whole.forget)

    def denominator(self, count: Callable[[Batch], int | float | Tensor]) -> float:
        """``count`` of the whole step's batch times :attr:`share`.

        The normaliser to divide a micro-batch's sum by, so that its share-weighted loss is
        the whole batch's mean. Without accumulation this is ``count(self)``. Example: the
        mean over every answer token of the step is
        ``token_sum / batch.denominator(lambda b: b.forget.answer_lengths.sum())``.
        """
        if self.whole is None:
            return float(count(self))
        return float(count(self.whole)) * self.share

    @property
    def retain_set(self) -> PromptSet:
        """The retain examples; raises a :class:`ConfigError` when there are none."""
        if self.retain is None:
            raise ConfigError("this method needs a retain set, but none was given (retain=None)")
        return self.retain


class UnlearningMethod:
    """Base class of unlearning methods. Subclass, set ``config_class``, write :meth:`loss`.

    Class attributes:
        name: The registered name (set by :func:`register_method`).
        config_class: The method's config dataclass (a :class:`MethodConfig` subclass).
        requires_retain: Whether the method cannot run without a retain set.
        default_lr: Learning rate when ``unlearn`` is called without ``lr``.
        default_steps: Number of steps when ``unlearn`` is called without ``steps``/``epochs``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    requires_retain: ClassVar[bool] = False
    default_lr: ClassVar[float] = 1e-5
    default_steps: ClassVar[int] = 100

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config: Any = config if config is not None else self.config_class()

    def needs_retain(self) -> bool:
        """Whether this configured method needs a retain set (by default ``requires_retain``)."""
        return self.requires_retain

    def default_params(self, model: HookedTransformer) -> ParamSpec:
        """Which parameters train when ``unlearn`` gets ``params=None`` (default: all)."""
        return None

    def prepare(self, model: HookedTransformer, data: TrainData) -> None:
        """Precomputes what the loss needs from the starting model (called once, no grad).

        ``model`` is the model before any update, in eval mode under ``torch.no_grad()``:
        reference log-probabilities computed here are the frozen reference's.
        """

    def loss(self, model: HookedTransformer, batch: Batch) -> MethodLoss | Tensor:
        """The scalar to minimise on ``batch`` (or a :class:`MethodLoss` with named parts)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch)")
