"""Score the unlearned model as it is now: the building block of a custom restoration study.

A study built by hand changes the unlearned model (inside :func:`unlearnlens.restored`, after
:func:`unlearnlens.restore_`, or by the user's own edit) and asks how much of the base model's
output came back. :func:`score` answers with one number, reading the logits at the target
positions itself, with the same metrics as the sweeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from unlearnlens._checks import check_batch_size
from unlearnlens._guard import preserved
from unlearnlens._progress import bar
from unlearnlens._roles import check_models
from unlearnlens.errors import MetricError
from unlearnlens.metrics import MetricLike, resolve_metric
from unlearnlens.prompts import Prompts
from unlearnlens.runner import default_batch_size, target_logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["score"]


def _active_originals(model: HookedTransformer) -> list[tuple[nn.Parameter, Tensor]]:
    """The model's own values of every weight swapped by restorations active in it now."""
    from unlearnlens.restoration import _ACTIVE

    seen: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for restoration in _ACTIVE.get(model, []):  # in entry order: the first save is the original
        for param, value in restoration.originals():
            seen.setdefault(id(param), (param, value))
    return list(seen.values())


@contextmanager
def _swapped_back(originals: list[tuple[nn.Parameter, Tensor]]) -> Iterator[None]:
    """Puts the originals in for the block, and the restored values back after, whatever ends it."""
    from unlearnlens.restoration import _put_back

    current: list[tuple[nn.Parameter, Tensor]] = []
    try:
        with torch.no_grad():
            for param, value in originals:
                current.append((param, param.detach().clone()))
                param.copy_(value)
        yield
    finally:
        _put_back(current)


def score(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    metric: MetricLike = "krs",
    original: HookedTransformer | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> float:
    """The unlearned model's score as it is now, against the base model.

    ``with ul.restored(base, unlearned, layers=[-2, -1], components="mlp"):
    ul.score(base, unlearned, prompts)`` is the KRS of that restoration: the logits at the
    target positions of the changed model, compared with the base model's and with the
    unlearned model's own. KRS (and ``recovery``) need the unlearned model *before* the
    change: inside :func:`~unlearnlens.restored` blocks it is read from the restorations
    themselves (the weights they saved); after :func:`~unlearnlens.restore_` or an edit of
    your own, pass the model before the change as ``original``.

    Args:
        base: The source model (the reference the score compares with).
        unlearned: The target model, scored as it is now.
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        metric: ``"krs"`` (default), ``"answer_logprob"``, ``"answer_prob"``, ``"accuracy"``,
            ``"recovery"``, or a callable ``(logits, prompts) -> [batch]``.
        original: The unlearned model before the change. ``None``: the unlearned model with
            the weights of every restoration active in it now put back.
        batch_size: Most prompts per forward pass.
        progress: Show a progress bar (``None``: the library-wide setting).

    Returns:
        The metric, aggregated over prompts as the sweeps aggregate it (KRS: 0 = the
        unlearned model before the change, 1 = the base model's output).

    Raises:
        MetricError: An unknown metric; or KRS/recovery with nothing to compare with (no
            ``original`` and no active restoration in ``unlearned``).
        IncompatibleModelsError: The models differ in architecture or tokenizer.
        PromptError: Bad prompts.
        ConfigError: A ``batch_size`` that is not a positive integer.
    """
    from unlearnlens.models import check_compatible
    from unlearnlens.patching import prepare

    check_models(base, unlearned, "score")
    batch_size = check_batch_size(batch_size)
    bound = resolve_metric(metric)
    ps = prepare(base, unlearned, prompts, "score")
    if original is not None:
        check_models(original, unlearned, "score")
        check_compatible(original, unlearned)
        ps.check_fits(original)
    originals = _active_originals(unlearned) if original is None else []
    if original is None and not originals and (bound.uses_references or bound.normalized):
        raise MetricError(
            f"metric {bound.name!r} compares the unlearned model with itself before the change, "
            "and there is nothing to compare with: pass original=<the unlearned model before "
            "the change>, or score inside a ul.restored(base, unlearned, ...) block"
        )
    rows = default_batch_size(ps) if batch_size is None else batch_size
    chunks = list(ps.batches(min(len(ps), rows)))
    now, before, source = [], [], []
    models = [m for m in (base, unlearned, original) if m is not None]
    with preserved(*models):
        for _, chunk in bar(chunks, progress=progress, desc="score", leave=False):
            source.append(target_logits(base, chunk))
            now.append(target_logits(unlearned, chunk))
        if original is not None:
            before = [target_logits(original, chunk) for _, chunk in chunks]
        elif originals:
            with _swapped_back(originals):
                before = [target_logits(unlearned, chunk) for _, chunk in chunks]
        else:
            before = now
    per_prompt, baseline, reference = [], [], []
    for (_, chunk), zx, zt, zs in zip(chunks, now, before, source):
        per_prompt.append(bound(zx, chunk, zs, zt).cpu())
        baseline.append(bound(zt, chunk, zs, zt).cpu())
        reference.append(bound(zs, chunk, zs, zt).cpu())
        bound.check_references(zs, zt, chunk)  # warns about prompts KRS leaves out
    base_score = float(torch.cat(baseline).nanmean())
    ref_score = float(torch.cat(reference).nanmean())
    scores = torch.cat(per_prompt)[None]
    return float(bound.aggregate(scores, baseline=base_score, reference=ref_score)[0])
