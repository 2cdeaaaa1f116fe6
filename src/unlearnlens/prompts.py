"""Prompts with answers, tokenized once, and the positions whose logits predict the answers.

A :class:`PromptSet` holds right-padded token sequences ``prompt + answer`` and the lengths of
both parts. Everything else (attention mask, answer tokens, target positions, position masks)
is derived from those lengths, so there is no decode-and-retokenize step anywhere: the answer
tokens that are scored are exactly the tokens that were fed to the model.

For a prompt of ``n`` tokens and an answer of ``m`` tokens, the logits at positions
``n-1 .. n+m-2`` predict the answer tokens; these are the *target positions*.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from unlearnlens._checks import check_int, is_integer
from unlearnlens._finite import check_finite
from unlearnlens.errors import PromptError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "QA_TEMPLATE",
    "PositionKind",
    "PromptSet",
    "Prompts",
    "as_promptset",
    "format_question",
]

QA_TEMPLATE = "Question: {}\n Answer:"
"""The question format of the reference study: ``"Question: {q}\\n Answer:"``."""

PositionKind = Literal["all", "prompt", "answer", "last"]
TokenSeq = Union[Sequence[int], Tensor]


def format_question(question: str, template: str = QA_TEMPLATE) -> str:
    r"""Puts a question into the study's prompt format (``"Question: {q}\\n Answer:"``)."""
    return template.format(question)


def _as_id_list(seq: TokenSeq, what: str, index: int) -> list[int]:
    if isinstance(seq, Tensor):
        if seq.ndim == 2 and seq.shape[0] == 1:
            seq = seq[0]
        if seq.ndim != 1:
            raise PromptError(
                f"{what} {index} must be a 1-D sequence of token ids, got a tensor of shape "
                f"{tuple(seq.shape)}"
            )
        if seq.dtype.is_floating_point or seq.dtype == torch.bool:
            raise PromptError(f"{what} {index} must hold integer token ids, got dtype {seq.dtype}")
        return [int(t) for t in seq.tolist()]
    if isinstance(seq, str):
        raise PromptError(
            f"{what} {index} is a string ({seq!r}); PromptSet.from_tokens takes token ids — use "
            "PromptSet.from_pairs for text"
        )
    if isinstance(seq, np.ndarray):
        if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer):
            raise PromptError(
                f"{what} {index} must be a 1-D array of integer token ids, got shape "
                f"{seq.shape} and dtype {seq.dtype}"
            )
        return [int(t) for t in seq]
    if not isinstance(seq, Sequence) or isinstance(seq, bytes):
        raise PromptError(
            f"{what} {index} must be a sequence of integer token ids, got {type(seq).__name__}"
        )
    ids = []
    for t in seq:
        if not is_integer(t):
            raise PromptError(
                f"{what} {index} holds {t!r} ({type(t).__name__}); token ids must be integers "
                "(a float such as 3.0 or 3.7 is refused, not rounded)"
            )
        if t < 0:
            raise PromptError(f"{what} {index} holds the negative token id {int(t)}")
        ids.append(int(t))
    return ids


@dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts with answers, right-padded, with everything a metric needs.

    Build one with :meth:`from_pairs`, :meth:`from_tokens` or :meth:`from_model_answers`.
    Index it like a sequence (an int, a slice, a list or a tensor of indices) to get a smaller
    ``PromptSet``; iterate over :meth:`batches` for chunks.

    Attributes:
        tokens: ``prompt + answer`` token ids, right-padded with ``pad_token_id``.
        prompt_lengths: Number of prompt tokens of each sequence (BOS included, if any).
        answer_lengths: Number of answer tokens of each sequence (at least one).
        pad_token_id: The id used for padding. Pad positions never influence real positions
            (attention is causal and padding is on the right), and are never scored.
        prompts: The prompt strings, when built from text.
        answers: The answer strings, when built from text.
        tokenizer_fingerprint: A hash of the vocabulary and BOS token of the tokenizer that
            made the ids (see :func:`tokenizer_fingerprint`), or ``None`` for ids given
            directly (:meth:`from_tokens`). A model whose tokenizer has another fingerprint
            reads other tokens from the same ids, so :meth:`check_fits` refuses it.
    """

    tokens: Int[Tensor, "batch seq"]
    prompt_lengths: Int[Tensor, " batch"]
    answer_lengths: Int[Tensor, " batch"]
    pad_token_id: int = 0
    prompts: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None
    tokenizer_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise PromptError(f"tokens must be [batch, seq], got shape {tuple(self.tokens.shape)}")
        n = self.tokens.shape[0]
        if n == 0:
            raise PromptError("a PromptSet needs at least one prompt; got none")
        if self.prompt_lengths.shape != (n,) or self.answer_lengths.shape != (n,):
            raise PromptError(
                f"prompt_lengths {tuple(self.prompt_lengths.shape)} and answer_lengths "
                f"{tuple(self.answer_lengths.shape)} must both have shape ({n},)"
            )
        if bool((self.prompt_lengths < 1).any()):
            raise PromptError("every prompt needs at least one token")
        if bool((self.answer_lengths < 1).any()):
            bad = int(torch.nonzero(self.answer_lengths < 1)[0, 0])
            raise PromptError(f"answer {bad} has no tokens; every answer needs at least one")
        if int(self.seq_lengths.max()) > self.tokens.shape[1]:
            raise PromptError("prompt + answer lengths exceed the width of the token tensor")

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_tokens(
        cls,
        prompt_tokens: Sequence[TokenSeq] | Tensor,
        answer_tokens: Sequence[TokenSeq] | Tensor,
        *,
        pad_token_id: int = 0,
    ) -> PromptSet:
        """Builds a PromptSet from token ids, for models without a tokenizer.

        Args:
            prompt_tokens: One id sequence per prompt (lists, 1-D tensors, or a 2-D tensor of
                equal-length prompts). Include the BOS token yourself if the model expects it.
            answer_tokens: One non-empty id sequence per prompt.
            pad_token_id: Id used for right padding (never scored, never attended to).

        Raises:
            PromptError: Empty inputs, mismatched counts, an empty prompt or answer.
        """
        if isinstance(prompt_tokens, Tensor) and prompt_tokens.ndim == 2:
            prompt_tokens = list(prompt_tokens)
        if isinstance(answer_tokens, Tensor) and answer_tokens.ndim == 2:
            answer_tokens = list(answer_tokens)
        if len(prompt_tokens) == 0:
            raise PromptError("no prompts given: prompt_tokens is empty")
        if len(prompt_tokens) != len(answer_tokens):
            raise PromptError(
                f"got {len(prompt_tokens)} prompts but {len(answer_tokens)} answers; they must "
                "pair up one to one"
            )
        p_ids = [_as_id_list(p, "prompt", i) for i, p in enumerate(prompt_tokens)]
        a_ids = [_as_id_list(a, "answer", i) for i, a in enumerate(answer_tokens)]
        for i, (p, a) in enumerate(zip(p_ids, a_ids)):
            if not p:
                raise PromptError(f"prompt {i} has no tokens")
            if not a:
                raise PromptError(f"answer {i} has no tokens; every answer needs at least one")
        return cls._assemble(p_ids, a_ids, pad_token_id=pad_token_id)

    @classmethod
    def from_pairs(
        cls,
        model: HookedTransformer,
        pairs: Sequence[tuple[str, str]],
        *,
        prepend_bos: bool | None = None,
    ) -> PromptSet:
        """Tokenizes ``(prompt, answer)`` string pairs with the model's tokenizer.

        Each sequence is ``model.to_tokens(prompt)`` (with the model's BOS convention, unless
        ``prepend_bos`` overrides it) followed by ``model.to_tokens(answer,
        prepend_bos=False)``. Answers are tokenized on their own, so write them with the
        leading space the tokenizer expects (``" Paris"``).

        Raises:
            PromptError: No pairs, a model without a tokenizer, a pair that is not two
                strings, an answer that tokenizes to nothing, a sequence longer than ``n_ctx``.
        """
        pairs = list(pairs)
        if not pairs:
            raise PromptError("no prompts given: the list of (prompt, answer) pairs is empty")
        if model.tokenizer is None:
            raise PromptError(
                "this model has no tokenizer, so string prompts cannot be tokenized; attach one "
                "or build the prompts with PromptSet.from_tokens"
            )
        for i, pair in enumerate(pairs):
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(s, str) for s in pair)
            ):
                raise PromptError(
                    f"pair {i} must be a (prompt, answer) tuple of strings, got {pair!r}"
                )
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        p_ids, a_ids = [], []
        for i, (prompt, answer) in enumerate(pairs):
            p = model.to_tokens(prompt, prepend_bos=bos, truncate=False)[0].tolist()
            a = (
                model.to_tokens(answer, prepend_bos=False, truncate=False)[0].tolist()
                if answer
                else []
            )
            if not p:
                raise PromptError(f"prompt {i} ({prompt!r}) tokenizes to nothing")
            if not a:
                raise PromptError(
                    f"answer {i} ({answer!r}) of prompt {prompt!r} tokenizes to nothing; every "
                    "answer needs at least one token"
                )
            p_ids.append(p)
            a_ids.append(a)
        ps = cls._assemble(
            p_ids,
            a_ids,
            pad_token_id=_pad_id(model),
            prompts=tuple(p for p, _ in pairs),
            answers=tuple(a for _, a in pairs),
            tokenizer_fingerprint=tokenizer_fingerprint(model.tokenizer),
        )
        ps.check_fits(model)
        return ps

    @classmethod
    def from_model_answers(
        cls,
        model: HookedTransformer,
        questions: Sequence[str] | Sequence[TokenSeq],
        max_new_tokens: int = 30,
        *,
        prepend_bos: bool | None = None,
    ) -> PromptSet:
        """Uses the model's own greedy continuation of each prompt as its answer.

        This is how the reference study builds its answers: the base model's greedy answer (up
        to ``max_new_tokens`` tokens, stopping at EOS, which is not kept) is what the base and
        the unlearned models are compared on.

        Args:
            model: The model whose answers define the targets (the base model in a study).
            questions: Prompt strings (used as given; see :func:`format_question`) or prompt
                token id sequences.
            max_new_tokens: Longest answer, in tokens.
            prepend_bos: Overrides the model's BOS convention for string prompts.

        Raises:
            PromptError: No questions, strings without a tokenizer, a prompt that leaves no room
                in ``n_ctx``, or a model whose first greedy token is EOS.
        """
        questions = list(questions)
        if not questions:
            raise PromptError("no prompts given: the list of questions is empty")
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1, error=PromptError)
        texts = all(isinstance(q, str) for q in questions)
        if texts and model.tokenizer is None:
            raise PromptError(
                "this model has no tokenizer, so string questions cannot be tokenized; pass "
                "token ids instead"
            )
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if texts:
            p_ids = [
                model.to_tokens(q, prepend_bos=bos, truncate=False)[0].tolist() for q in questions
            ]
        else:
            p_ids = [_as_id_list(q, "question", i) for i, q in enumerate(questions)]
        for i, p in enumerate(p_ids):
            if not p:
                raise PromptError(f"question {i} tokenizes to nothing")
            if len(p) >= model.cfg.n_ctx:
                raise PromptError(
                    f"question {i} has {len(p)} tokens, leaving no room for an answer in the "
                    f"model's context of {model.cfg.n_ctx}"
                )
        eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
        from unlearnlens._generate import greedy_continuations

        check_finite(model)

        a_ids = greedy_continuations(model, p_ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
        for i, a in enumerate(a_ids):
            if not a:
                raise PromptError(
                    f"the model's greedy answer to question {i} is empty (its first token is EOS)"
                )
        answers = (
            tuple(model.tokenizer.decode(a) for a in a_ids) if model.tokenizer is not None else None
        )
        ps = cls._assemble(
            p_ids,
            a_ids,
            pad_token_id=_pad_id(model),
            prompts=tuple(questions) if texts else None,
            answers=answers,
            tokenizer_fingerprint=(
                None if model.tokenizer is None else tokenizer_fingerprint(model.tokenizer)
            ),
        )
        ps.check_fits(model)
        return ps

    @classmethod
    def _assemble(
        cls,
        p_ids: list[list[int]],
        a_ids: list[list[int]],
        *,
        pad_token_id: int,
        prompts: tuple[str, ...] | None = None,
        answers: tuple[str, ...] | None = None,
        tokenizer_fingerprint: str | None = None,
    ) -> PromptSet:
        lengths = [len(p) + len(a) for p, a in zip(p_ids, a_ids)]
        tokens = torch.full((len(p_ids), max(lengths)), pad_token_id, dtype=torch.long)
        for i, (p, a) in enumerate(zip(p_ids, a_ids)):
            tokens[i, : lengths[i]] = torch.tensor(p + a, dtype=torch.long)
        return cls(
            tokens=tokens,
            prompt_lengths=torch.tensor([len(p) for p in p_ids], dtype=torch.long),
            answer_lengths=torch.tensor([len(a) for a in a_ids], dtype=torch.long),
            pad_token_id=pad_token_id,
            prompts=prompts,
            answers=answers,
            tokenizer_fingerprint=tokenizer_fingerprint,
        )

    # ----------------------------------------------------------------------------- derived

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the token tensor."""
        return self.tokens.device

    @property
    def seq_lengths(self) -> Int[Tensor, " batch"]:
        """Real (unpadded) length of each sequence."""
        return self.prompt_lengths + self.answer_lengths

    @property
    def seq_len(self) -> int:
        """Width of the padded token tensor."""
        return self.tokens.shape[1]

    @property
    def max_answer_len(self) -> int:
        """Longest answer, in tokens: the width of the answer axis."""
        return int(self.answer_lengths.max())

    @property
    def attention_mask(self) -> Int[Tensor, "batch seq"]:
        """1 at real tokens, 0 at right padding."""
        pos = torch.arange(self.seq_len, device=self.device)
        return (pos[None, :] < self.seq_lengths[:, None]).long()

    @property
    def answer_mask(self) -> Bool[Tensor, "batch answer"]:
        """True where the answer axis holds a real answer token."""
        j = torch.arange(self.max_answer_len, device=self.device)
        return j[None, :] < self.answer_lengths[:, None]

    @property
    def target_positions(self) -> Int[Tensor, "batch answer"]:
        """Positions whose logits predict the answer tokens: ``n-1 .. n+m-2``.

        Padded answer slots repeat the prompt's last position (a valid index) and are masked by
        :attr:`answer_mask`.
        """
        j = torch.arange(self.max_answer_len, device=self.device)
        pos = self.prompt_lengths[:, None] - 1 + j[None, :]
        return torch.where(self.answer_mask, pos, self.prompt_lengths[:, None] - 1)

    @property
    def answer_tokens(self) -> Int[Tensor, "batch answer"]:
        """The answer token ids on the answer axis (``pad_token_id`` in padded slots)."""
        idx = (self.target_positions + 1).clamp(max=self.seq_len - 1)
        toks = self.tokens.gather(1, idx)
        return torch.where(self.answer_mask, toks, torch.full_like(toks, self.pad_token_id))

    @property
    def last_target_position(self) -> Int[Tensor, " batch"]:
        """The last target position of each sequence (``n+m-2``)."""
        return self.seq_lengths - 2

    def position_mask(self, kind: PositionKind) -> Bool[Tensor, "batch seq"]:
        """Which positions of each sequence a patch at ``kind`` positions touches.

        ``"prompt"`` is the prompt's tokens, ``"answer"`` the answer's tokens, ``"all"`` both,
        ``"last"`` the prompt's last token (the position that predicts the first answer
        token). Padding is never included.
        """
        pos = torch.arange(self.seq_len, device=self.device)[None, :]
        n = self.prompt_lengths[:, None]
        if kind == "all":
            return pos < self.seq_lengths[:, None]
        if kind == "prompt":
            return pos < n
        if kind == "answer":
            return (pos >= n) & (pos < self.seq_lengths[:, None])
        if kind == "last":
            return pos == n - 1
        raise PromptError(
            f"unknown position kind {kind!r}; expected one of 'all', 'prompt', 'answer', 'last'"
        )

    # ----------------------------------------------------------------------------- slicing

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> PromptSet:
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"prompt index {index} out of range for {len(self)} prompts")
            index = [index % len(self)]
        if isinstance(index, slice):
            idx = torch.arange(len(self))[index]
        else:
            idx = torch.as_tensor(index, dtype=torch.long)
            if idx.ndim != 1:
                raise IndexError(
                    f"index a PromptSet with a 1-D index, got shape {tuple(idx.shape)}"
                )
        if idx.numel() == 0:
            raise PromptError("indexing selected no prompts")
        keep = [int(i) for i in idx]

        def pick(strings: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if strings is None else tuple(strings[i] for i in keep)

        idx = idx.to(self.device)
        lengths = self.seq_lengths[idx]
        return PromptSet(
            tokens=self.tokens[idx, : int(lengths.max())],
            prompt_lengths=self.prompt_lengths[idx],
            answer_lengths=self.answer_lengths[idx],
            pad_token_id=self.pad_token_id,
            prompts=pick(self.prompts),
            answers=pick(self.answers),
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )

    def batches(self, batch_size: int) -> Iterator[tuple[slice, PromptSet]]:
        """Yields ``(slice, chunk)`` pairs covering the set in order, each chunk trimmed."""
        batch_size = check_int(batch_size, "batch_size", minimum=1, error=PromptError)
        for start in range(0, len(self), batch_size):
            sl = slice(start, min(start + batch_size, len(self)))
            yield sl, self[sl]

    def to(self, device: torch.device | str) -> PromptSet:
        """The same prompts with their tensors on ``device``."""
        return PromptSet(
            tokens=self.tokens.to(device),
            prompt_lengths=self.prompt_lengths.to(device),
            answer_lengths=self.answer_lengths.to(device),
            pad_token_id=self.pad_token_id,
            prompts=self.prompts,
            answers=self.answers,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )

    def check_fits(self, model: HookedTransformer) -> None:
        """Raises a :class:`PromptError` if the set does not fit ``model``.

        It does not fit when it was tokenized by a tokenizer other than the model's (same ids,
        other tokens), a sequence is longer than ``n_ctx``, or an id is out of vocabulary.
        """
        if self.tokenizer_fingerprint is not None:
            if model.tokenizer is None:
                raise PromptError(
                    "these prompts were tokenized with a tokenizer, and this model has none to "
                    "check they mean the same tokens; build them with PromptSet.from_tokens to "
                    "use bare ids"
                )
            if tokenizer_fingerprint(model.tokenizer) != self.tokenizer_fingerprint:
                name = (
                    getattr(model.tokenizer, "name_or_path", "") or type(model.tokenizer).__name__
                )
                raise PromptError(
                    f"these prompts were tokenized with another tokenizer than this model's "
                    f"({name!r}, {len(model.tokenizer)} tokens): the same ids would be other "
                    "tokens; build the PromptSet with this model"
                )
        longest = int(self.seq_lengths.max())
        if longest > model.cfg.n_ctx:
            i = int(self.seq_lengths.argmax())
            raise PromptError(
                f"sequence {i} has {longest} tokens (prompt {int(self.prompt_lengths[i])} + answer "
                f"{int(self.answer_lengths[i])}), longer than the model's context n_ctx="
                f"{model.cfg.n_ctx}"
            )
        top = int(self.tokens.max())
        if top >= model.cfg.d_vocab or int(self.tokens.min()) < 0:
            raise PromptError(
                f"token id {top} is outside the model's vocabulary of {model.cfg.d_vocab} tokens"
            )

    def __repr__(self) -> str:
        return (
            f"PromptSet({len(self)} prompts, seq_len={self.seq_len}, "
            f"answer tokens {int(self.answer_lengths.min())}..{self.max_answer_len})"
        )


Prompts = Union[PromptSet, Sequence[tuple[str, str]]]
"""What every public function accepts as ``prompts``: a PromptSet or (prompt, answer) pairs."""


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what makes token ids mean tokens: the vocabulary and the BOS token.

    Two tokenizers with the same fingerprint turn the same text into the same ids (the test
    :func:`~unlearnlens.check_compatible` applies to two models); the name a tokenizer was
    loaded from does not enter, so a model and its unlearned copy saved elsewhere agree. The
    hash is cached per tokenizer object (and recomputed if its size changes).
    """
    size = len(tokenizer)
    try:
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    blob = json.dumps([vocab, getattr(tokenizer, "bos_token", None)], ensure_ascii=False)
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[tokenizer] = (size, digest)
    return digest


def _pad_id(model: HookedTransformer) -> int:
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok is not None and tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return 0


def as_promptset(model: HookedTransformer, prompts: Prompts) -> PromptSet:
    """Turns ``prompts`` (a PromptSet or (prompt, answer) pairs) into a PromptSet for ``model``.

    Raises:
        PromptError: Empty prompts, a sequence longer than the model's context, token ids out
            of the model's vocabulary, or any error of :meth:`PromptSet.from_pairs`.
    """
    if isinstance(prompts, PromptSet):
        prompts.check_fits(model)
        return prompts
    if isinstance(prompts, (str, bytes)):
        raise PromptError(
            "prompts must be a PromptSet or a list of (prompt, answer) pairs, got a single string"
        )
    return PromptSet.from_pairs(model, list(prompts))
