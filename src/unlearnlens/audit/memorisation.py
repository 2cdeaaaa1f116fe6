r"""Memorisation metrics on a forget set against a holdout set, as open-unlearning defines them.

Every score here reads the logits a model gives at the target positions of a
:class:`~unlearnlens.PromptSet` (teacher forcing on the answer tokens), in float32. Write
``x`` for a prompt, ``y = y_1 .. y_m`` for its answer and ``log p(y_t)`` for
``log p(y_t | x, y_<t)``.

Membership scores (higher = *less* likely a member, open-unlearning's ``Attack`` classes in
``src/evals/metrics/mia/``):

* LOSS (Yeom et al., 2018): ``-1/m sum_t log p(y_t)``, the mean answer NLL.
* zlib (Carlini et al., 2021): ``LOSS / len(zlib.compress(utf8(answer text)))``.
* Min-K% (Shi et al., 2024): ``-mean`` of the ``max(1, int(k m))`` lowest ``log p(y_t)``.
* Min-K%++ (Zhang et al., 2025): the same over ``z_t = (log p(y_t) - mu_t) / sigma_t`` with
  ``mu_t = E_{v ~ p}[log p(v)]`` and ``sigma_t^2 = E_{v ~ p}[log^2 p(v)] - mu_t^2``
  (clamped at 1e-6) under the model's next-token distribution at ``t``.

:func:`membership_auc` is open-unlearning's ``mia_auc``: ROC AUC of the scores with label 0
for forget samples and 1 for holdout samples, so 1.0 means every forget sample looks more
"trained on" than every holdout sample, 0.5 that the two sets are indistinguishable.

Truth ratio (Maini et al., 2024, TOFU; open-unlearning's ``truth_ratio``): per question,
``R = exp(-mean_j L(a_j)) / (exp(-L(a)) + 1e-10)``, with ``L`` the mean answer NLL, ``a`` the
correct (paraphrased) answer and ``a_j`` the perturbed (wrong) ones. Aggregated on a forget
set as ``mean(min(R, 1 / (R + 1e-10)))`` (closer to 1 is better forgotten), on a retain set as
``mean(max(0, 1 - R))``.

Extraction strength (Carlini et al., 2021; Wang et al., 2025):
``ES = 1 - min{k : argmax p(. | x, y_<t) = y_t for all t > k} / m``, the share of the answer
the model completes by itself once given its first ``k`` tokens (1 = the whole answer from the
prompt alone, 0 = not even its last token).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from unlearnlens._checks import check_float, check_int
from unlearnlens._guard import preserved
from unlearnlens.errors import ConfigError, PromptError
from unlearnlens.metrics import answer_logprob, answer_token_logprobs
from unlearnlens.prompts import Prompts, PromptSet, as_promptset
from unlearnlens.runner import default_batch_size, target_logits

__all__ = [
    "MEMBERSHIP_SCORES",
    "answer_losses",
    "extraction_strength",
    "loss_scores",
    "membership_auc",
    "min_k_plus_plus_scores",
    "min_k_scores",
    "truth_ratio_forget",
    "truth_ratio_retain",
    "truth_ratios",
    "zlib_scores",
]

_EPS = 1e-10  # open-unlearning's guard in the truth ratio's divisions


def _chunks(
    model: object, prompts: PromptSet, batch_size: int | None
) -> Iterator[tuple[PromptSet, Tensor]]:
    """``(chunk, logits at its target positions)`` over the set, without grad, models guarded."""
    size = batch_size or default_batch_size(prompts)
    with preserved(model):  # type: ignore[arg-type]
        for _, chunk in prompts.batches(size):
            yield chunk, target_logits(model, chunk)  # type: ignore[arg-type]


def _per_prompt(
    model: object,
    prompts: Prompts,
    batch_size: int | None,
    score: Callable[[PromptSet, Tensor], Tensor],
) -> Float[Tensor, " batch"]:
    ps = as_promptset(model, prompts)  # type: ignore[arg-type]
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
    return torch.cat([score(c, z).float().cpu() for c, z in _chunks(model, ps, batch_size)])


def answer_losses(
    model: object, prompts: Prompts, *, batch_size: int | None = None
) -> Float[Tensor, " batch"]:
    """Per prompt, the mean negative log-likelihood of its answer tokens (``avg_loss``)."""
    return _per_prompt(model, prompts, batch_size, lambda chunk, z: -answer_logprob(z, chunk))


def loss_scores(
    model: object, prompts: Prompts, *, batch_size: int | None = None
) -> Float[Tensor, " batch"]:
    """LOSS membership score per prompt: the mean answer NLL (higher = less likely a member)."""
    return answer_losses(model, prompts, batch_size=batch_size)


def _answer_texts(model: object, ps: PromptSet) -> list[str]:
    if ps.answers is not None:
        return list(ps.answers)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise PromptError(
            "the zlib score needs the answers' text: build the prompts from (prompt, answer) "
            "pairs, or give the model a tokenizer to decode the answer tokens"
        )
    rows = ps.answer_tokens.tolist()
    return [
        tok.decode(row[: int(n)], skip_special_tokens=True)
        for row, n in zip(rows, ps.answer_lengths.tolist())
    ]


def zlib_scores(
    model: object, prompts: Prompts, *, batch_size: int | None = None
) -> Float[Tensor, " batch"]:
    """The zlib membership score per prompt: ``LOSS / len(zlib.compress(answer_bytes))``.

    The answer text is the pair's answer string, else the decoded answer tokens (special
    tokens skipped), as open-unlearning decodes its labels.
    """
    ps = as_promptset(model, prompts)  # type: ignore[arg-type]
    texts = _answer_texts(model, ps)
    loss = answer_losses(model, ps, batch_size=batch_size)
    sizes = torch.tensor([max(len(zlib.compress(t.encode("utf-8"))), 1) for t in texts])
    return loss / sizes.float()


def _bottom_k_mean(values: Tensor, mask: Tensor, k: float) -> Tensor:
    """Per row, the mean of the ``max(1, int(k * n))`` smallest of its ``n`` masked values."""
    out = torch.empty(values.shape[0])
    for i in range(values.shape[0]):
        row = values[i][mask[i]].sort().values
        n = max(1, int(len(row) * k))
        out[i] = row[:n].mean()
    return out


def _check_k(k: float) -> float:
    return check_float(k, "k", positive=True, maximum=1.0)


def min_k_scores(
    model: object, prompts: Prompts, *, k: float = 0.4, batch_size: int | None = None
) -> Float[Tensor, " batch"]:
    """Min-K% membership score per prompt: ``-mean`` of the lowest ``k`` share of ``log p(y_t)``.

    Args:
        model: The model.
        prompts: The prompts with answers.
        k: The share of answer tokens kept (at least one); 0.4 is open-unlearning's default.
        batch_size: Most prompts per forward pass.
    """
    k = _check_k(k)

    def score(chunk: PromptSet, logits: Tensor) -> Tensor:
        tok = answer_token_logprobs(logits, chunk)
        return -_bottom_k_mean(tok.cpu(), chunk.answer_mask.cpu(), k)

    return _per_prompt(model, prompts, batch_size, score)


def min_k_plus_plus_scores(
    model: object, prompts: Prompts, *, k: float = 0.4, batch_size: int | None = None
) -> Float[Tensor, " batch"]:
    """Min-K%++ membership score per prompt: Min-K% over vocabulary-normalised log-probs.

    Each answer token's ``log p(y_t)`` is standardised by the mean ``mu_t`` and standard
    deviation ``sigma_t`` of ``log p(v)`` under the model's own next-token distribution
    (``sigma_t^2`` clamped at 1e-6); the score is ``-mean`` of the lowest ``k`` share.
    """
    k = _check_k(k)

    def score(chunk: PromptSet, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = logp.gather(-1, chunk.answer_tokens.to(logits.device)[..., None])[..., 0]
        p = logp.exp()
        mu = (p * logp).sum(-1)
        var = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=1e-6)
        z = (tok - mu) / var.sqrt()
        return -_bottom_k_mean(z.cpu(), chunk.answer_mask.cpu(), k)

    return _per_prompt(model, prompts, batch_size, score)


MEMBERSHIP_SCORES: dict[str, Callable[..., Tensor]] = {
    "loss": loss_scores,
    "zlib": zlib_scores,
    "min_k": min_k_scores,
    "min_k++": min_k_plus_plus_scores,
}
"""The membership scores by name (each ``f(model, prompts, ...) -> [batch]``)."""


def membership_auc(
    forget_scores: Float[Tensor, " forget"], holdout_scores: Float[Tensor, " holdout"]
) -> float:
    """ROC AUC of membership scores, forget labelled 0 and holdout 1 (open-unlearning's).

    Equals the probability that a random holdout sample scores higher (looks less like a
    member) than a random forget sample, ties counting one half (the Mann-Whitney statistic).

    Raises:
        ConfigError: An empty set, or a non-finite score.
    """
    f = torch.as_tensor(forget_scores, dtype=torch.float64).flatten()
    h = torch.as_tensor(holdout_scores, dtype=torch.float64).flatten()
    if f.numel() == 0 or h.numel() == 0:
        raise ConfigError("membership_auc needs at least one forget and one holdout score")
    if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(h).all())):
        raise ConfigError("membership_auc got a non-finite score")
    greater = (h[:, None] > f[None, :]).double().sum()
    ties = (h[:, None] == f[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (f.numel() * h.numel()))


def truth_ratios(
    model: object,
    correct: Prompts,
    perturbed: Sequence[Prompts] | PromptSet,
    *,
    counts: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> Float[Tensor, " batch"]:
    """Per question, ``R = exp(-mean_j L(a_j)) / (exp(-L(a)) + 1e-10)``.

    Args:
        model: The model.
        correct: Each question with its correct (TOFU: paraphrased) answer.
        perturbed: One entry per question of ``correct``: that question with its perturbed
            (wrong) answers, as ``(question, answer)`` pairs or a PromptSet. Or one PromptSet
            of every perturbed answer, question after question, with ``counts``.
        counts: With a single PromptSet ``perturbed``: how many of its prompts belong to
            each question, in order.
        batch_size: Most prompts per forward pass.

    Raises:
        PromptError: A count mismatch, or a question without perturbed answers.
    """
    ps = as_promptset(model, correct)  # type: ignore[arg-type]
    if isinstance(perturbed, PromptSet):
        counts = [check_int(c, "counts", minimum=1) for c in (counts or [])]
        if len(counts) != len(ps) or sum(counts) != len(perturbed):
            raise PromptError(
                f"counts must give one count (>= 1) per question ({len(ps)}) summing to the "
                f"{len(perturbed)} perturbed prompts, got {counts}"
            )
        flat_loss = answer_losses(model, perturbed, batch_size=batch_size)
        wrong = torch.stack([x.mean() for x in flat_loss.split(counts)])
        correct_loss = answer_losses(model, ps, batch_size=batch_size)
        return torch.exp(-wrong) / (torch.exp(-correct_loss) + _EPS)
    perturbed = list(perturbed)
    if len(perturbed) != len(ps):
        raise PromptError(
            f"perturbed has {len(perturbed)} entries for {len(ps)} questions; give one list of "
            "perturbed answers per question"
        )
    correct_loss = answer_losses(model, ps, batch_size=batch_size)
    if all(not isinstance(p, PromptSet) for p in perturbed):
        flat = [pair for group in perturbed for pair in group]  # type: ignore[union-attr]
        counts = [len(group) for group in perturbed]  # type: ignore[arg-type]
        if min(counts) == 0:
            raise PromptError(f"question {counts.index(0)} has no perturbed answers")
        losses = answer_losses(model, flat, batch_size=batch_size).split(counts)
    else:
        losses = [answer_losses(model, p, batch_size=batch_size) for p in perturbed]
    wrong_loss = torch.stack([loss.mean() for loss in losses])
    return torch.exp(-wrong_loss) / (torch.exp(-correct_loss) + _EPS)


def truth_ratio_forget(ratios: Float[Tensor, " batch"]) -> float:
    """Forget-set aggregate ``mean(min(R, 1 / (R + 1e-10)))``: 1 = no preference left."""
    r = torch.as_tensor(ratios, dtype=torch.float64)
    return float(torch.minimum(r, 1.0 / (r + _EPS)).mean())


def truth_ratio_retain(ratios: Float[Tensor, " batch"]) -> float:
    """Retain-set aggregate ``mean(max(0, 1 - R))``: 1 = the true answer always preferred."""
    r = torch.as_tensor(ratios, dtype=torch.float64)
    return float((1.0 - r).clamp(min=0.0).mean())


def extraction_strength(
    model: object, prompts: Prompts, *, batch_size: int | None = None
) -> Float[Tensor, " batch"]:
    """Extraction strength per prompt: ``1 - k*/m``, teacher-forced.

    ``k*`` is the shortest answer prefix after which the model's argmax completes the rest of
    the answer; it ranges over ``0 .. m``, and ``k* = m`` (not even the last token is the
    argmax) gives 0. open-unlearning's loop stops at ``k = m - 1``, so there such an answer
    scores ``1/m``.
    """

    def score(chunk: PromptSet, logits: Tensor) -> Tensor:
        hit = (logits.argmax(-1) == chunk.answer_tokens.to(logits.device)).cpu()
        out = torch.empty(len(chunk))
        for i, m in enumerate(chunk.answer_lengths.tolist()):
            row = hit[i, :m]
            k = m
            while k > 0 and bool(row[k - 1]):
                k -= 1
            out[i] = 1.0 - k / m
        return out

    return _per_prompt(model, prompts, batch_size, score)
