"""One call runs the whole study: :func:`dissect` and its :class:`StudyResult`.

``dissect(base, {"npo": m1, "rmu": m2}, prompts)`` runs, for every unlearned model, the
reference study's experiments and what unlearnlens adds to them:

=================  ===========================================================================
analysis           what it runs
=================  ===========================================================================
``behaviour``      :func:`unlearnlens.evaluate` of the base and every unlearned model on the
                   prompts (as the forget split), ``unrelated`` and ``capability``, with the
                   base model as the reference for generation drift
``patch_mlp``      :func:`unlearnlens.patch_mlp_coefficients`: the base model's MLP
                   coefficients (``mlp.hook_post``) over a window of layers, all positions
``patch_attn``     :func:`unlearnlens.patch_attention`: attention outputs (``hook_attn_out``)
``patch_mlp_attn`` :func:`unlearnlens.patch` with both hooks patched together
``patch_resid``    :func:`unlearnlens.patch_residual` of ``resid_pre`` one layer and one
                   position at a time (a layer x position map; over all positions at once the
                   residual stream carries everything and the score is 1 at every layer),
                   positions aligned on the answer (``"prompt-2"``, ``"prompt-1"``,
                   ``"answer+0"``, ...) so that a column is the same token role in every prompt
``restore_w_out``  :func:`unlearnlens.restore_sweep` of ``mlp.W_out`` (the value vectors) over
                   the same windows
``restore_mlp``    restoration of every MLP parameter
``restore_attn``   restoration of every attention parameter
``coefficients``   :func:`unlearnlens.compare_coefficients`
``logit_lens``     :func:`unlearnlens.logit_lens` of every unlearned model and of the base model
=================  ===========================================================================

The result holds every :class:`~unlearnlens.SweepResult`, the behaviour table and the
coefficient tables; it saves and loads without loss and writes an HTML report.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from unlearnlens._checks import check_batch_size, check_int, check_model, check_window
from unlearnlens._finite import check_finite, finite_checked
from unlearnlens._guard import preserved
from unlearnlens._progress import bar
from unlearnlens.audit.result import AuditResult
from unlearnlens.errors import ComponentError, ConfigError, PromptError, UnlearnLensError
from unlearnlens.prompts import PromptSet, as_promptset
from unlearnlens.results import SweepResult, json_ready

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.metrics import MetricLike

from unlearnlens.study_result import ANALYSES, SWEEPS, CoefficientTables, StudyResult

__all__ = [
    "ANALYSES",
    "SWEEPS",
    "CoefficientTables",
    "StudyResult",
    "check_analyses",
    "dissect",
]

Prompts = PromptSet | Sequence[tuple[str, str]] | Sequence[str]


# ------------------------------------------------------------------------------ dissect

_MLP_ANALYSES = ("patch_mlp", "patch_mlp_attn", "restore_w_out", "restore_mlp", "coefficients")


def check_analyses(analyses: Sequence[str] | str | None) -> tuple[str, ...]:
    """The analyses to run, in :data:`ANALYSES` order; ``None`` means all.

    Raises:
        ConfigError: An unknown name (the message lists the valid ones), or none at all.
    """
    if analyses is None:
        return ANALYSES
    if isinstance(analyses, str):
        analyses = [a.strip() for a in analyses.split(",") if a.strip()]
    chosen = list(analyses)
    if not chosen:
        raise ConfigError(f"no analyses given; valid analyses: {', '.join(ANALYSES)}")
    for a in chosen:
        if a not in ANALYSES:
            raise ConfigError(f"unknown analysis {a!r}; valid analyses: {', '.join(ANALYSES)}")
    return tuple(a for a in ANALYSES if a in chosen)


def _unlearned_models(unlearned: object) -> dict[str, HookedTransformer]:
    from transformer_lens import HookedTransformer

    if isinstance(unlearned, HookedTransformer):
        return {"unlearned": unlearned}
    if not isinstance(unlearned, Mapping) or not unlearned:
        raise ConfigError(
            "unlearned must be a HookedTransformer or a non-empty dict of method name -> model"
        )
    out = {}
    for name, m in unlearned.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"method names must be non-empty strings, got {name!r}")
        if name == "base":
            raise ConfigError(
                "'base' names the base model's row; call the unlearned model something else"
            )
        if not isinstance(m, HookedTransformer):
            check_model(m, f"unlearned model {name!r}")
        out[name] = m
    return out


def _study_prompts(
    base: HookedTransformer, prompts: object, answers: str, max_new_tokens: int, what: str
) -> PromptSet:
    if isinstance(prompts, PromptSet):
        prompts.check_fits(base)
        return prompts
    if isinstance(prompts, (str, bytes)):
        raise PromptError(f"{what} is a single string; pass a list")
    items = list(prompts)  # type: ignore[call-overload]
    if not items:
        raise PromptError(f"{what} is empty: give at least one question")
    if answers == "model":
        questions = [q if isinstance(q, str) else q[0] for q in items]
        return PromptSet.from_model_answers(base, questions, max_new_tokens=max_new_tokens)
    if any(isinstance(q, str) for q in items):
        raise PromptError(
            f"{what} holds bare questions; give (question, answer) pairs, or answers='model' to "
            "answer them with the base model's greedy continuation"
        )
    try:
        return as_promptset(base, items)
    except PromptError as e:
        raise PromptError(f"bad {what}: {e}") from e


def dissect(
    base: HookedTransformer,
    unlearned: HookedTransformer | Mapping[str, HookedTransformer],
    prompts: Prompts,
    *,
    unrelated: Prompts | None = None,
    capability: Sequence[str] | Sequence[tuple[str, str]] | PromptSet | None = None,
    window: int = 5,
    analyses: Sequence[str] | str | None = None,
    metric: MetricLike = "krs",
    answers: Literal["given", "model"] = "given",
    max_new_tokens: int = 30,
    eval_max_new_tokens: int = 16,
    top_k: int = 20,
    batch_size: int | None = None,
    progress: bool | None = None,
    audit: AuditResult | None = None,
) -> StudyResult:
    """Runs the whole unlearning study: behaviour, patching, restoration, coefficients, lens.

    Every argument is checked, and the prompts built, before any analysis runs; the models
    come back unchanged (hooks, weights, modes, grad flags), also after an interrupt.

    Args:
        base: The original model (the source of every patch and restoration). It may live on
            another device than the unlearned models (the CPU, with them on a GPU): the sweeps
            and the coefficient comparison then run it block by block on their device.
        unlearned: One unlearned model, or a dict of method name -> model (one per unlearning
            method). A single model is named ``"unlearned"``.
        prompts: The forget questions with their answers: ``(question, answer)`` pairs or a
            PromptSet. The reference study answers each question with the base model's own
            greedy continuation: pass ``answers="model"`` (then ``prompts`` may be bare
            question strings, used as given; see :func:`unlearnlens.format_question`), or
            build ``PromptSet.from_model_answers(base, questions)`` yourself.
        unrelated: Questions about other concepts, scored by the behaviour test (side
            effects); same forms as ``prompts``.
        capability: Probe texts (perplexity) or pairs (task accuracy) for the behaviour test.
            The behaviour test also scores how far each unlearned model's greedy generations
            drift from the base model's (exact match, ROUGE-L); without the ``rouge-score``
            package those two scores are left out with a warning.
        window: Layers patched or restored together around each layer (a positive odd number;
            the study uses 5, clipped at the ends). The per-position residual sweep uses 1.
        analyses: Names from :data:`ANALYSES` to run (default all), e.g.
            ``("patch_mlp", "restore_w_out")``.
        metric: The sweeps' metric; ``"krs"`` (the study's Knowledge Recovery Score: 0 = the
            unlearned model, 1 = the base model's output recovered) by default.
        answers: ``"given"`` (the pairs' answers) or ``"model"`` (the base model's greedy
            answers, up to ``max_new_tokens`` tokens).
        max_new_tokens: Longest greedy answer with ``answers="model"``.
        eval_max_new_tokens: Longest generation in the behaviour test's drift scores.
        top_k: Neurons listed by the coefficient comparison.
        batch_size: Most rows per forward pass.
        progress: Show progress bars (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).
        audit: An :func:`unlearnlens.audit` of the same models, kept in the result and shown
            in its report.

    Returns:
        A :class:`StudyResult`.

    Raises:
        ConfigError: An unknown analysis (the message lists the valid ones), no unlearned
            model, a method named ``"base"``.
        LayerError: A window that is not a positive odd number.
        IncompatibleModelsError: An unlearned model that differs from the base model in
            architecture or tokenizer.
        PromptError: Empty or malformed prompts.
        MetricError: An unknown metric.
    """
    from unlearnlens.comparison import compare_coefficients
    from unlearnlens.evaluation import evaluate
    from unlearnlens.lens import logit_lens
    from unlearnlens.metrics import resolve_metric
    from unlearnlens.models import check_compatible, check_distinct
    from unlearnlens.patching import patch, patch_attention, patch_mlp_coefficients, patch_residual
    from unlearnlens.restoration import restore_sweep

    chosen = check_analyses(analyses)
    check_model(base, "base")
    needs_mlp = [a for a in chosen if a in _MLP_ANALYSES]
    if needs_mlp and getattr(base.cfg, "attn_only", False):
        raise ComponentError(
            f"the base model is attention-only (cfg.attn_only=True), so the analyses "
            f"{', '.join(needs_mlp)} (which read MLPs) cannot run; pass analyses= without them"
        )
    models = _unlearned_models(unlearned)
    if audit is not None and not isinstance(audit, AuditResult):
        raise ConfigError(f"audit must be an AuditResult (ul.audit), got {type(audit).__name__}")
    window = check_window(window)
    top_k = check_int(top_k, "top_k", minimum=1)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    eval_max_new_tokens = check_int(eval_max_new_tokens, "eval_max_new_tokens", minimum=1)
    batch_size = check_batch_size(batch_size)
    bound = resolve_metric(metric)
    if answers not in ("given", "model"):
        raise ConfigError(f"answers must be 'given' or 'model', got {answers!r}")
    for name, m in models.items():
        try:
            check_compatible(base, m)
        except UnlearnLensError as e:
            raise type(e)(f"unlearned model {name!r} does not fit the base model: {e}") from e
        check_distinct(base, m, what=f"unlearned model {name!r}")
        check_finite(m, f"unlearned model {name!r}")
    check_finite(base, "base model")
    ps = _study_prompts(base, prompts, answers, max_new_tokens, "prompts")
    unrel = (  # only the behaviour test reads them
        None
        if unrelated is None or "behaviour" not in chosen
        else _study_prompts(base, unrelated, answers, max_new_tokens, "unrelated")
    )
    for m in models.values():
        ps.check_fits(m)
        if unrel is not None:
            unrel.check_fits(m)

    kw = {"metric": bound, "batch_size": batch_size, "progress": progress}
    runs = {
        "patch_mlp": lambda u: patch_mlp_coefficients(base, u, ps, window=window, **kw),
        "patch_attn": lambda u: patch_attention(base, u, ps, window=window, **kw),
        "patch_mlp_attn": lambda u: patch(
            base, u, ps, hooks=["mlp.hook_post", "hook_attn_out"], window=window, **kw
        ),
        "patch_resid": lambda u: patch_residual(
            base, u, ps, hook="resid_pre", positions="each", align="answer", **kw
        ),
        "restore_w_out": lambda u: restore_sweep(
            base, u, ps, components="mlp.W_out", window=window, **kw
        ),
        "restore_mlp": lambda u: restore_sweep(base, u, ps, components="mlp", window=window, **kw),
        "restore_attn": lambda u: restore_sweep(
            base, u, ps, components="attn", window=window, **kw
        ),
    }
    per_method = [a for a in chosen if a in runs or a in ("coefficients", "logit_lens")]
    total = len(models) * len(per_method) + ("behaviour" in chosen) + ("logit_lens" in chosen)
    sweeps: dict[str, dict[str, SweepResult]] = {name: {} for name in models}
    coefficients: dict[str, CoefficientTables] = {}
    evaluation = base_lens = None

    reference = base
    if "behaviour" in chosen and importlib.util.find_spec("rouge_score") is None:
        warnings.warn(
            "rouge-score is not installed, so the behaviour test leaves out the generation-drift "
            "scores (exact_match, rouge_l); pip install 'unlearnlens[eval]' to get them",
            stacklevel=2,
        )
        reference = None

    pbar = bar(total=total, progress=progress, desc="dissect")
    try:
        with preserved(base, *models.values()), finite_checked(base, *models.values()):
            if "behaviour" in chosen:
                pbar.set_postfix_str("behaviour")
                evaluation = evaluate(
                    {"base": base, **models},
                    forget=ps,
                    unrelated=unrel,
                    capability=capability,
                    reference=reference,
                    max_new_tokens=eval_max_new_tokens,
                    batch_size=batch_size,
                    progress=progress,
                )
                pbar.update(1)
            if "logit_lens" in chosen:
                base_lens = logit_lens(base, ps, batch_size=batch_size, progress=progress)
                pbar.update(1)
            for name, u in models.items():
                for analysis in per_method:
                    pbar.set_postfix_str(f"{name}: {analysis}")
                    if analysis == "coefficients":
                        coefficients[name] = CoefficientTables.from_comparison(
                            compare_coefficients(
                                base, u, ps, top_k=top_k, batch_size=batch_size, progress=progress
                            )
                        )
                    elif analysis == "logit_lens":
                        sweeps[name][analysis] = logit_lens(
                            u, ps, batch_size=batch_size, progress=progress
                        )
                    else:
                        sweeps[name][analysis] = runs[analysis](u)
                    pbar.update(1)
    finally:
        pbar.close()

    meta = {
        "methods": list(models),
        "analyses": list(chosen),
        "window": window,
        "metric": bound.name,
        "answer_source": answers,
        "n_prompts": len(ps),
        "n_unrelated": None if unrel is None else len(unrel),
        "base": base.cfg.model_name,
        "n_layers": base.cfg.n_layers,
        "prompts": list(ps.prompts) if ps.prompts is not None else None,
        "answers": list(ps.answers) if ps.answers is not None else None,
    }
    return StudyResult(
        sweeps=sweeps,
        evaluation=evaluation,
        coefficients=coefficients,
        base_lens=base_lens,
        meta=json_ready(meta),
        audit=audit,
    )
