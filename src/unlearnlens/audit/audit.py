"""``unlearnlens.audit``: every recovery attack and memorisation metric, on one scale.

:func:`audit` runs the probes of :mod:`unlearnlens.audit.builtin` (or a user's own) for one
or several unlearned models against their base model, on the same forget prompts, and returns
an :class:`~unlearnlens.audit.result.AuditResult`: per model and probe the base model's score,
the unlearned model's, the attacked model's and the recovered fraction
``(attacked - unlearned) / (base - unlearned)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from unlearnlens._checks import check_int
from unlearnlens._guard import preserved
from unlearnlens._progress import bar
from unlearnlens.audit import builtin  # noqa: F401  (registers the built-in probes)
from unlearnlens.audit.base import KNOWLEDGE_METRICS, AuditData, Probe, available_probes, get_probe
from unlearnlens.audit.prompting import neighbour_answers
from unlearnlens.audit.result import AuditResult, AuditRow
from unlearnlens.errors import ConfigError, PromptError, UnlearnLensError
from unlearnlens.prompts import Prompts, PromptSet, as_promptset

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["audit"]


def _models(unlearned: object) -> dict[str, HookedTransformer]:
    from transformer_lens import HookedTransformer

    if isinstance(unlearned, HookedTransformer):
        return {"unlearned": unlearned}
    if not isinstance(unlearned, Mapping) or not unlearned:
        raise ConfigError(
            "unlearned must be a HookedTransformer or a non-empty dict of name -> model"
        )
    for name, m in unlearned.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"unlearned model names must be non-empty strings, got {name!r}")
        if not isinstance(m, HookedTransformer):
            raise ConfigError(
                f"unlearned model {name!r} is a {type(m).__name__}, not a HookedTransformer"
            )
    return dict(unlearned)


def _prompts(base: HookedTransformer, prompts: Prompts | None, what: str) -> PromptSet | None:
    if prompts is None:
        return None
    try:
        return as_promptset(base, prompts)
    except PromptError as e:
        raise PromptError(f"bad {what}: {e}") from e


def _perturbed(
    base: HookedTransformer,
    forget: PromptSet,
    perturbed: Sequence[Sequence[str]] | None,
    pool: list[PromptSet],
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    if perturbed is None:
        return neighbour_answers(forget, pool)
    perturbed = list(perturbed)
    if len(perturbed) != len(forget):
        raise PromptError(
            f"perturbed has {len(perturbed)} entries for {len(forget)} forget prompts; give one "
            "list of wrong answers per forget prompt"
        )
    if base.tokenizer is None:
        raise PromptError("perturbed answers are strings: the model needs a tokenizer")
    out = []
    for i, answers in enumerate(perturbed):
        if isinstance(answers, str):
            raise PromptError(f"perturbed[{i}] is a string; give a list of answers")
        ids = []
        for a in answers:
            toks = base.to_tokens(a, prepend_bos=False, truncate=False)[0].tolist()
            if not toks:
                raise PromptError(f"perturbed answer {a!r} of forget prompt {i} is empty")
            ids.append(tuple(toks))
        out.append(tuple(ids))
    return tuple(out)


def _resolve(probes: Sequence[str | Probe] | None, data: AuditData) -> tuple[list[Probe], dict]:
    """The probes to run, and those left out (with the reason) when none were named."""
    skipped: dict[str, str] = {}
    if probes is None:
        chosen = []
        for name in available_probes():
            p = get_probe(name)
            lacking = p.missing(data)
            if lacking:
                skipped[name] = f"needs {', '.join(lacking)}"
            else:
                chosen.append(p)
        return chosen, skipped
    if isinstance(probes, (str, Probe)):
        probes = [probes]
    chosen = []
    for p in probes:
        probe = get_probe(p) if isinstance(p, str) else p
        if not isinstance(probe, Probe):
            raise ConfigError(f"probes must be names or Probe instances, got {type(p).__name__}")
        lacking = probe.missing(data)
        if lacking:
            raise ConfigError(
                f"probe {probe.name!r} needs {', '.join(lacking)}, which this audit lacks"
                + (" (pip install scikit-learn)" if "sklearn" in lacking else "")
            )
        chosen.append(probe)
    names = [p.name for p in chosen]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"probes named twice: {', '.join(dup)}")
    if not chosen:
        raise ConfigError(f"no probes given; registered probes: {', '.join(available_probes())}")
    return chosen, skipped


def audit(
    base: HookedTransformer,
    unlearned: HookedTransformer | Mapping[str, HookedTransformer],
    forget: Prompts,
    *,
    retain: Prompts | None = None,
    holdout: Prompts | None = None,
    paraphrases: Prompts | None = None,
    perturbed: Sequence[Sequence[str]] | None = None,
    probes: Sequence[str | Probe] | None = None,
    metric: str = "accuracy",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> AuditResult:
    """Runs recovery attacks and memorisation metrics on the same forget prompts.

    Every argument is checked, every probe's prompts built, before any probe runs. The models
    come back unchanged (weights, hooks, train/eval modes, grad flags), also after an
    exception or a KeyboardInterrupt: attacks that change weights work on copies (or, for
    restoration, swap the weights back).

    Args:
        base: The original model.
        unlearned: One unlearned model (named ``"unlearned"``) or a dict of name -> model.
        forget: The forget questions with their answers: pairs or a PromptSet.
        retain: Questions the models should still answer (in-context shots, relearning on
            other facts, more rows for the linear probes).
        holdout: Questions with answers that neither model was trained on, for the
            membership AUCs (forget vs holdout).
        paraphrases: The forget facts asked in other words (the toy world's
            ``world.paraphrases["forget"]``), for the ``paraphrase`` probe.
        perturbed: Per forget prompt, wrong answers (strings), for the truth ratio and the
            answer-vs-distractor probe. Default: the answers of same-template questions in
            ``forget``, ``retain`` and ``holdout`` (:func:`~unlearnlens.audit.prompting.
            neighbour_answers`).
        probes: Probe names (see :func:`~unlearnlens.audit.base.available_probes`) or
            :class:`~unlearnlens.audit.base.Probe` instances. Default: every registered
            probe whose inputs are given (the others are listed in ``meta["skipped"]``).
        metric: How attack probes measure forget knowledge: ``"accuracy"`` (greedy, every
            answer token), ``"answer_logprob"`` or ``"answer_prob"``.
        batch_size: Most prompts per forward pass.
        seed: Seed of the relearning batches and probe fits.
        progress: Show progress bars (``None``: the library-wide switch).

    Returns:
        An :class:`~unlearnlens.audit.result.AuditResult`.

    Raises:
        ConfigError: An unknown metric, a probe that lacks an input, no unlearned model.
        UnknownProbeError: An unknown probe name.
        IncompatibleModelsError: An unlearned model that does not fit the base model.
        PromptError: Empty or malformed prompts.
    """
    from unlearnlens.models import check_compatible

    models = _models(unlearned)
    if metric not in KNOWLEDGE_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(KNOWLEDGE_METRICS)}")
    check_int(seed, "seed")
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
    for name, m in models.items():
        try:
            check_compatible(base, m)
        except UnlearnLensError as e:
            raise type(e)(f"unlearned model {name!r} does not fit the base model: {e}") from e
    f_ps = _prompts(base, forget, "forget")
    assert f_ps is not None
    sets = {
        "retain": _prompts(base, retain, "retain"),
        "holdout": _prompts(base, holdout, "holdout"),
        "paraphrases": _prompts(base, paraphrases, "paraphrases"),
    }
    for ps in [f_ps, *sets.values()]:
        for m in models.values():
            if ps is not None:
                ps.check_fits(m)
    pool = [f_ps, *[ps for k, ps in sets.items() if k != "paraphrases" and ps is not None]]
    data = AuditData(
        forget=f_ps,
        perturbed=_perturbed(base, f_ps, perturbed, pool),
        metric=metric,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        **sets,
    )
    chosen, skipped = _resolve(probes, data)
    for probe in chosen:
        probe.check(base, data)

    rows = []
    with preserved(base, *models.values(), no_grad=False):
        steps = bar(total=len(models) * len(chosen), desc="audit", progress=progress)
        try:
            for method, m in models.items():
                for probe in chosen:
                    steps.set_postfix_str(f"{method}: {probe.name}")
                    score = probe.run(base, m, data)
                    rows.append(
                        AuditRow(
                            method=method,
                            probe=probe.name,
                            kind=probe.kind,
                            metric=probe.describe(data),
                            base=score.base,
                            unlearned=score.unlearned,
                            attacked=score.attacked,
                            details=score.details,
                        )
                    )
                    steps.update(1)
        finally:
            steps.close()
    meta = {
        "methods": list(models),
        "probes": [p.name for p in chosen],
        "skipped": skipped,
        "metric": metric,
        "n_forget": len(f_ps),
        **{f"n_{k}": (None if v is None else len(v)) for k, v in sets.items()},
        "n_perturbed": sum(len(p) for p in data.perturbed or ()),
        "base": base.cfg.model_name,
        "seed": seed,
    }
    return AuditResult(rows=tuple(rows), meta=meta)
