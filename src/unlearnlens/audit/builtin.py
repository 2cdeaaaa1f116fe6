"""The built-in audit probes, registered by name on import.

=====================  ======  ==============================================================
name                   kind    what it measures
=====================  ======  ==============================================================
``mia_loss``           metric  ROC AUC forget vs holdout of the LOSS membership score
``mia_zlib``           metric  ... of the zlib score
``mia_min_k``          metric  ... of Min-K% (k = 0.4)
``mia_min_k++``        metric  ... of Min-K%++ (k = 0.4)
``truth_ratio``        metric  open-unlearning's forget truth ratio, ``mean(min(R, 1/R))``
``extraction``         metric  mean extraction strength of the forget answers
``quant8``             attack  8-bit round-to-nearest weights, per output channel
``quant4``             attack  4-bit, per output channel
``quant4_g32``         attack  4-bit, per group of 32 inputs
``relearn_forget``     attack  fine-tune on half of the forget facts, score the other half
``relearn_retain``     attack  fine-tune on the retain set (other facts), score the forget set
``in_context``         attack  three solved retain questions before every forget question
``paraphrase``         attack  the forget questions in other (held-out) phrasings
``linear_probe``       attack  per-layer probes fitted on the base model's retain prompts
                               decode the forget answer from the unlearned model's residuals
``linear_probe_pair``  attack  the same probes score the answer above its distractors
``restore_w_out``      attack  the base model's ``mlp.W_out`` in every layer (the reference
                               study's value-vector restoration, on the same scale)
=====================  ======  ==============================================================

Attack probes score forget-set knowledge with the audit's ``metric`` (accuracy by default):
the base and the unlearned model on the probe's evaluation prompts, and the attacked
unlearned model on the same facts. :class:`TemplateProbe` (a user's own prompt templates) and
other settings of these classes are not registered; pass instances to :func:`unlearnlens.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from unlearnlens._checks import check_float, check_int
from unlearnlens._progress import progress_enabled
from unlearnlens.audit.base import AuditData, Need, Probe, ProbeScore, knowledge, register_probe
from unlearnlens.audit.memorisation import (
    MEMBERSHIP_SCORES,
    _chunks,
    extraction_strength,
    membership_auc,
    truth_ratio_forget,
    truth_ratios,
)
from unlearnlens.audit.prompting import _seqs, fact_split, few_shot, templated
from unlearnlens.audit.quantization import fake_quantize
from unlearnlens.errors import ConfigError, PromptError
from unlearnlens.prompts import PromptSet

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "ExtractionProbe",
    "InContextProbe",
    "LinearProbe",
    "MembershipProbe",
    "ParaphraseProbe",
    "QuantizationProbe",
    "RelearnProbe",
    "RestoreProbe",
    "TemplateProbe",
    "TruthRatioProbe",
]


def _gap(base: HookedTransformer, unlearned: HookedTransformer, ps: PromptSet, data: AuditData):
    return (
        knowledge(base, ps, data.metric, data.batch_size),
        knowledge(unlearned, ps, data.metric, data.batch_size),
    )


def _other_prompts(
    probe: InContextProbe | ParaphraseProbe,
    base: HookedTransformer,
    unlearned: HookedTransformer,
    data: AuditData,
    key: str,
) -> ProbeScore:
    """The forget gap, then both models on the probe's own prompts for the same facts.

    The unlearned model's score on those prompts is the attack; the base model's goes into
    ``details[key]`` so a report can tell a prompt that helps any model from one that undoes
    the unlearning.
    """
    b, u = _gap(base, unlearned, data.forget, data)
    ps = probe._prompts(base, data)
    attacked = knowledge(unlearned, ps, data.metric, data.batch_size)
    base_other = knowledge(base, ps, data.metric, data.batch_size)
    return ProbeScore(b, u, attacked, details={key: base_other})


# ------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class MembershipProbe(Probe):
    """ROC AUC, forget vs holdout, of a membership score (open-unlearning's ``mia_*``).

    Attributes:
        score: ``"loss"``, ``"zlib"``, ``"min_k"`` or ``"min_k++"``.
        k: The share of tokens Min-K% and Min-K%++ keep.
    """

    score: str = "loss"
    k: float = 0.4
    kind: ClassVar = "metric"
    needs: ClassVar[tuple[Need, ...]] = ("holdout",)

    def __post_init__(self) -> None:
        if self.score not in MEMBERSHIP_SCORES:
            raise ConfigError(
                f"unknown membership score {self.score!r}; known: {', '.join(MEMBERSHIP_SCORES)}"
            )
        check_float(self.k, "k", positive=True, maximum=1.0)

    @property
    def name(self) -> str:
        """``mia_{score}``."""
        return f"mia_{self.score}"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return f"AUC forget vs holdout, {self.score} score (1 = forget looks trained on)"

    def check(self, base: HookedTransformer, data: AuditData) -> None:
        """The zlib score needs the answers' text."""
        if self.score == "zlib" and base.tokenizer is None:
            for ps in (data.forget, data.holdout):
                if ps is not None and ps.answers is None:
                    raise PromptError("mia_zlib needs answer text: give (question, answer) pairs")

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """AUC of the base and of the unlearned model."""
        fn = MEMBERSHIP_SCORES[self.score]
        kw = {"k": self.k} if self.score.startswith("min_k") else {}
        assert data.holdout is not None

        def auc(m: HookedTransformer) -> float:
            f = fn(m, data.forget, batch_size=data.batch_size, **kw)
            h = fn(m, data.holdout, batch_size=data.batch_size, **kw)
            return membership_auc(f, h)

        return ProbeScore(auc(base), auc(unlearned))


def _perturbed_set(data: AuditData) -> tuple[PromptSet, PromptSet, list[int]]:
    """The forget prompts that have perturbed answers, and those answers, flattened."""
    assert data.perturbed is not None
    keep = [i for i, p in enumerate(data.perturbed) if p]
    correct = data.forget[keep]
    questions, _ = _seqs(data.forget)
    p_ids, a_ids, counts = [], [], []
    for i in keep:
        for ans in data.perturbed[i]:
            p_ids.append(questions[i])
            a_ids.append(list(ans))
        counts.append(len(data.perturbed[i]))
    flat = PromptSet.from_tokens(p_ids, a_ids, pad_token_id=data.forget.pad_token_id)
    return correct, flat, counts


@dataclass(frozen=True)
class TruthRatioProbe(Probe):
    """open-unlearning's forget truth ratio: ``mean(min(R, 1/R))`` (1 = no preference left)."""

    kind: ClassVar = "metric"
    needs: ClassVar[tuple[Need, ...]] = ("perturbed",)

    @property
    def name(self) -> str:
        """``truth_ratio``."""
        return "truth_ratio"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return "forget truth ratio mean(min(R, 1/R)), R = P(wrong)/P(true) (1 = forgotten)"

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """The aggregate for both models."""
        correct, flat, counts = _perturbed_set(data)

        def tr(m: HookedTransformer) -> float:
            r = truth_ratios(m, correct, flat, counts=counts, batch_size=data.batch_size)
            return truth_ratio_forget(r)

        return ProbeScore(tr(base), tr(unlearned), details={"n_questions": len(correct)})


@dataclass(frozen=True)
class ExtractionProbe(Probe):
    """Mean extraction strength of the forget answers (1 = completed from the prompt alone)."""

    kind: ClassVar = "metric"

    @property
    def name(self) -> str:
        """``extraction``."""
        return "extraction"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return "mean extraction strength (share of the answer the model completes)"

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """The mean for both models."""

        def es(m: HookedTransformer) -> float:
            return float(extraction_strength(m, data.forget, batch_size=data.batch_size).mean())

        return ProbeScore(es(base), es(unlearned))


# ------------------------------------------------------------------------------ attacks


@dataclass(frozen=True)
class QuantizationProbe(Probe):
    """Round-to-nearest fake quantization of the unlearned model's weight matrices.

    Attributes:
        bits: Bits per weight.
        group_size: Inputs per grid; ``None`` for per-channel grids.
        symmetric: A grid symmetric around 0 instead of min-max.
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_int(self.bits, "bits", minimum=2)
        if self.group_size is not None:
            check_int(self.group_size, "group_size", minimum=1)

    @property
    def name(self) -> str:
        """``quant{bits}[_g{group_size}][_sym]``."""
        group = "" if self.group_size is None else f"_g{self.group_size}"
        return f"quant{self.bits}{group}{'_sym' if self.symmetric else ''}"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        grid = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"forget {data.metric}, {self.bits}-bit RTN weights ({grid})"

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Scores the quantized copies of the unlearned (and, in details, the base) model."""
        b, u = _gap(base, unlearned, data.forget, data)
        kw = {"group_size": self.group_size, "symmetric": self.symmetric}
        shares = _rounding_shares(base, unlearned, self.bits, **kw)
        q = fake_quantize(unlearned, self.bits, **kw)
        attacked = knowledge(q, data.forget, data.metric, data.batch_size)
        del q
        qb = fake_quantize(base, self.bits, **kw)
        base_q = knowledge(qb, data.forget, data.metric, data.batch_size)
        details = {"base_quantized": base_q, **shares}
        return ProbeScore(b, u, attacked, details=details)


def _rounding_shares(
    base: HookedTransformer, unlearned: HookedTransformer, bits: int, **kw: object
) -> dict[str, float]:
    """Shares of the quantized weights that unlearning changed, and that round differently.

    Quantization can only undo the unlearning where the two models' weights round to the
    same grid point; ``rounded_differently`` is the share where they do not (more than half
    a step apart after rounding).
    """
    from unlearnlens.audit.quantization import (
        _as_io,
        quantization_step,
        quantize_matrix,
        quantized_parameters,
    )

    params_b = dict(base.named_parameters())
    params_u = dict(unlearned.named_parameters())
    total = changed = differ = 0
    with torch.no_grad():
        for name in quantized_parameters(base):
            wb = _as_io(name, params_b[name]).float()
            wu = _as_io(name, params_u[name]).float().to(wb.device)
            qb = quantize_matrix(wb, bits, **kw)  # type: ignore[arg-type]
            qu = quantize_matrix(wu, bits, **kw)  # type: ignore[arg-type]
            step = quantization_step(wb, bits, **kw)  # type: ignore[arg-type]
            total += wb.numel()
            changed += int((wu != wb).sum())
            differ += int(((qu - qb).abs() > step / 2).sum())  # another grid point
    return {"changed": changed / total, "rounded_differently": differ / total}


@dataclass(frozen=True)
class RelearnProbe(Probe):
    """The relearning attack (:func:`unlearnlens.relearn`) on a copy of the unlearned model.

    Attributes:
        on: ``"forget"``: fine-tune on half of the forget facts (grouped by answer) and score
            the other half; ``"retain"``: fine-tune on the retain set and score the forget set.
        steps: Optimizer steps.
        lr: Learning rate.
        batch_size: Examples per step.
    """

    on: str = "forget"
    steps: int = 20
    lr: float = 5e-4
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.on not in ("forget", "retain"):
            raise ConfigError(f"on must be 'forget' or 'retain', got {self.on!r}")
        check_int(self.steps, "steps", minimum=1)
        check_float(self.lr, "lr", positive=True)
        check_int(self.batch_size, "batch_size", minimum=1)

    @property
    def needs(self) -> tuple[Need, ...]:  # type: ignore[override]
        """The retain set, when relearning on it."""
        return ("retain",) if self.on == "retain" else ()

    @property
    def name(self) -> str:
        """``relearn_{on}``."""
        return f"relearn_{self.on}"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        what = "held-out forget facts" if self.on == "forget" else "forget facts"
        return f"{what} {data.metric} after {self.steps} fine-tuning steps on {self.on} data"

    def _split(self, data: AuditData) -> tuple[PromptSet, PromptSet]:
        if self.on == "retain":
            assert data.retain is not None
            return data.retain, data.forget
        train, held = fact_split(data.forget)
        return data.forget[train], data.forget[held]

    def check(self, base: HookedTransformer, data: AuditData) -> None:
        """The forget set must split into two halves by answer."""
        if self.on == "forget":
            self._split(data)

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Relearns a copy, then scores the evaluation facts."""
        from unlearnlens.trainers.relearn import relearn

        train, evaluate = self._split(data)
        b, u = _gap(base, unlearned, evaluate, data)
        run = relearn(
            unlearned,
            train,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=data.seed,
            progress=progress_enabled(data.progress),
        )
        attacked = knowledge(run.model, evaluate, data.metric, data.batch_size)
        details = {"n_train": len(train), "n_eval": len(evaluate), "steps": self.steps}
        return ProbeScore(b, u, attacked, details=details | {"lr": self.lr})


@dataclass(frozen=True)
class InContextProbe(Probe):
    """Solved retain questions in front of every forget question.

    Attributes:
        shots: Examples per prompt.
    """

    shots: int = 3
    needs: ClassVar[tuple[Need, ...]] = ("retain",)

    def __post_init__(self) -> None:
        check_int(self.shots, "shots", minimum=1)

    @property
    def name(self) -> str:
        """``in_context``."""
        return "in_context"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return f"forget {data.metric} with {self.shots} solved retain questions before each"

    def _prompts(self, base: HookedTransformer, data: AuditData) -> PromptSet:
        assert data.retain is not None
        return few_shot(base, data.forget, data.retain, shots=self.shots)

    def check(self, base: HookedTransformer, data: AuditData) -> None:
        """The prompts must fit the context."""
        self._prompts(base, data)

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Scores the unlearned model on the few-shot prompts."""
        return _other_prompts(self, base, unlearned, data, "base_in_context")


@dataclass(frozen=True)
class ParaphraseProbe(Probe):
    """The forget facts asked in other phrasings (the audit's ``paraphrases``)."""

    needs: ClassVar[tuple[Need, ...]] = ("paraphrases",)

    @property
    def name(self) -> str:
        """``paraphrase``."""
        return "paraphrase"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return f"forget {data.metric} on paraphrased questions"

    def _prompts(self, base: HookedTransformer, data: AuditData) -> PromptSet:
        assert data.paraphrases is not None
        return data.paraphrases

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Scores the unlearned model on the rephrased prompts."""
        return _other_prompts(self, base, unlearned, data, "base_rephrased")


@dataclass(frozen=True)
class TemplateProbe(ParaphraseProbe):
    """The forget prompts rewritten by a user's templates (``"{prompt}"`` marks the prompt).

    Attributes:
        templates: Format strings, each with one ``{prompt}`` field.
    """

    templates: tuple[str, ...] = ()
    needs: ClassVar[tuple[Need, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.templates, str) or not self.templates:
            raise ConfigError("templates must be a non-empty tuple of strings with '{prompt}'")

    @property
    def name(self) -> str:
        """``templates``."""
        return "templates"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return f"forget {data.metric} under {len(self.templates)} prompt template(s)"

    def _prompts(self, base: HookedTransformer, data: AuditData) -> PromptSet:
        return templated(base, data.forget, self.templates)

    def check(self, base: HookedTransformer, data: AuditData) -> None:
        """The templates must apply."""
        self._prompts(base, data)


@dataclass(frozen=True)
class LinearProbe(Probe):
    """Per-layer linear probes fitted on the base model, read on the unlearned model.

    The probes decode the answer's first token from the residual stream after each block at
    the last prompt position. They are fitted on the base model's *retain* prompts only, so
    they cannot have memorised the forget facts themselves: on forget prompts they succeed
    only where the model writes a linear code for its answer. The layer read is the one where
    the probes decode the base model's forget answers best (the earliest, on ties), chosen
    without looking at the unlearned model. The base and unlearned scores are the models' own
    outputs on the same task (their logits over the probes' classes at that position); the
    attacked score is the probe on the unlearned model's residual stream at that layer
    (every layer, for both models, is in ``details``).

    Attributes:
        target: ``"token"`` (top class = answer) or ``"pair"`` (answer above distractors).
        c: Inverse regularisation strength of the logistic regressions.
    """

    target: str = "token"
    c: float = 1.0

    def __post_init__(self) -> None:
        if self.target not in ("token", "pair"):
            raise ConfigError(f"target must be 'token' or 'pair', got {self.target!r}")
        check_float(self.c, "c", positive=True)

    @property
    def needs(self) -> tuple[Need, ...]:  # type: ignore[override]
        """scikit-learn, the retain set, and distractors for the ``"pair"`` read-out."""
        need: tuple[Need, ...] = ("sklearn", "retain")
        return (*need, "perturbed") if self.target == "pair" else need

    @property
    def name(self) -> str:
        """``linear_probe`` or ``linear_probe_pair``."""
        return "linear_probe" if self.target == "token" else "linear_probe_pair"

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        if self.target == "token":
            return "first answer token decoded (retain-trained probe vs the model's output)"
        return "answer scored above distractors (retain-trained probe vs the model's output)"

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Fits on the base model's retain prompts, reads both models' forget prompts."""
        from unlearnlens.audit.probes import (
            class_accuracy,
            fit_linear_probes,
            last_prompt_residuals,
            pairwise_class_accuracy,
        )

        forget, retain = data.forget, data.retain
        assert retain is not None
        train = last_prompt_residuals(base, retain, batch_size=data.batch_size)
        probes = fit_linear_probes(train, retain.answer_tokens[:, 0], c=self.c, seed=data.seed)
        label_idx = probes.class_index(forget.answer_tokens[:, 0])
        distractors = [
            probes.class_index(torch.tensor([a[0] for a in p], dtype=torch.long)).tolist()
            for p in (data.perturbed or [()] * len(forget))
        ]

        def read(scores: torch.Tensor) -> torch.Tensor:
            if self.target == "token":
                return class_accuracy(scores, label_idx)
            return pairwise_class_accuracy(scores, label_idx, distractors)

        classes = torch.tensor(probes.classes)

        def output(m: HookedTransformer) -> float:
            z = _first_logits(m, forget, data.batch_size)[:, classes]
            return float(read(z[None])[0])

        def by_layer(m: HookedTransformer) -> torch.Tensor:
            return read(probes.scores(last_prompt_residuals(m, forget, batch_size=data.batch_size)))

        base_layers, unl_layers = by_layer(base), by_layer(unlearned)
        layer = int(base_layers.argmax())
        return ProbeScore(
            output(base),
            output(unlearned),
            float(unl_layers[layer]),
            details={
                "layer": layer,
                "base_by_layer": base_layers.tolist(),
                "unlearned_by_layer": unl_layers.tolist(),
                "n_classes": len(probes.classes),
                "n_train": len(retain),
            },
        )


@dataclass(frozen=True)
class RestoreProbe(Probe):
    """The base model's parameters swapped into the unlearned model while it is scored.

    Not an attack an adversary could run (it needs the base model), but the reference study's
    restoration on the audit's scale: restoring ``mlp.W_out`` (the value vectors) brings
    little back when fine-tuning only changed how the knowledge is retrieved.

    Attributes:
        components: What to restore (names as :func:`unlearnlens.select_parameters` takes).
    """

    components: str | tuple[str, ...] = "mlp.W_out"

    @property
    def name(self) -> str:
        """``restore_{components}`` with dots as underscores (``restore_w_out``)."""
        comps = (self.components,) if isinstance(self.components, str) else self.components
        if comps == ("mlp.W_out",):
            return "restore_w_out"
        return "restore_" + "+".join(c.replace(".", "_") for c in comps)

    def describe(self, data: AuditData) -> str:
        """The score's meaning."""
        return f"forget {data.metric} with the base model's {self.components} in every layer"

    def check(self, base: HookedTransformer, data: AuditData) -> None:
        """The components must exist."""
        from unlearnlens.components import select_parameters

        select_parameters(base, None, self.components)

    def run(
        self, base: HookedTransformer, unlearned: HookedTransformer, data: AuditData
    ) -> ProbeScore:
        """Scores the unlearned model with the base model's weights in (then its own again)."""
        from unlearnlens.restoration import Restoration, _pairs

        b, u = _gap(base, unlearned, data.forget, data)
        with Restoration(_pairs(base, unlearned, None, self.components), model=unlearned) as r:
            attacked = knowledge(unlearned, data.forget, data.metric, data.batch_size)
        return ProbeScore(b, u, attacked, details={"n_tensors": len(r.names)})


def _first_logits(model: HookedTransformer, ps: PromptSet, batch_size: int | None) -> torch.Tensor:
    return torch.cat([z[:, 0].float().cpu() for _, z in _chunks(model, ps, batch_size)])


# ------------------------------------------------------------------------------ registry


def _register(name: str, make: type[Probe] | object, **kw: object) -> None:
    register_probe(name)(lambda: make(**kw))  # type: ignore[operator]


for _score in ("loss", "zlib", "min_k", "min_k++"):
    _register(f"mia_{_score}", MembershipProbe, score=_score)
_register("truth_ratio", TruthRatioProbe)
_register("extraction", ExtractionProbe)
_register("quant8", QuantizationProbe, bits=8)
_register("quant4", QuantizationProbe, bits=4)
_register("quant4_g32", QuantizationProbe, bits=4, group_size=32)
_register("relearn_forget", RelearnProbe, on="forget")
_register("relearn_retain", RelearnProbe, on="retain")
_register("in_context", InContextProbe)
_register("paraphrase", ParaphraseProbe)
_register("linear_probe", LinearProbe, target="token")
_register("linear_probe_pair", LinearProbe, target="pair")
_register("restore_w_out", RestoreProbe)
