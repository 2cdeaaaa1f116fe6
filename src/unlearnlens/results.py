"""Sweep results: scores with named axes, saved and loaded without loss."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from unlearnlens._storage import read_safetensors, read_safetensors_metadata, write_safetensors
from unlearnlens.errors import FileFormatError, UnlearnLensError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = ["SweepResult", "json_ready"]

_FORMAT = "unlearnlens.SweepResult/1"


def json_ready(value: Any) -> Any:
    """JSON-ready copy of axis values and metadata (tuples become lists, tensors lists)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Scores of a sweep (patching, restoration, a probe) along named axes.

    Attributes:
        scores: Mean score over prompts for each point of the sweep; its dimensions are named
            by ``axes`` in order, e.g. ``[layer]`` or ``[layer, pos]``. Float32 on the CPU.
        axes: Ordered mapping from axis name to the labels along it (``{"layer": [0, 1, ...]}``).
        metric: The metric's name (``"krs"``, ``"answer_logprob"``, a custom function's name).
        baseline: The unpatched target model's score (KRS: 0 by definition).
        reference: The source model's score (KRS: 1 by definition).
        meta: Free-form description of the sweep (hooks, window, positions, models, ...); JSON
            values only.
        per_prompt: Optional per-prompt scores, shape ``[*scores.shape, batch]`` (NaN where a
            prompt is left out, e.g. KRS with source = target).
    """

    scores: Float[Tensor, "..."]
    axes: dict[str, list[Any]]
    metric: str
    baseline: float
    reference: float
    meta: dict[str, Any] = field(default_factory=dict)
    per_prompt: Float[Tensor, "..."] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", self.scores.detach().float().cpu())
        object.__setattr__(
            self, "axes", {str(k): json_ready(list(v)) for k, v in self.axes.items()}
        )
        object.__setattr__(self, "meta", json_ready(dict(self.meta)))
        object.__setattr__(self, "baseline", float(self.baseline))
        object.__setattr__(self, "reference", float(self.reference))
        shape = tuple(len(v) for v in self.axes.values())
        if tuple(self.scores.shape) != shape:
            raise UnlearnLensError(
                f"scores of shape {tuple(self.scores.shape)} do not match the axes "
                f"{ {k: len(v) for k, v in self.axes.items()} }"
            )
        if self.per_prompt is not None:
            pp = self.per_prompt.detach().float().cpu()
            if tuple(pp.shape[:-1]) != shape:
                raise UnlearnLensError(
                    f"per_prompt of shape {tuple(pp.shape)} must be scores' shape {shape} plus a "
                    "prompt axis"
                )
            object.__setattr__(self, "per_prompt", pp)

    # ------------------------------------------------------------------------------ access

    @property
    def dims(self) -> tuple[str, ...]:
        """The axis names, in the order of ``scores``' dimensions."""
        return tuple(self.axes)

    def peak(self) -> tuple[dict[str, Any], float]:
        """Where the score is highest (NaNs ignored), as ``({axis: label}, score)``."""
        flat = torch.nan_to_num(self.scores, nan=-math.inf).flatten()
        i = int(flat.argmax())
        labels = {}
        for name, size in reversed([(k, len(v)) for k, v in self.axes.items()]):
            labels[name] = self.axes[name][i % size]
            i //= size
        labels = {k: labels[k] for k in self.axes}
        return labels, float(self.scores.flatten()[int(flat.argmax())])

    def to_dataframe(self) -> pd.DataFrame:
        """A long table: a column per axis plus ``score``; metric, baseline, reference in attrs."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(len(v)) for v in self.axes.values()], indexing="ij")
        data = {
            name: [labels[int(i)] for i in grid.flatten()]
            for (name, labels), grid in zip(self.axes.items(), grids)
        }
        data["score"] = self.scores.flatten().tolist()
        frame = pd.DataFrame(data)
        frame.attrs.update(metric=self.metric, baseline=self.baseline, reference=self.reference)
        return frame

    def _default_label(self) -> str | None:
        """What a sweep's line is called when no ``label`` is given."""
        if self.meta.get("name"):
            return str(self.meta["name"])
        kind = self.meta.get("kind")
        if kind == "patch" and self.meta.get("hooks"):
            return "patch " + "+".join(self.meta["hooks"])
        if kind == "restore" and self.meta.get("components"):
            names = self.meta["components"]
            return "restore " + ("+".join(names) if len(names) <= 3 else f"{len(names)} tensors")
        if kind == "logit_lens" and self.meta.get("model"):
            return f"logit lens ({self.meta['model']})"
        return None

    def plot(
        self, ax: Axes | None = None, *, label: str | None = None, title: str | None = None
    ) -> Axes:
        """Draws the sweep on ``ax`` (a new figure's axes by default) and returns the Axes.

        One axis: a line over it (``layer`` or ``variant``), with the unlearned model's score
        (``baseline``, "unlearned") and the base model's (``reference``, "base") as horizontal
        lines; several sweeps drawn on the same Axes share those legend entries. Two axes
        (``layer x pos``): a heatmap in a diverging map centred at 0 (white = the unlearned
        model's KRS), NaN cells (positions a prompt set lacks) in grey, and at most about 16
        labelled ticks per axis.

        Args:
            ax: The matplotlib Axes to draw on.
            label: The line's legend entry (default: the sweep's ``meta["name"]`` or what it
                patched or restored).
            title: The Axes title (default: ``meta["name"]``, if any).
        """
        import matplotlib.pyplot as plt

        if self.scores.ndim not in (1, 2):
            raise UnlearnLensError(f"plot() draws 1 or 2 axes; this result has {self.scores.ndim}")
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5) if self.scores.ndim == 1 else (7, 4))
        if self.scores.ndim == 1:
            self._plot_line(ax, label)
        else:
            self._plot_heatmap(ax)
        if title or self.meta.get("name"):
            ax.set_title(title or str(self.meta.get("name")))
        return ax

    def _plot_line(self, ax: Axes, label: str | None) -> None:
        name = next(iter(self.axes))
        x = [str(v) for v in self.axes[name]] if name == "variant" else self.axes[name]
        drawn = set(ax.get_legend_handles_labels()[1])  # several sweeps on one Axes
        line_label = label or self._default_label()
        if line_label in drawn:
            line_label = f"{line_label} ({sum(lab.startswith(line_label) for lab in drawn) + 1})"
        ax.plot(x, self.scores.numpy(), marker="o", label=line_label)
        if self.meta.get("kind") == "logit_lens":
            lines = [(self.baseline, "grey", ":", "model output (last layer)")]
        else:
            lines = [
                (self.baseline, "grey", ":", "unlearned"),
                (self.reference, "black", "--", "base"),
            ]
        for value, color, style, text in lines:
            if math.isnan(value):
                continue
            existing = [
                line
                for line in ax.get_lines()
                if line.get_label() == text and list(line.get_ydata()) == [value, value]
            ]
            if existing:
                continue  # the same reference line is drawn once
            ax.axhline(
                value, color=color, ls=style, lw=1, label=text if text not in drawn else None
            )
            drawn.add(text)
        ax.set_xlabel(name)
        ax.set_ylabel(self.metric)
        if name == "variant":
            ax.tick_params(axis="x", labelrotation=30)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
        ax.legend(fontsize="small")

    def _plot_heatmap(self, ax: Axes) -> None:
        import matplotlib.pyplot as plt

        rows, cols = list(self.axes)
        values = self.scores.numpy()
        finite = self.scores[self.scores.isfinite()]
        extent = [abs(self.baseline), abs(self.reference)]
        if finite.numel():
            extent.append(float(finite.abs().max()))
        half = max((e for e in extent if math.isfinite(e)), default=1.0) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
        im = ax.imshow(
            values,
            aspect="auto",
            cmap=cmap,
            origin="lower",
            vmin=-half,
            vmax=half,
            interpolation="nearest",
        )
        ax.set_ylabel(rows)
        ax.set_xlabel(cols)
        for axis, labels in ((ax.yaxis, self.axes[rows]), (ax.xaxis, self.axes[cols])):
            step = max(1, math.ceil(len(labels) / 16))
            ticks = list(range(0, len(labels), step))
            axis.set_ticks(ticks, [str(labels[i]) for i in ticks])
        if any(isinstance(v, str) for v in self.axes[cols]):
            ax.tick_params(axis="x", labelrotation=60)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
        ax.figure.colorbar(im, ax=ax, label=self.metric)

    # --------------------------------------------------------------------------- save / load

    def to_json_dict(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-ready (used by save and by study reports)."""
        return {
            "format": _FORMAT,
            "axes": self.axes,
            "metric": self.metric,
            "baseline": self.baseline,
            "reference": self.reference,
            "meta": self.meta,
        }

    def tensors(self) -> dict[str, Tensor]:
        """The tensors to store: ``scores`` and, if present, ``per_prompt``."""
        out = {"scores": self.scores.contiguous()}
        if self.per_prompt is not None:
            out["per_prompt"] = self.per_prompt.contiguous()
        return out

    @classmethod
    def from_parts(cls, header: dict[str, Any], tensors: dict[str, Tensor]) -> SweepResult:
        """Rebuilds a result from :meth:`to_json_dict` and :meth:`tensors` output."""
        if header.get("format") != _FORMAT:
            raise UnlearnLensError(f"not a saved SweepResult (format {header.get('format')!r})")
        return cls(
            scores=tensors["scores"],
            axes=header["axes"],
            metric=header["metric"],
            baseline=header["baseline"],
            reference=header["reference"],
            meta=header["meta"],
            per_prompt=tensors.get("per_prompt"),
        )

    def save(self, path: str | Path) -> Path:
        """Writes one ``.safetensors`` file: exact tensors plus a JSON header. Returns the path.

        The file is written beside ``path`` and renamed into place, so a failed save leaves an
        earlier file at ``path`` as it was.
        """
        return write_safetensors(
            path, self.tensors(), metadata={"unlearnlens": json.dumps(self.to_json_dict())}
        )

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Reads a file written by :meth:`save`.

        Raises:
            FileFormatError: The file is missing, truncated, corrupt or not a saved
                ``SweepResult``; names the file.
        """
        path = Path(path)
        what = "saved SweepResult"
        meta = read_safetensors_metadata(path, what=what)
        tensors = read_safetensors(path, what=what)
        try:
            header = json.loads(meta.get("unlearnlens", "{}"))
            return cls.from_parts(header, tensors)
        except (UnlearnLensError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{str(path)!r} is not a saved SweepResult: {exc}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SweepResult):
            return NotImplemented
        same_pp = (self.per_prompt is None and other.per_prompt is None) or (
            self.per_prompt is not None
            and other.per_prompt is not None
            and torch.equal(self.per_prompt.nan_to_num(7.0), other.per_prompt.nan_to_num(7.0))
            and torch.equal(self.per_prompt.isnan(), other.per_prompt.isnan())
        )
        return (
            self.axes == other.axes
            and self.metric == other.metric
            and _same_float(self.baseline, other.baseline)
            and _same_float(self.reference, other.reference)
            and self.meta == other.meta
            and torch.equal(self.scores.isnan(), other.scores.isnan())
            and torch.equal(self.scores.nan_to_num(7.0), other.scores.nan_to_num(7.0))
            and same_pp
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shape = " x ".join(f"{k}[{len(v)}]" for k, v in self.axes.items())
        where, best = self.peak()
        return (
            f"SweepResult({self.metric} over {shape}; baseline {self.baseline:.4g}, reference "
            f"{self.reference:.4g}, peak {best:.4g} at {where})"
        )
