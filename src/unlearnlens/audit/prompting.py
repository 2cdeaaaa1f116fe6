"""Prompts the black-box probes ask with: few-shot prefixes, templates, held-out fact splits.

* :func:`few_shot` puts ``shots`` solved retain questions in front of every forget question
  (in-context relearning: Shi et al., 2024; Lynch et al., 2024): a model that only learned to
  refuse a phrasing often answers again once the context shows the task being solved.
* :func:`templated` rewrites the forget prompts with a user's templates (``"{prompt}"`` marks
  where the prompt goes), beside the held-out paraphrases of the toy world.
* :func:`neighbour_answers` finds wrong answers for a question: the answers of questions
  that share its template and differ in a token or two (another subject, same relation).
* :func:`fact_split` splits the forget prompts into two halves by answer, so that a relearning
  attack can train on one half and be scored on facts it never saw.

All three work on token ids, so the answers that are scored are exactly the ones tokenized in
the original :class:`~unlearnlens.PromptSet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from unlearnlens._checks import check_int
from unlearnlens.errors import ConfigError, PromptError
from unlearnlens.prompts import PromptSet

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["fact_split", "few_shot", "neighbour_answers", "templated"]


def _bos(model: HookedTransformer) -> int | None:
    tok = model.tokenizer
    if tok is None or not model.cfg.default_prepend_bos or tok.bos_token_id is None:
        return None
    return int(tok.bos_token_id)


def _seqs(ps: PromptSet) -> tuple[list[list[int]], list[list[int]]]:
    rows = ps.tokens.tolist()
    n = ps.prompt_lengths.tolist()
    m = ps.answer_lengths.tolist()
    return [r[:a] for r, a in zip(rows, n)], [r[a : a + b] for r, a, b in zip(rows, n, m)]


def few_shot(
    model: HookedTransformer, prompts: PromptSet, shots_from: PromptSet, *, shots: int = 3
) -> PromptSet:
    """Each prompt preceded by ``shots`` solved examples (prompt + answer) from ``shots_from``.

    Prompt ``i`` gets the examples ``shots_from[(i * shots + j) % len(shots_from)]``,
    ``j = 0 .. shots-1``, so the shots rotate through the whole set. A leading BOS token (the
    model's convention) is kept once, at the start.

    Raises:
        ConfigError: ``shots`` below 1.
        PromptError: A prompt that no longer fits the model's context.
    """
    shots = check_int(shots, "shots", minimum=1)
    bos = _bos(model)
    p_ids, a_ids = _seqs(prompts)
    sp, sa = _seqs(shots_from)

    def strip(seq: list[int]) -> list[int]:
        return seq[1:] if bos is not None and seq and seq[0] == bos else seq

    examples = [strip(p) + a for p, a in zip(sp, sa)]
    new = []
    for i, p in enumerate(p_ids):
        prefix = [t for j in range(shots) for t in examples[(i * shots + j) % len(examples)]]
        head = [bos] if bos is not None and p and p[0] == bos else []
        new.append(head + prefix + strip(p))
    out = PromptSet.from_tokens(new, a_ids, pad_token_id=prompts.pad_token_id)
    try:
        out.check_fits(model)
    except PromptError as e:
        raise PromptError(f"with {shots} in-context examples a prompt is too long: {e}") from e
    return out


def templated(model: HookedTransformer, prompts: PromptSet, templates: Sequence[str]) -> PromptSet:
    """Every prompt rewritten by every template (``"{prompt}"`` is the original prompt text).

    Args:
        model: The model whose tokenizer tokenizes the rewritten prompts.
        prompts: Prompts built from text (their ``prompts`` strings are rewritten); the
            answers keep their original tokens.
        templates: Format strings with one ``{prompt}`` field each.

    Returns:
        ``len(templates) * len(prompts)`` prompts, template by template.

    Raises:
        ConfigError: No templates, or a template without ``{prompt}``.
        PromptError: Prompts without text, or a model without a tokenizer.
    """
    templates = list(templates)
    if not templates:
        raise ConfigError("templates is empty: give at least one template with '{prompt}'")
    for t in templates:
        if not isinstance(t, str) or "{prompt}" not in t:
            raise ConfigError(f"template {t!r} must be a string with a '{{prompt}}' field")
    if prompts.prompts is None or model.tokenizer is None:
        raise PromptError(
            "templates rewrite prompt text: build the prompts from (prompt, answer) "
            "pairs, with a model that has a tokenizer"
        )
    _, a_ids = _seqs(prompts)
    p_new, a_new = [], []
    for t in templates:
        for text, a in zip(prompts.prompts, a_ids):
            p_new.append(model.to_tokens(t.format(prompt=text), truncate=False)[0].tolist())
            a_new.append(a)
    out = PromptSet.from_tokens(p_new, a_new, pad_token_id=prompts.pad_token_id)
    out.check_fits(model)
    return out


def fact_split(prompts: PromptSet) -> tuple[list[int], list[int]]:
    """Indices of two halves of the prompts that share no answer.

    Prompts are grouped by their answer tokens (the several phrasings of one fact share an
    answer); groups, in order of first appearance, alternate between the halves.

    Returns:
        ``(train, held_out)`` index lists.

    Raises:
        PromptError: Fewer than two distinct answers.
    """
    _, a_ids = _seqs(prompts)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(a_ids):
        groups.setdefault(tuple(a), []).append(i)
    if len(groups) < 2:
        raise PromptError(
            "relearning on held-out facts needs at least two distinct forget answers, to train "
            f"on some and score the others; the forget set has {len(groups)}"
        )
    train, held = [], []
    for g, idx in enumerate(groups.values()):
        (train if g % 2 == 0 else held).extend(idx)
    return sorted(train), sorted(held)


def neighbour_answers(
    prompts: PromptSet, pool: Sequence[PromptSet], *, n: int = 4, max_diff: int = 2
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per prompt, up to ``n`` wrong answers taken from same-template questions.

    A question of ``pool`` is a neighbour of a prompt when both prompts have the same number
    of tokens and differ in at most ``max_diff`` of them (the same question about another
    subject); its answer, if different from the prompt's, is a perturbed answer. Answers
    are kept in order of first appearance, without repeats.

    Returns:
        Per prompt, the answers' token ids (possibly none).
    """
    n = check_int(n, "n", minimum=1)
    max_diff = check_int(max_diff, "max_diff", minimum=0)
    p_ids, a_ids = _seqs(prompts)
    cands: list[tuple[list[int], tuple[int, ...]]] = []
    for ps in pool:
        qs, ans = _seqs(ps)
        cands.extend((q, tuple(a)) for q, a in zip(qs, ans))
    out = []
    for p, a in zip(p_ids, a_ids):
        found: list[tuple[int, ...]] = []
        for q, b in cands:
            if len(found) == n:
                break
            if len(q) != len(p) or b == tuple(a) or b in found:
                continue
            if sum(x != y for x, y in zip(p, q)) <= max_diff:
                found.append(b)
        out.append(tuple(found))
    return tuple(out)
