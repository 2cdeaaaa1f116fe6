"""What an audit returns: :class:`AuditResult`, one row per unlearned model and probe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearnlens._storage import decode_floats, encode_floats, read_json, write_json
from unlearnlens.errors import FileFormatError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = ["AuditResult", "AuditRow"]

_FORMAT = "unlearnlens.AuditResult/1"
COLUMNS = ("kind", "metric", "base", "unlearned", "attacked", "recovered")


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass(frozen=True)
class AuditRow:
    """One probe's scores for one unlearned model.

    Attributes:
        method: The unlearned model's name.
        probe: The probe's name.
        kind: ``"metric"`` or ``"attack"``.
        metric: What the scores mean.
        base: The base model's score.
        unlearned: The unlearned model's score.
        attacked: The attacked unlearned model's score (NaN for metric probes).
        details: The probe's extra numbers (JSON values).
    """

    method: str
    probe: str
    kind: str
    metric: str
    base: float
    unlearned: float
    attacked: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def recovered(self) -> float:
        """``(attacked - unlearned) / (base - unlearned)``: the share of the gap the attack closes.

        0 = the attack changes nothing, 1 = the base model's score is back; NaN for metric
        probes and where base and unlearned score the same.
        """
        gap = self.base - self.unlearned
        if math.isnan(self.attacked) or math.isnan(gap) or gap == 0:
            return math.nan
        return (self.attacked - self.unlearned) / gap

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready data (non-finite floats as ``{"$float": ...}``)."""
        return encode_floats(
            {
                "method": self.method,
                "probe": self.probe,
                "kind": self.kind,
                "metric": self.metric,
                "base": float(self.base),
                "unlearned": float(self.unlearned),
                "attacked": float(self.attacked),
                "details": self.details,
            }
        )

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> AuditRow:
        """Inverse of :meth:`to_json_dict`."""
        d = decode_floats(data)
        return cls(
            method=str(d["method"]),
            probe=str(d["probe"]),
            kind=str(d["kind"]),
            metric=str(d["metric"]),
            base=float(d["base"]),
            unlearned=float(d["unlearned"]),
            attacked=float(d["attacked"]),
            details=dict(d.get("details", {})),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditRow):
            return NotImplemented
        return (
            (self.method, self.probe, self.kind, self.metric)
            == (other.method, other.probe, other.kind, other.metric)
            and all(
                _same(a, b)
                for a, b in [
                    (self.base, other.base),
                    (self.unlearned, other.unlearned),
                    (self.attacked, other.attacked),
                ]
            )
            and encode_floats(self.details) == encode_floats(other.details)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class AuditResult:
    """Every probe of an audit, for every unlearned model, on one scale.

    Attributes:
        rows: One row per (unlearned model, probe), models in order, probes in order.
        meta: What was audited: methods, probes, prompt counts, the knowledge metric, the
            probes left out and why. JSON values only.
    """

    rows: tuple[AuditRow, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The unlearned models' names, in order."""
        return list(dict.fromkeys(r.method for r in self.rows))

    @property
    def probes(self) -> list[str]:
        """The probes' names, in order."""
        return list(dict.fromkeys(r.probe for r in self.rows))

    def __getitem__(self, key: tuple[str, str]) -> AuditRow:
        """The row of ``(method, probe)``.

        Raises:
            KeyError: No such row; the message lists the methods and probes.
        """
        for r in self.rows:
            if (r.method, r.probe) == key:
                return r
        raise KeyError(f"no row {key!r}; methods: {self.methods}, probes: {self.probes}")

    def to_dataframe(self) -> pd.DataFrame:
        """The table: index ``(method, probe)``; columns kind, metric and the four scores."""
        import pandas as pd

        frame = pd.DataFrame(
            [
                {
                    "method": r.method,
                    "probe": r.probe,
                    **{c: getattr(r, c) for c in COLUMNS},
                }
                for r in self.rows
            ],
            columns=["method", "probe", *COLUMNS],
        )
        return frame.set_index(["method", "probe"])

    def plot(self, ax: Axes | None = None, *, title: str | None = None) -> Axes:
        """Recovered fraction of every attack probe, one bar per unlearned model.

        Args:
            ax: The axes to draw on (a new figure's when ``None``).
            title: The title (default ``"knowledge recovered by each attack"``).

        Returns:
            The axes.
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(8, 3.6))
        attacks = [
            p for p in self.probes if any(r.kind == "attack" and r.probe == p for r in self.rows)
        ]
        methods = self.methods
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            values = []
            for p in attacks:
                try:
                    values.append(self[(m, p)].recovered)
                except KeyError:
                    values.append(math.nan)
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(attacks))]
            ax.bar(xs, values, width=width, label=m, color=f"C{i}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_ylabel("recovered fraction")
        ax.set_title(title or "knowledge recovered by each attack")
        if methods:
            ax.legend(fontsize="small")
        return ax

    # ------------------------------------------------------------------------- save / load

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready data; floats are stored exactly (Python's shortest round-trip repr)."""
        return {
            "format": _FORMAT,
            "rows": [r.to_json_dict() for r in self.rows],
            "meta": encode_floats(self.meta),
        }

    @classmethod
    def from_json_dict(cls, data: Any, *, what: str = "audit result") -> AuditResult:
        """Inverse of :meth:`to_json_dict`.

        Raises:
            FileFormatError: The data is not a saved audit result.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise FileFormatError(f"{what} is not a saved AuditResult (format {found!r})")
        try:
            rows = tuple(AuditRow.from_json_dict(r) for r in data["rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{what} has a malformed row: {e}") from None
        return cls(rows=rows, meta=decode_floats(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        """Writes the result as one JSON file (atomically); returns the path."""
        return write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | Path) -> AuditResult:
        """Reads a result written by :meth:`save`.

        Raises:
            FileFormatError: The file is missing, corrupt, or not an audit result.
        """
        return cls.from_json_dict(
            read_json(path, what="audit result"), what=f"audit result {str(path)!r}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditResult):
            return NotImplemented
        return self.rows == other.rows and encode_floats(self.meta) == encode_floats(other.meta)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AuditResult(methods={self.methods}, probes={self.probes})"
