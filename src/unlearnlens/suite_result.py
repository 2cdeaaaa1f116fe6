"""What a suite returns: :class:`SuiteResult`, one study per concept and method, averaged.

The reference study reports averages over concepts: for every unlearning method, the KRS of
each sweep by layer, averaged over the concepts (10 per model in the paper), with a spread.
A :class:`SuiteResult` holds the per-(concept, method) :class:`~unlearnlens.StudyResult` of
:func:`unlearnlens.run_suite`, turns them into a tidy table and into averaged curves with 95%
bootstrap intervals over concepts, and saves and loads exactly.

On disk a suite is a folder::

    suite.json                        settings and the cases in order
    cases/<concept>/<method>/         one finished study per concept and method:
        study.json, study.safetensors   the StudyResult (exact)
        done.json                       written last: the completion marker

Each ``cases/<concept>/<method>`` folder is written into a temporary folder and renamed into
place only once complete (:func:`unlearnlens._storage.atomic_directory`), with ``done.json``
written last inside it, so a half-written study is never taken as finished.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unlearnlens._storage import (
    atomic_directory,
    decode_floats,
    encode_floats,
    read_json,
    write_json,
)
from unlearnlens.errors import FileFormatError
from unlearnlens.study_result import SWEEPS, StudyResult

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CURVE_SWEEPS", "SuiteResult", "case_folder", "read_unit", "write_unit"]

_FORMAT = "unlearnlens.SuiteResult/1"
_SUITE_FILE = "suite.json"
_DONE_FILE = "done.json"
_CASES = "cases"

CURVE_SWEEPS: tuple[str, ...] = tuple(a for a in SWEEPS if a != "patch_resid")
"""The sweeps averaged over concepts: every KRS sweep by layer (the per-position residual map
has a position axis whose length differs between concepts)."""


def _slug(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "case"
    return f"{readable}-{digest}"


def case_folder(out: str | Path, concept: str, method: str) -> Path:
    """The folder of one concept's study of one method inside a suite folder."""
    return Path(out) / _CASES / _slug(concept) / method


def write_unit(folder: Path, study: StudyResult, marker: dict[str, Any]) -> None:
    """Writes one finished study with its completion marker, atomically."""
    with atomic_directory(folder) as tmp:
        study.save(tmp)
        write_json(tmp / _DONE_FILE, marker)


def read_unit(folder: Path) -> tuple[StudyResult, dict[str, Any]] | None:
    """The study and marker of a finished folder, or None when it is not finished."""
    if not (folder / _DONE_FILE).is_file():
        return None
    marker = read_json(folder / _DONE_FILE, what="suite completion marker")
    return StudyResult.load(folder), marker


def write_suite_file(out: str | Path, meta: dict[str, Any], cases: list[dict[str, Any]]) -> None:
    """Writes ``suite.json``: the settings and the cases (concept, methods) in order."""
    write_json(
        Path(out) / _SUITE_FILE, {"format": _FORMAT, "meta": encode_floats(meta), "cases": cases}
    )


def _bootstrap(
    matrix: np.ndarray, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over rows (concepts) and a percentile bootstrap interval of it, per column."""
    mean = np.nanmean(matrix, axis=0)
    n = matrix.shape[0]
    if n < 2:
        return mean, mean.copy(), mean.copy()
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.nanmean(matrix[idx], axis=1)  # [n_boot, layer]
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boots, [tail, 100 - tail], axis=0)
    return mean, low, high


@dataclass(frozen=True, eq=False)
class SuiteResult:
    """Every study of a suite, by concept and method, with averages over concepts.

    Attributes:
        results: ``results[concept][method]`` is the :class:`~unlearnlens.StudyResult` of
            :func:`unlearnlens.dissect` on that concept's forget prompts and that method's
            unlearned model. Concepts and methods in the suite's order.
        meta: The suite's settings (analyses, window, metric, ...). JSON values only.
        seconds: Wall time of each study (``seconds[concept][method]``, unlearning included
            when the suite trained the model). Not part of equality.
    """

    results: dict[str, dict[str, StudyResult]]
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        """The concepts, in order."""
        return list(self.results)

    @property
    def methods(self) -> list[str]:
        """Every method of any concept, in first-seen order."""
        return list(dict.fromkeys(m for per in self.results.values() for m in per))

    def study(self, concept: str, method: str) -> StudyResult:
        """One concept's study of one method.

        Raises:
            KeyError: No such concept or method; the message lists the names.
        """
        if concept not in self.results:
            raise KeyError(f"no concept {concept!r}; the suite has {self.concepts}")
        if method not in self.results[concept]:
            raise KeyError(f"concept {concept!r} has no method {method!r}")
        return self.results[concept][method]

    # ------------------------------------------------------------------------- tables

    def to_dataframe(self) -> pd.DataFrame:
        """The tidy table: one row per concept, method, sweep and layer.

        Columns ``concept, method, analysis, layer, score``; the sweeps of
        :data:`CURVE_SWEEPS` that ran.
        """
        import pandas as pd

        rows = []
        for concept, per in self.results.items():
            for method, study in per.items():
                for analysis in CURVE_SWEEPS:
                    sweep = study.sweeps.get(method, {}).get(analysis)
                    if sweep is None:
                        continue
                    for layer, score in zip(sweep.axes["layer"], sweep.scores.tolist()):
                        rows.append((concept, method, analysis, int(layer), float(score)))
        return pd.DataFrame(rows, columns=["concept", "method", "analysis", "layer", "score"])

    def curves(self, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Scores by layer averaged over concepts, with a bootstrap interval over concepts.

        For each method and sweep, the mean over concepts of the score at each layer, and the
        ``level`` percentile interval of that mean over ``n_boot`` resamplings of the
        concepts (with replacement). ``method == "pooled"`` averages the methods of each
        concept first, then the concepts: the paper's figures, which pool methods and
        concepts. With one concept the interval is the mean itself.

        Args:
            level: Coverage of the interval.
            n_boot: Bootstrap resamplings.
            seed: Seed of the resampling (the same seed gives the same interval).

        Returns:
            Columns ``method, analysis, layer, mean, low, high, n_concepts``.
        """
        import pandas as pd

        from unlearnlens._checks import check_float, check_int

        check_float(level, "level", positive=True, maximum=0.999999)
        check_int(n_boot, "n_boot", minimum=1)
        table = self.to_dataframe()
        rows = []
        methods = [*self.methods, "pooled"]
        for analysis in CURVE_SWEEPS:
            sub = table[table["analysis"] == analysis]
            if sub.empty:
                continue
            layers = sorted(sub["layer"].unique())
            for method in methods:
                rng = np.random.default_rng(seed)
                if method == "pooled":
                    grid = sub.pivot_table(
                        index="concept", columns="layer", values="score", aggfunc="mean"
                    )
                else:
                    grid = sub[sub["method"] == method].pivot(
                        index="concept", columns="layer", values="score"
                    )
                if grid.empty:
                    continue
                grid = grid.reindex(columns=layers)
                mean, low, high = _bootstrap(grid.to_numpy(dtype=float), n_boot, level, rng)
                for i, layer in enumerate(layers):
                    rows.append((method, analysis, int(layer), mean[i], low[i], high[i], len(grid)))
        return pd.DataFrame(
            rows, columns=["method", "analysis", "layer", "mean", "low", "high", "n_concepts"]
        )

    def report(self, directory: str | Path) -> Path:
        """Writes the HTML report (:func:`unlearnlens.suite_report.write_suite_report`)."""
        from unlearnlens.suite_report import write_suite_report

        return write_suite_report(self, directory)

    # ------------------------------------------------------------------------- save / load

    def save(self, directory: str | Path) -> Path:
        """Writes the suite folder (see the module docstring): exact, JSON + safetensors.

        Returns:
            The directory.
        """
        directory = Path(directory)
        cases = []
        for concept, per in self.results.items():
            for method, study in per.items():
                seconds = self.seconds.get(concept, {}).get(method)
                marker = {"concept": concept, "method": method, "seconds": seconds}
                write_unit(case_folder(directory, concept, method), study, marker)
            cases.append({"concept": concept, "methods": list(per)})
        write_suite_file(directory, self.meta, cases)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, partial: bool = False) -> SuiteResult:
        """Reads a suite folder written by :func:`unlearnlens.run_suite` or :meth:`save`.

        Args:
            directory: The suite folder.
            partial: Return the finished studies only, instead of raising when some are
                missing (a suite still running, or stopped part-way).

        Raises:
            FileFormatError: The folder holds no suite, or (unless ``partial``) a study of
                the suite is not finished; names it.
        """
        directory = Path(directory)
        data = read_json(directory / _SUITE_FILE, what="suite file")
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise FileFormatError(f"{str(directory / _SUITE_FILE)!r} is not a saved suite")

        results: dict[str, dict[str, StudyResult]] = {}
        seconds: dict[str, dict[str, float]] = {}
        for case in data["cases"]:
            concept = case["concept"]
            for method in case["methods"]:
                unit = read_unit(case_folder(directory, concept, method))
                if unit is None:
                    if partial:
                        continue
                    raise FileFormatError(
                        f"suite {str(directory)!r}: the study of concept {concept!r} with "
                        f"method {method!r} is not finished (run the suite again to finish it)"
                    )
                study, marker = unit
                results.setdefault(concept, {})[method] = study
                if marker.get("seconds") is not None:
                    seconds.setdefault(concept, {})[method] = float(marker["seconds"])
        return cls(results=results, meta=decode_floats(data["meta"]), seconds=seconds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SuiteResult):
            return NotImplemented
        return (
            self.concepts == other.concepts
            and all(list(self.results[c]) == list(other.results[c]) for c in self.concepts)
            and self.results == other.results
            and json.dumps(encode_floats(self.meta), sort_keys=True)
            == json.dumps(encode_floats(other.meta), sort_keys=True)
        )

    __hash__ = None  # type: ignore[assignment]
