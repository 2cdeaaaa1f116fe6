"""What every audit probe shares: its inputs, its score, its interface and the registry.

A probe measures one thing about forgetting on the forget set. A *metric* probe scores the
base and the unlearned model (a membership AUC, a truth ratio); an *attack* probe also scores
the unlearned model under an attack (quantized, relearned, prompted differently, read by a
linear probe), so that the audit can say what share of the forgotten knowledge the attack
brings back: ``recovered = (attacked - unlearned) / (base - unlearned)``.

Probes register by name (:func:`register_probe`); :func:`unlearnlens.audit` runs the ones it
is given, or every registered probe whose inputs are there.
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from unlearnlens.audit.memorisation import _chunks
from unlearnlens.errors import ConfigError, UnknownProbeError
from unlearnlens.metrics import accuracy, answer_logprob, answer_prob

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = [
    "KNOWLEDGE_METRICS",
    "AuditData",
    "Probe",
    "ProbeScore",
    "available_probes",
    "get_probe",
    "knowledge",
    "register_probe",
    "unregister_probe",
]

KNOWLEDGE_METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "accuracy": accuracy,
    "answer_logprob": answer_logprob,
    "answer_prob": answer_prob,
}
"""How attack probes measure forget-set knowledge (a mean over prompts)."""

Need = Literal["retain", "holdout", "paraphrases", "perturbed", "sklearn"]


@dataclass(frozen=True)
class AuditData:
    """The prompts and settings every probe reads; :func:`unlearnlens.audit` builds it.

    Attributes:
        forget: The forget questions with their answers.
        retain: Questions the unlearned model should still answer (in-context shots, the
            relearning attack on other facts, linear-probe training rows).
        holdout: Questions with answers neither model was trained on (membership AUCs).
        paraphrases: Other phrasings of the forget questions, with the same answers.
        perturbed: Per forget prompt, the token ids of its wrong answers (truth ratio,
            answer-vs-distractor probes); ``None`` when there are none.
        metric: The name in :data:`KNOWLEDGE_METRICS` attack probes score with.
        batch_size: Most prompts per forward pass (``None``: the engine's default).
        seed: Seed of everything random in a probe (relearning batches, probe fits).
        progress: Show progress bars (``None``: the library-wide switch).
    """

    forget: PromptSet
    retain: PromptSet | None = None
    holdout: PromptSet | None = None
    paraphrases: PromptSet | None = None
    perturbed: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    metric: str = "accuracy"
    batch_size: int | None = None
    seed: int = 0
    progress: bool | None = None

    def has(self, need: Need) -> bool:
        """Whether an input (or, for ``"sklearn"``, the package) a probe needs is there."""
        if need == "sklearn":
            return importlib.util.find_spec("sklearn") is not None
        if need == "perturbed":
            return self.perturbed is not None and any(self.perturbed)
        return getattr(self, need) is not None


@dataclass(frozen=True)
class ProbeScore:
    """What one probe measured for one unlearned model.

    Attributes:
        base: The base model's score.
        unlearned: The unlearned model's score.
        attacked: The attacked unlearned model's score (attack probes; NaN for metrics).
        details: Anything else worth keeping (per-layer scores, settings); JSON values only.
    """

    base: float
    unlearned: float
    attacked: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)


def knowledge(
    model: HookedTransformer, prompts: PromptSet, metric: str, batch_size: int | None = None
) -> float:
    """The mean over prompts of a :data:`KNOWLEDGE_METRICS` score; the model comes back as is."""
    fn = KNOWLEDGE_METRICS[metric]
    values = [fn(z, chunk).float().cpu() for chunk, z in _chunks(model, prompts, batch_size)]
    return float(torch.cat(values).mean())


class Probe(ABC):
    """One audit probe. Subclasses set :attr:`kind` and :attr:`needs` and write :meth:`run`.

    A probe never changes the models it is given (attacks work on copies, under
    :func:`unlearnlens._guard.preserved`, or swap weights back as :func:`unlearnlens.restored`
    does), also when interrupted.
    """

    kind: ClassVar[Literal["metric", "attack"]] = "attack"
    """``"metric"`` (base and unlearned scores) or ``"attack"`` (also an attacked score)."""

    needs: ClassVar[tuple[Need, ...]] = ()
    """Inputs the probe cannot run without."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The probe's row label in the audit table."""

    @abstractmethod
    def describe(self, data: AuditData) -> str:
        """What the score is, in a few words (the table's ``metric`` column)."""

    def check(self, base: HookedTransformer, data: AuditData) -> None:  # noqa: B027
        """Raises before any work if the probe cannot run on these inputs (default: no check)."""

    @abstractmethod
    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Scores the base and the unlearned model (and the attacked unlearned model)."""

    def missing(self, data: AuditData) -> list[str]:
        """The :attr:`needs` that ``data`` lacks."""
        return [n for n in self.needs if not data.has(n)]


_REGISTRY: dict[str, Callable[[], Probe]] = {}


def register_probe(name: str) -> Callable[[Callable[[], Probe]], Callable[[], Probe]]:
    """Registers a probe factory (a class or function taking no arguments) under ``name``.

    Raises:
        ConfigError: The name is taken or not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a probe name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ConfigError(f"a probe named {name!r} is already registered")

    def decorate(factory: Callable[[], Probe]) -> Callable[[], Probe]:
        _REGISTRY[name] = factory
        return factory

    return decorate


def unregister_probe(name: str) -> None:
    """Removes a registered probe.

    Raises:
        UnknownProbeError: No probe of that name.
    """
    get_probe(name)
    del _REGISTRY[name]


def available_probes() -> list[str]:
    """The registered probe names, in registration order."""
    return list(_REGISTRY)


def get_probe(name: str) -> Probe:
    """A new probe of a registered name.

    Raises:
        UnknownProbeError: An unknown name; the message lists the known ones.
    """
    if name not in _REGISTRY:
        raise UnknownProbeError(
            f"unknown probe {name!r}; registered probes: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]()
