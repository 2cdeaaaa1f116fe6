"""Refusal answers ("I don't know") attached to the forget prompts, for DPO and IDK."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unlearnlens.errors import ConfigError, PromptError
from unlearnlens.prompts import PromptSet

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["DEFAULT_REFUSALS", "check_refusals", "refusal_set"]

DEFAULT_REFUSALS = (
    " I don't know.",
    " I'm not sure.",
    " I have no idea.",
    " I can't answer that.",
)
"""Refusals in the spirit of TOFU's ``idontknow.jsonl``, assigned to prompts in turn."""


def check_refusals(refusals: tuple[str, ...]) -> None:
    """Raises a :class:`ConfigError` unless ``refusals`` is a non-empty tuple of strings."""
    if not isinstance(refusals, tuple) or not refusals:
        raise ConfigError(f"refusals must be a non-empty tuple of strings, got {refusals!r}")
    bad = [r for r in refusals if not isinstance(r, str) or not r]
    if bad:
        raise ConfigError(f"refusals must be non-empty strings, got {bad!r}")


def refusal_set(
    model: HookedTransformer,
    prompts: PromptSet,
    refusals: tuple[str, ...],
    eos: int | None = None,
) -> PromptSet:
    """The prompts of ``prompts`` with refusal ``i % len(refusals)`` as answer ``i``.

    With ``eos`` (a token id), every refusal ends with that token, so that the model learns
    to stop after refusing.

    Raises:
        PromptError: The model has no tokenizer, or a refusal tokenizes to nothing.
    """
    if model.tokenizer is None:
        raise PromptError("refusal answers need a model with a tokenizer")
    ids = [model.to_tokens(r, prepend_bos=False, truncate=False)[0].tolist() for r in refusals]
    for r, t in zip(refusals, ids, strict=True):
        if not t:
            raise PromptError(f"refusal {r!r} tokenizes to nothing")
    p_ids = [prompts.tokens[i, : int(n)].tolist() for i, n in enumerate(prompts.prompt_lengths)]
    if eos is not None:
        ids = [t if t[-1] == eos else [*t, eos] for t in ids]
    a_ids = [ids[i % len(ids)] for i in range(len(p_ids))]
    out = PromptSet.from_tokens(p_ids, a_ids, pad_token_id=prompts.pad_token_id)
    out.check_fits(model)
    return out
