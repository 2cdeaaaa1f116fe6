"""What a study returns: :class:`StudyResult`, saved and loaded without loss.

It holds, per unlearned model, every :class:`~unlearnlens.SweepResult` of the study, the
behaviour table and the coefficient tables; :func:`unlearnlens.dissect` builds one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unlearnlens._storage import (
    atomic_directory,
    decode_floats,
    encode_floats,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from unlearnlens.audit.result import AuditResult
from unlearnlens.errors import FileFormatError, UnlearnLensError
from unlearnlens.evaluation import Evaluation
from unlearnlens.results import SweepResult

if TYPE_CHECKING:
    import pandas as pd

    from unlearnlens.comparison import CoefficientComparison

__all__ = ["ANALYSES", "SWEEPS", "CoefficientTables", "StudyResult"]

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


# ------------------------------------------------------------------------------ JSON helpers


def _tensor_json(t: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as exact JSON: float32 values are exact as Python floats."""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": encode_floats(t.flatten().tolist()),
    }


def _tensor_from_json(data: Mapping[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, data["dtype"])
    return torch.tensor(decode_floats(data["data"]), dtype=dtype).reshape(data["shape"])


def _frame_json(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "columns": [str(c) for c in frame.columns],
        "dtypes": [str(frame[c].dtype) for c in frame.columns],
        "data": encode_floats(frame.to_numpy(dtype=object).tolist()),
    }


def _frame_from_json(data: Mapping[str, Any]) -> pd.DataFrame:
    import pandas as pd

    rows = decode_floats(data["data"])
    frame = (
        pd.DataFrame(rows, columns=data["columns"])
        if rows
        else pd.DataFrame(columns=data["columns"])
    )
    return frame.astype(dict(zip(data["columns"], data["dtypes"], strict=True)))


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
            "base_logit": encode_floats(self.base_logit),
            "unlearned_logit": encode_floats(self.unlearned_logit),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> CoefficientTables:
        """Inverse of :meth:`to_json_dict`."""
        return cls(
            layers=_frame_from_json(data["layers"]),
            top_by_logit=_frame_from_json(data["top_by_logit"]),
            top_by_coefficient=_frame_from_json(data["top_by_coefficient"]),
            base_logit=float(decode_floats(data["base_logit"])),
            unlearned_logit=float(decode_floats(data["unlearned_logit"])),
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
        audit: The recovery attacks and memorisation metrics (:func:`unlearnlens.audit`) of
            the same models, when the study was given them.
    """

    sweeps: dict[str, dict[str, SweepResult]]
    evaluation: Evaluation | None = None
    coefficients: dict[str, CoefficientTables] = field(default_factory=dict)
    base_lens: SweepResult | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    audit: AuditResult | None = None

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
            "meta": encode_floats(self.meta),
            "evaluation": None if self.evaluation is None else self.evaluation.to_json_dict(),
            "coefficients": {k: v.to_json_dict() for k, v in self.coefficients.items()},
            "sweeps": {
                m: {a: sweep(r, f"{i}.{j}") for j, (a, r) in enumerate(res.items())}
                for i, (m, res) in enumerate(self.sweeps.items())
            },
            "base_lens": None if self.base_lens is None else sweep(self.base_lens, "base_lens"),
            "audit": None if self.audit is None else self.audit.to_json_dict(),
        }

    def to_json_dict(self) -> dict[str, Any]:
        """The whole result as JSON-ready data, tensors included (float32 values are exact)."""

        def sweep(r: SweepResult, _key: str) -> dict[str, Any]:
            return {
                "header": encode_floats(r.to_json_dict()),
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
            meta=decode_floats(data["meta"]),
            audit=None if data.get("audit") is None else AuditResult.from_json_dict(data["audit"]),
        )

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> StudyResult:
        """Rebuilds a result from :meth:`to_json_dict` output.

        Raises:
            UnlearnLensError: The data is not a saved study.
        """

        def sweep(entry: Mapping[str, Any]) -> SweepResult:
            tensors = {k: _tensor_from_json(t) for k, t in entry["tensors"].items()}
            return SweepResult.from_parts(decode_floats(entry["header"]), tensors)

        return cls._from_header(data, sweep)

    def to_json(self) -> str:
        """:meth:`to_json_dict` as a JSON string (standard JSON: no NaN literals)."""
        return json.dumps(self.to_json_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, source: str | Path) -> StudyResult:
        """Reads a study from a JSON string, a ``.json`` file or a folder with ``results.json``.

        Raises:
            FileFormatError: The file is missing, truncated, corrupt or not a saved study;
                names the file.
        """
        if isinstance(source, Path) or (
            isinstance(source, str) and not source.lstrip().startswith("{")
        ):
            path = Path(source)
            if path.is_dir():
                path = path / _REPORT_JSON
            data = read_json(path, what="saved StudyResult")
            return _parsed(path, lambda: cls.from_json_dict(data))
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"the JSON string is not a saved StudyResult: {exc}") from None
        return _parsed("the JSON string", lambda: cls.from_json_dict(data))

    def save(self, directory: str | Path) -> Path:
        """Writes ``study.json`` and ``study.safetensors`` (exact tensors) into ``directory``.

        Both files are written to a temporary folder and swapped in together, so a failed
        save (a full disk, an interrupt) leaves an earlier save in ``directory`` as it was.
        Other files already in ``directory`` are kept.

        Returns:
            The directory.
        """
        directory = Path(directory)
        tensors: dict[str, torch.Tensor] = {}

        def sweep(r: SweepResult, key: str) -> dict[str, Any]:
            names = {}
            for name, t in r.tensors().items():
                tensors[f"{key}.{name}"] = t
                names[name] = f"{key}.{name}"
            return {"header": encode_floats(r.to_json_dict()), "tensors": names}

        header = self._header(sweep)
        with atomic_directory(directory, keep_others=True) as tmp:
            write_safetensors(tmp / _TENSOR_FILE, tensors, metadata={"format": _FORMAT})
            write_json(tmp / _JSON_FILE, header)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> StudyResult:
        """Reads a study saved by :meth:`save`, or the ``results.json`` of a report folder.

        Raises:
            FileFormatError: The folder holds neither, or a file in it is truncated, corrupt
                or not a saved study; names the file.
        """
        directory = Path(directory)
        if (directory / _JSON_FILE).is_file() and (directory / _TENSOR_FILE).is_file():
            data = read_json(directory / _JSON_FILE, what="saved StudyResult")
            stored = read_safetensors(directory / _TENSOR_FILE, what="saved StudyResult tensors")

            def sweep(entry: Mapping[str, Any]) -> SweepResult:
                return SweepResult.from_parts(
                    decode_floats(entry["header"]),
                    {k: stored[v] for k, v in entry["tensors"].items()},
                )

            return _parsed(directory / _JSON_FILE, lambda: cls._from_header(data, sweep))
        if (directory / _REPORT_JSON).is_file():
            return cls.from_json(directory / _REPORT_JSON)
        raise FileFormatError(
            f"no saved StudyResult in {str(directory)!r}: expected {_JSON_FILE} + {_TENSOR_FILE} "
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
            and self.audit == other.audit
            and json.dumps(encode_floats(self.meta), sort_keys=True)
            == json.dumps(encode_floats(other.meta), sort_keys=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.sweeps.values())
        return f"StudyResult(methods={self.methods}, {n} sweeps)"


def _parsed(where: str | Path, build: Any) -> Any:
    """Runs ``build()``; a malformed structure becomes a :class:`FileFormatError` naming it."""
    try:
        return build()
    except FileFormatError:
        raise
    except (
        UnlearnLensError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        RuntimeError,
    ) as exc:
        name = where if isinstance(where, str) else repr(str(where))
        raise FileFormatError(
            f"{name} is not a saved StudyResult (a field is missing or malformed: "
            f"{type(exc).__name__}: {exc})"
        ) from None
