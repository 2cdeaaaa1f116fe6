"""Scores computed from the logits at the target positions, always in float32.

Every metric here reads ``logits: Float[Tensor, "batch answer d_vocab"]``, the logits at the
target positions of a :class:`~unlearnlens.prompts.PromptSet` (padded along the answer axis;
``prompts.answer_mask`` says which slots are real), and returns one score per prompt. Sweeps
report the mean over prompts.

A custom metric is any callable with the same signature (see :class:`Metric`).

Knowledge Recovery Score (Hong et al., 2024)::

    KRS = 1 - mse(z_source, z_x) / mse(z_source, z_target)

with the mean squared error over target positions x vocabulary of raw logits, per prompt.
KRS is 0 for the unpatched target and 1 for the source. ``recovery`` is the same idea on
answer log-probabilities, computed on means over prompts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from unlearnlens.errors import MetricError

if TYPE_CHECKING:
    from unlearnlens.prompts import PromptSet

__all__ = [
    "METRICS",
    "BoundMetric",
    "Metric",
    "MetricLike",
    "accuracy",
    "answer_logprob",
    "answer_prob",
    "answer_token_logprobs",
    "krs",
    "krs_denominator",
    "recovery",
    "resolve_metric",
]


@runtime_checkable
class Metric(Protocol):
    """A per-prompt score of the logits at the target positions.

    Args:
        logits: ``[batch, answer, d_vocab]`` logits at the target positions.
        prompts: The PromptSet they belong to (answer tokens, answer mask, strings).

    Returns:
        ``[batch]``: one score per prompt. Sweeps average it over prompts.
    """

    def __call__(
        self, logits: Float[Tensor, "batch answer d_vocab"], prompts: PromptSet
    ) -> Float[Tensor, " batch"]:
        """Scores each prompt from its target-position logits."""
        ...


MetricLike = Union[str, Metric, Callable[..., Tensor]]
"""What ``metric=`` accepts: a name from :data:`METRICS` or a :class:`Metric` callable."""


def answer_token_logprobs(
    logits: Float[Tensor, "batch answer d_vocab"], prompts: PromptSet
) -> Float[Tensor, "batch answer"]:
    """Log-probability of each answer token (0 in padded answer slots), in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    toks = prompts.answer_tokens.to(logits.device)
    tok_logp = logp.gather(-1, toks[..., None])[..., 0]
    return tok_logp * prompts.answer_mask.to(logits.device)


def _mean_over_answer(values: Tensor, prompts: PromptSet) -> Tensor:
    mask = prompts.answer_mask.to(values.device)
    return (values * mask).sum(-1) / mask.sum(-1)


def answer_logprob(
    logits: Float[Tensor, "batch answer d_vocab"], prompts: PromptSet
) -> Float[Tensor, " batch"]:
    """Per prompt, the mean over its answer tokens of ``log p(answer token)``."""
    return _mean_over_answer(answer_token_logprobs(logits, prompts), prompts)


def answer_prob(
    logits: Float[Tensor, "batch answer d_vocab"], prompts: PromptSet
) -> Float[Tensor, " batch"]:
    """Per prompt, the mean over its answer tokens of ``p(answer token)``."""
    return _mean_over_answer(answer_token_logprobs(logits, prompts).exp(), prompts)


def accuracy(
    logits: Float[Tensor, "batch answer d_vocab"], prompts: PromptSet
) -> Float[Tensor, " batch"]:
    """1.0 for a prompt whose argmax at every target position is the answer token, else 0.0."""
    mask = prompts.answer_mask.to(logits.device)
    hit = logits.argmax(-1) == prompts.answer_tokens.to(logits.device)
    return (hit | ~mask).all(-1).float()


def _mse_per_prompt(a: Tensor, b: Tensor, prompts: PromptSet) -> Tensor:
    mask = prompts.answer_mask.to(a.device)
    sq = (a.float() - b.float()).pow(2).mean(-1)  # over vocabulary
    return (sq * mask).sum(-1) / mask.sum(-1)  # over the prompt's target positions


def krs_denominator(
    source_logits: Float[Tensor, "batch answer d_vocab"],
    target_logits: Float[Tensor, "batch answer d_vocab"],
    prompts: PromptSet,
) -> Float[Tensor, " batch"]:
    """``mse(z_source, z_target)`` per prompt: how far apart the two models are to begin with."""
    return _mse_per_prompt(source_logits, target_logits, prompts)


def _degenerate(denominator: Tensor, source_logits: Tensor, prompts: PromptSet) -> Tensor:
    """Prompts whose source and target logits are (numerically) the same."""
    scale = _mse_per_prompt(source_logits, torch.zeros_like(source_logits), prompts)
    return denominator <= 1e-12 * (1.0 + scale)


def krs(
    logits: Float[Tensor, "batch answer d_vocab"],
    prompts: PromptSet,
    *,
    source_logits: Float[Tensor, "batch answer d_vocab"],
    target_logits: Float[Tensor, "batch answer d_vocab"],
) -> Float[Tensor, " batch"]:
    """Knowledge Recovery Score per prompt: ``1 - mse(z_s, z_x) / mse(z_s, z_t)``.

    Prompts where the source and target logits agree (``mse(z_s, z_t)`` ~ 0) have no defined
    score and get NaN; sweeps leave them out of the mean with a warning.
    """
    den = krs_denominator(source_logits, target_logits, prompts)
    num = _mse_per_prompt(source_logits, logits, prompts)
    out = 1.0 - num / den
    return torch.where(_degenerate(den, source_logits, prompts), torch.nan, out)


def recovery(patched: float, *, source: float, target: float) -> float:
    """``(m_x - m_target) / (m_source - m_target)`` on mean answer log-probabilities.

    0 means no change from the unlearned (target) model, 1 means the source model's level.
    """
    if source == target:
        raise MetricError(
            "recovery is undefined: source and target have the same mean answer log-prob "
            f"({source:.6g})"
        )
    return (patched - target) / (source - target)


METRICS: dict[str, Callable[..., Tensor]] = {
    "answer_logprob": answer_logprob,
    "answer_prob": answer_prob,
    "accuracy": accuracy,
    "krs": krs,
    "recovery": answer_logprob,
}
"""The built-in metrics by name (``recovery`` scores prompts by answer log-prob)."""


@dataclass(frozen=True)
class BoundMetric:
    """A metric ready for a sweep: per-prompt scores, then an aggregate over prompts.

    Attributes:
        name: The metric's name (a custom callable's ``__name__``).
        score: ``score(logits, prompts, source_logits, target_logits) -> [batch]``.
        uses_references: Whether ``score`` reads the source and target logits (KRS).
        normalized: Whether the aggregate is mapped so that target = 0 and source = 1
            (``recovery``).
    """

    name: str
    score: Callable[[Tensor, PromptSet, Tensor, Tensor], Tensor]
    uses_references: bool = False
    normalized: bool = False

    def __call__(  # noqa: D102  (scores, then checks the shape)
        self, logits: Tensor, prompts: PromptSet, source_logits: Tensor, target_logits: Tensor
    ) -> Float[Tensor, " batch"]:
        out = self.score(logits, prompts, source_logits, target_logits)
        if not isinstance(out, Tensor):
            raise MetricError(
                f"metric {self.name!r} returned {type(out).__name__}; it must return a tensor of "
                f"shape [batch] = ({len(prompts)},)"
            )
        if out.shape != (len(prompts),):
            raise MetricError(
                f"metric {self.name!r} returned shape {tuple(out.shape)}; it must return one "
                f"score per prompt, shape [batch] = ({len(prompts)},)"
            )
        return out.float()

    def aggregate(
        self,
        per_prompt: Float[Tensor, "... batch"],
        *,
        baseline: float | None = None,
        reference: float | None = None,
    ) -> Float[Tensor, "..."]:
        """Mean over prompts (NaN-skipping), then ``recovery``'s normalisation if it has one."""
        mean = per_prompt.nanmean(-1)
        if self.normalized:
            if baseline is None or reference is None:
                raise MetricError(f"metric {self.name!r} needs the baseline and reference scores")
            if baseline == reference:
                raise MetricError(
                    f"metric {self.name!r} is undefined: source and target score the same "
                    f"({baseline:.6g})"
                )
            mean = (mean - baseline) / (reference - baseline)
        return mean

    def check_references(
        self, source_logits: Tensor, target_logits: Tensor, prompts: PromptSet
    ) -> Tensor:
        """For KRS: the prompts left out (source = target); raises if that is all of them."""
        if not self.uses_references:
            return torch.zeros(len(prompts), dtype=torch.bool)
        den = krs_denominator(source_logits, target_logits, prompts)
        bad = _degenerate(den, source_logits, prompts).cpu()
        if bool(bad.all()):
            raise ValueError(
                "KRS is undefined for every prompt: the source and target models give the same "
                "logits at all target positions (mse(z_source, z_target) = 0)"
            )
        if bool(bad.any()):
            warnings.warn(
                f"KRS leaves out {int(bad.sum())} of {len(prompts)} prompts whose source and "
                f"target logits agree (prompt indices {bad.nonzero()[:, 0].tolist()[:10]})",
                stacklevel=3,
            )
        return bad


def resolve_metric(metric: object) -> BoundMetric:
    """Turns a metric name or a custom callable into a :class:`BoundMetric`.

    Raises:
        MetricError: An unknown name (the message lists the known ones) or a non-callable.
    """
    if isinstance(metric, str):
        if metric not in METRICS:
            raise MetricError(f"unknown metric {metric!r}; known metrics: {sorted(METRICS)}")
        if metric == "krs":
            return BoundMetric(
                "krs",
                lambda z, p, zs, zt: krs(z, p, source_logits=zs, target_logits=zt),
                uses_references=True,
            )
        fn = METRICS[metric]
        return BoundMetric(metric, lambda z, p, zs, zt: fn(z, p), normalized=metric == "recovery")
    if isinstance(metric, BoundMetric):
        return metric
    if callable(metric):
        name = getattr(metric, "__name__", type(metric).__name__)
        return BoundMetric(name, lambda z, p, zs, zt: metric(z, p))
    raise MetricError(
        f"metric must be a name ({sorted(METRICS)}) or a callable(logits, prompts) -> [batch], "
        f"got {type(metric).__name__}"
    )
