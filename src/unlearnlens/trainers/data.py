"""Training data: question/answer pairs or plain texts as PromptSets, and the batch order.

Pairs (or a :class:`~unlearnlens.PromptSet`) are trained on their answer tokens only. Plain
texts are tokenized, cut into chunks of ``max_length`` tokens, and each chunk becomes a
PromptSet entry whose "prompt" is its first token and whose "answer" is the rest, so the
answer-token loss of a chunk is its full-sequence language-model loss (the study's Wikipedia
chunks).

The batch order is a pure function of ``(seed, step)``: epoch ``e`` visits the examples in a
permutation drawn from ``seed`` and ``e``. A run resumed at any step therefore sees the same
batches as an uninterrupted one, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from unlearnlens.errors import PromptError
from unlearnlens.prompts import PromptSet, as_promptset

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["TrainSet", "as_train_set", "batch_indices", "chunk_texts", "eos_id", "with_eos"]

TrainSet = PromptSet | Sequence[tuple[str, str]] | Sequence[str]
"""A forget or retain set: a PromptSet, ``(question, answer)`` pairs, or plain texts."""


def chunk_texts(model: HookedTransformer, texts: Sequence[str], max_length: int) -> PromptSet:
    """Tokenizes texts and cuts them into chunks of at most ``max_length`` tokens.

    Each chunk starts with BOS when the model prepends one, and is stored as prompt = its
    first token, answer = the rest; chunks shorter than 2 tokens are dropped.

    Raises:
        PromptError: No tokenizer, a non-string entry, or texts too short to give any chunk.
    """
    if model.tokenizer is None:
        raise PromptError(
            "plain texts need a model with a tokenizer; build a PromptSet with "
            "PromptSet.from_tokens instead"
        )
    length = min(max_length, model.cfg.n_ctx)
    bos = model.cfg.default_prepend_bos and model.tokenizer.bos_token_id is not None
    body = length - 1 if bos else length
    prompts: list[list[int]] = []
    answers: list[list[int]] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise PromptError(f"text {i} is {type(text).__name__}, expected a string")
        ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist() if text else []
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if bos:
                chunk = [int(model.tokenizer.bos_token_id), *chunk]
            if len(chunk) >= 2:
                prompts.append(chunk[:1])
                answers.append(chunk[1:])
    if not prompts:
        raise PromptError("the texts give no chunk of at least 2 tokens to train on")
    from unlearnlens.prompts import _pad_id

    return PromptSet.from_tokens(prompts, answers, pad_token_id=_pad_id(model))


def eos_id(model: HookedTransformer) -> int | None:
    """The tokenizer's end-of-sequence id, or ``None`` without a tokenizer or EOS token."""
    tok = model.tokenizer
    if tok is None or tok.eos_token_id is None:
        return None
    return int(tok.eos_token_id)


def with_eos(prompts: PromptSet, eos: int) -> PromptSet:
    """``prompts`` with token ``eos`` appended to every answer that does not end with it."""
    p_ids, a_ids = [], []
    for i in range(len(prompts)):
        n, m = int(prompts.prompt_lengths[i]), int(prompts.answer_lengths[i])
        row = prompts.tokens[i].tolist()
        answer = row[n : n + m]
        p_ids.append(row[:n])
        a_ids.append(answer if answer[-1] == eos else [*answer, eos])
    out = PromptSet.from_tokens(p_ids, a_ids, pad_token_id=prompts.pad_token_id)
    return replace(out, prompts=prompts.prompts, answers=prompts.answers)


def as_train_set(
    model: HookedTransformer,
    data: TrainSet,
    *,
    max_length: int,
    what: str,
    eos: int | None = None,
) -> PromptSet:
    """A forget or retain set as a PromptSet on the CPU.

    Args:
        model: The model to tokenize for.
        data: A PromptSet, ``(question, answer)`` pairs, or plain texts.
        max_length: Chunk length for plain texts.
        what: ``"forget"`` or ``"retain"``, for error messages.
        eos: A token id to end every answer with (pairs and PromptSets only; plain-text
            chunks are pieces of documents and get none).

    Raises:
        PromptError: An empty set, a single string, mixed pairs and texts, or any error of
            :meth:`PromptSet.from_pairs`.
    """
    if isinstance(data, PromptSet):
        data.check_fits(model)
        out = data.to("cpu")
        return out if eos is None else _fits(model, with_eos(out, eos), what)
    if isinstance(data, (str, bytes)):
        raise PromptError(
            f"the {what} set is a single string; pass a list of texts, of (question, answer) "
            "pairs, or a PromptSet"
        )
    items = list(data)
    if not items:
        raise PromptError(f"the {what} set is empty: there is nothing to train on")
    if all(isinstance(x, str) for x in items):
        return chunk_texts(model, items, max_length)
    if any(isinstance(x, str) for x in items):
        raise PromptError(f"the {what} set mixes plain texts and (question, answer) pairs")
    try:
        out = as_promptset(model, items).to("cpu")
    except PromptError as e:
        raise PromptError(f"bad {what} set: {e}") from e
    return out if eos is None else _fits(model, with_eos(out, eos), what)


def _fits(model: HookedTransformer, prompts: PromptSet, what: str) -> PromptSet:
    try:
        prompts.check_fits(model)
    except PromptError as e:
        raise PromptError(f"the {what} set with an end-of-sequence token: {e}") from e
    return prompts


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Int[Tensor, " batch"]:
    """Indices of the examples used at ``step``: epoch-wise permutations drawn from ``seed``.

    Every epoch visits all ``n`` examples once, in ``ceil(n / batch_size)`` batches (the last
    one smaller when ``batch_size`` does not divide ``n``).
    """
    per_epoch = -(-n // batch_size)
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[k * batch_size : (k + 1) * batch_size]
