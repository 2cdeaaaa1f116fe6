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
                   residual stream carries everything and the score is 1 at every layer)
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
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from unlearnlens._checks import check_window
from unlearnlens._guard import preserved
from unlearnlens.errors import ConfigError, PromptError, UnlearnLensError
from unlearnlens.evaluation import Evaluation
from unlearnlens.prompts import PromptSet, as_promptset
from unlearnlens.results import SweepResult

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer

    from unlearnlens.comparison import CoefficientComparison
    from unlearnlens.metrics import MetricLike

__all__ = [
    "ANALYSES",
    "SWEEPS",
    "CoefficientTables",
    "StudyResult",
    "check_analyses",
    "dissect",
]

SWEEPS: dict[str, str] = {
    "patch_mlp": "patch MLP coefficients (mlp.hook_post)",
    "patch_attn": "patch attention outputs (hook_attn_out)",
    "patch_mlp_attn": "patch MLP coefficients + attention outputs",
    "patch_resid": "patch residual stream (resid_pre), per position",
    "restore_w_out": "restore MLP value vectors (mlp.W_out)",
    "restore_mlp": "restore all MLP parameters",
    "restore_attn": "restore all attention parameters",
}
"""The KRS sweeps of a study, by name, with a one-line description."""

ANALYSES: tuple[str, ...] = ("behaviour", *SWEEPS, "coefficients", "logit_lens")
"""Every analysis :func:`dissect` can run, in the order it runs them."""

_FORMAT = "unlearnlens.StudyResult/1"
_JSON_FILE = "study.json"
_TENSOR_FILE = "study.safetensors"
_REPORT_JSON = "results.json"

Prompts = PromptSet | Sequence[tuple[str, str]] | Sequence[str]


# ------------------------------------------------------------------------------ JSON helpers


def _enc(value: Any) -> Any:
    """JSON-ready copy in which non-finite floats become ``{"$float": "nan" | "inf" | "-inf"}``."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        return {str(k): _enc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    return value


def _dec(value: Any) -> Any:
    """Inverse of :func:`_enc`."""
    if isinstance(value, dict):
        if set(value) == {"$float"}:
            return float(value["$float"])
        return {k: _dec(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dec(v) for v in value]
    return value


def _tensor_json(t: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as exact JSON: float32 values are exact as Python floats."""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": _enc(t.flatten().tolist()),
    }


def _tensor_from_json(data: Mapping[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, data["dtype"])
    return torch.tensor(_dec(data["data"]), dtype=dtype).reshape(data["shape"])


def _frame_json(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "columns": [str(c) for c in frame.columns],
        "dtypes": [str(frame[c].dtype) for c in frame.columns],
        "data": _enc(frame.to_numpy(dtype=object).tolist()),
    }


def _frame_from_json(data: Mapping[str, Any]) -> pd.DataFrame:
    import pandas as pd

    rows = _dec(data["data"])
    frame = (
        pd.DataFrame(rows, columns=data["columns"])
        if rows
        else pd.DataFrame(columns=data["columns"])
    )
    return frame.astype(dict(zip(data["columns"], data["dtypes"], strict=True)))


def _plain_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_meta(v) for v in value]
    return value


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True, eq=False)
class CoefficientTables:
    """The tables of a :class:`~unlearnlens.CoefficientComparison`, kept for save/load.

    Attributes:
        layers: One row per layer (:meth:`CoefficientComparison.to_dataframe`): coefficient
            shift, cosine, contributions and shares of the answer-logit change.
        top_by_logit: The top neurons by ``|logit effect|`` (``neurons_dataframe("logit")``).
        top_by_coefficient: The top neurons by mean ``|Δc|``.
        base_logit: Mean answer logit of the base model.
        unlearned_logit: Mean answer logit of the unlearned model.
    """

    layers: pd.DataFrame
    top_by_logit: pd.DataFrame
    top_by_coefficient: pd.DataFrame
    base_logit: float
    unlearned_logit: float

    @classmethod
    def from_comparison(cls, comparison: CoefficientComparison) -> CoefficientTables:
        """The tables of a comparison."""
        layers = comparison.to_dataframe()
        layers.attrs.clear()
        return cls(
            layers=layers,
            top_by_logit=comparison.neurons_dataframe("logit"),
            top_by_coefficient=comparison.neurons_dataframe("coefficient"),
            base_logit=float(comparison.base_logit),
            unlearned_logit=float(comparison.unlearned_logit),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready data (exact: Python floats round-trip through JSON)."""
        return {
            "layers": _frame_json(self.layers),
            "top_by_logit": _frame_json(self.top_by_logit),
            "top_by_coefficient": _frame_json(self.top_by_coefficient),
            "base_logit": _enc(self.base_logit),
            "unlearned_logit": _enc(self.unlearned_logit),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> CoefficientTables:
        """Inverse of :meth:`to_json_dict`."""
        return cls(
            layers=_frame_from_json(data["layers"]),
            top_by_logit=_frame_from_json(data["top_by_logit"]),
            top_by_coefficient=_frame_from_json(data["top_by_coefficient"]),
            base_logit=float(_dec(data["base_logit"])),
            unlearned_logit=float(_dec(data["unlearned_logit"])),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CoefficientTables):
            return NotImplemented
        return (
            self.layers.equals(other.layers)
            and self.top_by_logit.equals(other.top_by_logit)
            and self.top_by_coefficient.equals(other.top_by_coefficient)
            and _same(self.base_logit, other.base_logit)
            and _same(self.unlearned_logit, other.unlearned_logit)
        )

    __hash__ = None  # type: ignore[assignment]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass(frozen=True, eq=False)
class StudyResult:
    """Everything :func:`dissect` measured.

    Attributes:
        sweeps: Per unlearned model (method) name, a dict analysis name -> SweepResult: the
            KRS sweeps of :data:`SWEEPS` that ran, and ``"logit_lens"``.
        evaluation: The behaviour table (rows ``"base"`` and every method), or None.
        coefficients: Per method, the coefficient comparison's tables.
        base_lens: The base model's logit lens, or None.
        meta: The study's settings: methods, analyses, window, metric, prompt counts, model
            names. JSON values only.
    """

    sweeps: dict[str, dict[str, SweepResult]]
    evaluation: Evaluation | None = None
    coefficients: dict[str, CoefficientTables] = field(default_factory=dict)
    base_lens: SweepResult | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The unlearned models' names, in order."""
        return list(self.sweeps)

    def summary(self) -> pd.DataFrame:
        """Per method and KRS sweep: the peak score, the layer where it peaks, the mean.

        Returns:
            A DataFrame indexed by ``(method, analysis)`` with columns ``peak``,
            ``peak_layer`` and ``mean`` (over the swept layers; for the per-position residual
            sweep, over layers and positions, and ``peak_layer`` is the layer of the peak
            cell). Empty when no sweep ran.
        """
        import pandas as pd

        rows = []
        for method, results in self.sweeps.items():
            for analysis in SWEEPS:
                if analysis not in results:
                    continue
                r = results[analysis]
                where, best = r.peak()
                rows.append(
                    {
                        "method": method,
                        "analysis": analysis,
                        "peak": best,
                        "peak_layer": int(where["layer"]),
                        "mean": float(r.scores.nanmean()),
                    }
                )
        frame = pd.DataFrame(rows, columns=["method", "analysis", "peak", "peak_layer", "mean"])
        return frame.set_index(["method", "analysis"])

    def report(self, directory: str | Path) -> Path:
        """Writes the HTML report (:func:`unlearnlens.report.write_report`); returns its path."""
        from unlearnlens.report import write_report

        return write_report(self, directory)

    # ------------------------------------------------------------------------- save / load

    def _header(self, sweep: Any) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "methods": self.methods,
            "meta": _enc(self.meta),
            "evaluation": None if self.evaluation is None else self.evaluation.to_json_dict(),
            "coefficients": {k: v.to_json_dict() for k, v in self.coefficients.items()},
            "sweeps": {
                m: {a: sweep(r, f"{i}.{j}") for j, (a, r) in enumerate(res.items())}
                for i, (m, res) in enumerate(self.sweeps.items())
            },
            "base_lens": None if self.base_lens is None else sweep(self.base_lens, "base_lens"),
        }

    def to_json_dict(self) -> dict[str, Any]:
        """The whole result as JSON-ready data, tensors included (float32 values are exact)."""

        def sweep(r: SweepResult, _key: str) -> dict[str, Any]:
            return {
                "header": _enc(r.to_json_dict()),
                "tensors": {k: _tensor_json(t) for k, t in r.tensors().items()},
            }

        return self._header(sweep)

    @classmethod
    def _from_header(cls, data: Mapping[str, Any], sweep: Any) -> StudyResult:
        if data.get("format") != _FORMAT:
            raise UnlearnLensError(f"not a saved StudyResult (format {data.get('format')!r})")
        sweeps = {m: {a: sweep(r) for a, r in data["sweeps"][m].items()} for m in data["methods"]}
        return cls(
            sweeps=sweeps,
            evaluation=None
            if data["evaluation"] is None
            else Evaluation.from_json_dict(data["evaluation"]),
            coefficients={
                k: CoefficientTables.from_json_dict(v) for k, v in data["coefficients"].items()
            },
            base_lens=None if data["base_lens"] is None else sweep(data["base_lens"]),
            meta=_dec(data["meta"]),
        )

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> StudyResult:
        """Rebuilds a result from :meth:`to_json_dict` output.

        Raises:
            UnlearnLensError: The data is not a saved study.
        """

        def sweep(entry: Mapping[str, Any]) -> SweepResult:
            tensors = {k: _tensor_from_json(t) for k, t in entry["tensors"].items()}
            return SweepResult.from_parts(_dec(entry["header"]), tensors)

        return cls._from_header(data, sweep)

    def to_json(self) -> str:
        """:meth:`to_json_dict` as a JSON string (standard JSON: no NaN literals)."""
        return json.dumps(self.to_json_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, source: str | Path) -> StudyResult:
        """Reads a study from a JSON string, a ``.json`` file or a folder with ``results.json``."""
        if isinstance(source, Path) or (
            isinstance(source, str) and not source.lstrip().startswith("{")
        ):
            path = Path(source)
            if path.is_dir():
                path = path / _REPORT_JSON
            if not path.is_file():
                raise UnlearnLensError(f"no saved StudyResult at {path}")
            source = path.read_text()
        return cls.from_json_dict(json.loads(source))

    def save(self, directory: str | Path) -> Path:
        """Writes ``study.json`` and ``study.safetensors`` (exact tensors) into ``directory``.

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}

        def sweep(r: SweepResult, key: str) -> dict[str, Any]:
            names = {}
            for name, t in r.tensors().items():
                tensors[f"{key}.{name}"] = t
                names[name] = f"{key}.{name}"
            return {"header": _enc(r.to_json_dict()), "tensors": names}

        header = self._header(sweep)
        save_file(tensors, str(directory / _TENSOR_FILE), metadata={"format": _FORMAT})
        (directory / _JSON_FILE).write_text(json.dumps(header, indent=1, allow_nan=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> StudyResult:
        """Reads a study saved by :meth:`save`, or the ``results.json`` of a report folder.

        Raises:
            UnlearnLensError: The folder holds neither.
        """
        directory = Path(directory)
        if (directory / _JSON_FILE).is_file() and (directory / _TENSOR_FILE).is_file():
            data = json.loads((directory / _JSON_FILE).read_text())
            stored = load_file(str(directory / _TENSOR_FILE))

            def sweep(entry: Mapping[str, Any]) -> SweepResult:
                return SweepResult.from_parts(
                    _dec(entry["header"]), {k: stored[v] for k, v in entry["tensors"].items()}
                )

            return cls._from_header(data, sweep)
        if (directory / _REPORT_JSON).is_file():
            return cls.from_json(directory / _REPORT_JSON)
        raise UnlearnLensError(
            f"no saved StudyResult in {directory}: expected {_JSON_FILE} + {_TENSOR_FILE} "
            f"(StudyResult.save) or {_REPORT_JSON} (a report folder)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StudyResult):
            return NotImplemented
        return (
            self.methods == other.methods
            and all(
                list(self.sweeps[m]) == list(other.sweeps[m]) and self.sweeps[m] == other.sweeps[m]
                for m in self.methods
            )
            and self.evaluation == other.evaluation
            and list(self.coefficients) == list(other.coefficients)
            and self.coefficients == other.coefficients
            and self.base_lens == other.base_lens
            and json.dumps(_enc(self.meta), sort_keys=True)
            == json.dumps(_enc(other.meta), sort_keys=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.sweeps.values())
        return f"StudyResult(methods={self.methods}, {n} sweeps)"


# ------------------------------------------------------------------------------ dissect


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
            raise TypeError(
                f"unlearned model {name!r} is a {type(m).__name__}, not a HookedTransformer"
            )
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
    progress: bool = True,
) -> StudyResult:
    """Runs the whole unlearning study: behaviour, patching, restoration, coefficients, lens.

    Every argument is checked, and the prompts built, before any analysis runs; the models
    come back unchanged (hooks, weights, modes, grad flags), also after an interrupt.

    Args:
        base: The original model (the source of every patch and restoration).
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
        progress: Show progress bars.

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
    from unlearnlens.models import check_compatible
    from unlearnlens.patching import patch, patch_attention, patch_mlp_coefficients, patch_residual
    from unlearnlens.restoration import restore_sweep

    chosen = check_analyses(analyses)
    models = _unlearned_models(unlearned)
    window = check_window(window)
    bound = resolve_metric(metric)
    if answers not in ("given", "model"):
        raise ConfigError(f"answers must be 'given' or 'model', got {answers!r}")
    for name, m in models.items():
        try:
            check_compatible(base, m)
        except UnlearnLensError as e:
            raise type(e)(f"unlearned model {name!r} does not fit the base model: {e}") from e
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
            base, u, ps, hook="resid_pre", positions="each", **kw
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

    bar = tqdm(total=total, desc="dissect", disable=not progress)
    try:
        with preserved(base, *models.values()):
            if "behaviour" in chosen:
                bar.set_postfix_str("behaviour")
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
                bar.update(1)
            if "logit_lens" in chosen:
                base_lens = logit_lens(base, ps, batch_size=batch_size)
                bar.update(1)
            for name, u in models.items():
                for analysis in per_method:
                    bar.set_postfix_str(f"{name}: {analysis}")
                    if analysis == "coefficients":
                        coefficients[name] = CoefficientTables.from_comparison(
                            compare_coefficients(base, u, ps, top_k=top_k, batch_size=batch_size)
                        )
                    elif analysis == "logit_lens":
                        sweeps[name][analysis] = logit_lens(u, ps, batch_size=batch_size)
                    else:
                        sweeps[name][analysis] = runs[analysis](u)
                    bar.update(1)
    finally:
        bar.close()

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
        meta=_plain_meta(meta),
    )
