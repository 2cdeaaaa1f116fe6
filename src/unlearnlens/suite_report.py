"""The suite's HTML report: averaged KRS curves with bands, and a per-concept grid.

:func:`write_suite_report` writes into one folder:

* ``index.html``: a self-contained page (inline style, nothing fetched) with the settings,
  the averaged-curve figure, a table of each method's peak mean score per sweep with its
  interval, and the per-concept grid;
* ``averaged.png``: one panel per sweep, one line per method (and the pooled mean) of the
  score by layer averaged over concepts, with its 95% bootstrap band;
* ``concepts.png``: one row per concept, one column per sweep, one line per method;
* ``scores.csv`` and ``curves.csv``: the tidy table and the averaged curves.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so pyplot's
global state is never touched; matplotlib is imported only here (the ``plot`` extra).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from unlearnlens._storage import atomic_directory, atomic_file, write_text
from unlearnlens.study_result import SWEEPS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from unlearnlens.suite_result import SuiteResult

__all__ = ["write_suite_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.88em; } th, td { border: 1px solid #ccc;
padding: 0.25em 0.6em; text-align: right; } th { background: #f3f3f3; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: 0.9em; }
"""


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path.name


def _averaged(result: SuiteResult, curves, analyses: list[str], path: Path) -> str:
    from matplotlib.figure import Figure

    cols = min(3, len(analyses))
    rows = -(-len(analyses) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    methods = [*result.methods, "pooled"]
    for k, analysis in enumerate(analyses):
        ax = axes[k // cols][k % cols]
        for i, method in enumerate(methods):
            sub = curves[(curves["analysis"] == analysis) & (curves["method"] == method)]
            if sub.empty:
                continue
            style = {"color": "black", "ls": "--"} if method == "pooled" else {"color": f"C{i}"}
            ax.plot(sub["layer"], sub["mean"], marker="o", ms=3, label=method, **style)
            ax.fill_between(sub["layer"], sub["low"], sub["high"], alpha=0.18, color=style["color"])
        ax.axhline(0.0, color="grey", ls=":", lw=1)
        ax.axhline(1.0, color="grey", ls="-", lw=0.6)
        ax.set_title(analysis, fontsize=10)
        ax.set_xlabel("layer (window centre)")
        ax.set_ylabel("mean score over concepts")
        ax.legend(fontsize="x-small")
    for k in range(len(analyses), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    return _save(fig, path)


def _grid(result: SuiteResult, table, analyses: list[str], path: Path) -> str:
    from matplotlib.figure import Figure

    concepts = result.concepts
    fig = Figure(figsize=(2.6 * len(analyses), 1.9 * len(concepts)))
    axes = fig.subplots(len(concepts), len(analyses), squeeze=False, sharey=True)
    for r, concept in enumerate(concepts):
        for c, analysis in enumerate(analyses):
            ax = axes[r][c]
            for i, method in enumerate(result.methods):
                sub = table[
                    (table["concept"] == concept)
                    & (table["analysis"] == analysis)
                    & (table["method"] == method)
                ]
                if not sub.empty:
                    ax.plot(sub["layer"], sub["score"], lw=1.2, color=f"C{i}", label=method)
            if r == 0:
                ax.set_title(analysis, fontsize=8)
            if c == 0:
                ax.set_ylabel(concept, fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)


def write_suite_report(result: SuiteResult, directory: str | Path) -> Path:
    """Writes the suite's report folder (see the module docstring); returns ``index.html``.

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    import matplotlib  # noqa: F401  (fail early, with the package's own message)

    final = Path(directory)
    with atomic_directory(final, keep_others=True) as directory:
        _write_into(result, directory)
    return final / "index.html"


def _write_into(result: SuiteResult, directory: Path) -> None:
    table = result.to_dataframe()
    curves = result.curves()
    write_text(directory / "scores.csv", table.to_csv(index=False))
    write_text(directory / "curves.csv", curves.to_csv(index=False))
    analyses = [a for a in SWEEPS if a in set(table["analysis"])]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>unlearnlens suite</title>",
        f"<style>{_STYLE}</style></head><body><h1>Unlearning suite</h1>",
        f"<p>{len(result.concepts)} concepts x {len(result.methods)} methods "
        f"({html.escape(', '.join(result.methods))}); settings: "
        f"{html.escape(str({k: v for k, v in result.meta.items() if k != 'capability'}))}</p>",
    ]
    if analyses:
        name = _averaged(result, curves, analyses, directory / "averaged.png")
        parts.append(
            f"<figure><img src='{name}' alt='averaged curves'><figcaption>Score by layer "
            "averaged over concepts, per method and pooled (dashed), with a 95% bootstrap "
            "interval over concepts. KRS 0 is the unlearned model, 1 the base model's output "
            "recovered.</figcaption></figure>"
        )
        peaks = (
            curves.sort_values("mean", ascending=False)
            .groupby(["analysis", "method"], sort=False)
            .head(1)
            .set_index(["analysis", "method"])
            .sort_index()
        )
        parts.append("<h2>Peak of the mean curve</h2><table><tr><th>sweep</th><th>method</th>")
        parts.append("<th>layer</th><th>mean</th><th>95% interval</th></tr>")
        for (analysis, method), row in peaks.iterrows():
            parts.append(
                f"<tr><td>{html.escape(analysis)}</td><td>{html.escape(method)}</td>"
                f"<td>{int(row['layer'])}</td><td>{row['mean']:.3f}</td>"
                f"<td>[{row['low']:.3f}, {row['high']:.3f}]</td></tr>"
            )
        parts.append("</table>")
        name = _grid(result, table, analyses, directory / "concepts.png")
        parts.append(
            f"<h2>Per concept</h2><figure><img src='{name}' alt='per-concept grid'>"
            "<figcaption>One row per concept, one column per sweep.</figcaption></figure>"
        )
    else:
        parts.append("<p>No layer sweeps ran.</p>")
    parts.append("<p>Data: <a href='scores.csv'>scores.csv</a>, ")
    parts.append("<a href='curves.csv'>curves.csv</a>.</p></body></html>")
    write_text(directory / "index.html", "\n".join(parts))
