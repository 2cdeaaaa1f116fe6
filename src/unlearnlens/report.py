"""The study's HTML report: summary and behaviour tables, figures, and the full results as JSON.

:func:`write_report` writes into one folder:

* ``index.html``: a self-contained page (inline style, no scripts, nothing fetched) with the
  summary table (peak KRS per method and sweep), the behaviour table, the figures with a
  caption on how to read each, and the top neurons of each coefficient comparison;
* the figures as PNG files beside it, referenced by relative paths: KRS by layer (one panel
  per sweep, one line per method), the per-position residual patching heatmaps, the logit lens
  and the coefficient comparison by layer;
* ``results.json``: the whole :class:`~unlearnlens.study.StudyResult`, tensors included, as
  standard JSON (float32 values are stored as exact decimal floats), so that
  ``StudyResult.load(folder)`` gives back a result equal to the one reported.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so writing a
report never changes pyplot's global backend or state.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearnlens._storage import atomic_directory, atomic_file, check_writable, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from unlearnlens.study import StudyResult

__all__ = ["write_report"]

_KRS_CAPTION = (
    "Knowledge Recovery Score (KRS) after putting the base model's {what} back into each "
    "unlearned model, one point per layer window. KRS 0 is the unlearned model's own output; "
    "KRS 1 means the base model's output is fully recovered. A curve that rises towards 1 "
    "says the unlearned model still holds the knowledge and only the patched part hides it."
)
_WHAT = {
    "patch_mlp": "MLP coefficients (mlp.hook_post, the weights of the W_out value vectors)",
    "patch_attn": "attention outputs (hook_attn_out)",
    "patch_mlp_attn": "MLP coefficients and attention outputs together",
    "restore_w_out": "MLP value vectors (mlp.W_out parameters)",
    "restore_mlp": "MLP parameters",
    "restore_attn": "attention parameters",
}

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 900px; }
.meta { font-size: 0.9em; color: #555; }
"""


def _slug(text: str, index: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40]
    return f"{index}-{safe}" if safe else str(index)


def _save(fig: Figure, directory: Path, name: str) -> str:
    fig.tight_layout()
    with atomic_file(directory / name) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return name


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))  # Agg canvas by default; pyplot untouched


def _krs_curves(study: StudyResult, directory: Path) -> tuple[str, list[str]] | None:
    analyses = [a for a in _WHAT if any(a in s for s in study.sweeps.values())]
    if not analyses:
        return None
    cols = min(3, len(analyses))
    rows = -(-len(analyses) // cols)
    fig = _new_figure(4.6 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, analysis in enumerate(analyses):
        ax = axes[k // cols][k % cols]
        metric = "score"
        for i, (method, sweeps) in enumerate(study.sweeps.items()):
            if analysis not in sweeps:
                continue
            r = sweeps[analysis]
            metric = r.metric
            ax.plot(
                r.axes["layer"], r.scores.numpy(), marker="o", ms=3.5, color=f"C{i}", label=method
            )
        if metric == "krs":
            ax.axhline(0.0, color="grey", ls=":", lw=1, label="unlearned model (0)")
            ax.axhline(1.0, color="black", ls="--", lw=1, label="base model (1)")
        ax.set_title(analysis, fontsize=10)
        _integer_ticks(ax)
        ax.set_xlabel("layer (window centre)")
        ax.set_ylabel(metric)
        ax.legend(fontsize="x-small")
    for k in range(len(analyses), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    name = _save(fig, directory, "krs_by_layer.png")
    return name, analyses


def _resid_heatmaps(study: StudyResult, directory: Path) -> str | None:
    methods = [m for m, s in study.sweeps.items() if "patch_resid" in s]
    if not methods:
        return None
    cols = min(2, len(methods))
    rows = -(-len(methods) // cols)
    fig = _new_figure(6.5 * cols, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, method in enumerate(methods):
        study.sweeps[method]["patch_resid"].plot(ax=axes[k // cols][k % cols], title=method)
    for k in range(len(methods), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    return _save(fig, directory, "patch_resid_heatmaps.png")


def _lens_curves(study: StudyResult, directory: Path) -> str | None:
    lenses = [(m, s["logit_lens"]) for m, s in study.sweeps.items() if "logit_lens" in s]
    if study.base_lens is None and not lenses:
        return None
    fig = _new_figure(6.5, 3.8)
    ax = fig.subplots()
    if study.base_lens is not None:
        r = study.base_lens
        ax.plot(
            r.axes["layer"], r.scores.numpy(), color="black", lw=2, marker="o", ms=3.5, label="base"
        )
    for i, (method, r) in enumerate(lenses):
        ax.plot(r.axes["layer"], r.scores.numpy(), marker="o", ms=3.5, color=f"C{i}", label=method)
    _integer_ticks(ax)
    ax.set_xlabel("layer (residual stream after the block)")
    ax.set_ylabel("mean answer log-prob")
    ax.set_title("logit lens")
    ax.legend(fontsize="small")
    return _save(fig, directory, "logit_lens.png")


def _coefficient_curves(study: StudyResult, directory: Path) -> str | None:
    if not study.coefficients:
        return None
    fig = _new_figure(13.0, 3.6)
    ax0, ax1, ax2 = fig.subplots(1, 3)
    for i, (method, tables) in enumerate(study.coefficients.items()):
        t = tables.layers
        kw = {"marker": "o", "ms": 3.5, "color": f"C{i}", "label": method}
        ax0.plot(t["layer"], t["relative_shift"], **kw)
        ax1.plot(t["layer"], t["cosine"], **kw)
        ax2.plot(t["layer"], t["logit_share"], **kw)
        ax2.plot(t["layer"], t["coefficient_share"], ls="--", color=f"C{i}", lw=1)
    ax0.set_title("||c_unlearned - c_base|| / ||c_base||", fontsize=10)
    ax1.set_title("cosine(c_base, c_unlearned)", fontsize=10)
    ax2.set_title("share of the answer-logit change", fontsize=10)
    ax2.axhline(0.0, color="grey", lw=0.8)
    for ax in (ax0, ax1, ax2):
        _integer_ticks(ax)
        ax.set_xlabel("layer")
        ax.legend(fontsize="x-small")
    return _save(fig, directory, "coefficients_by_layer.png")


def _figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption[:80])}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(frame: Any) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.4g}", na_rep="–", border=0)


def _audit_section(audit: Any, directory: Path) -> list[str]:
    """The audit's table and its recovered-fraction figure."""
    frame = audit.to_dataframe()
    fig = _new_figure(8.0, 3.8)
    audit.plot(ax=fig.subplots())
    name = _save(fig, directory, "audit_recovered.png")
    return [
        "<h2>Is it really gone? Recovery attacks and memorisation metrics</h2>",
        "<p>Every probe on the same forget prompts. Metric probes score the base and the "
        "unlearned model (membership AUCs: 1 = the forget set looks trained on, 0.5 = "
        "indistinguishable from the holdout set). Attack probes also score the attacked "
        "unlearned model; recovered = (attacked - unlearned) / (base - unlearned) is the share "
        "of the forgotten knowledge the attack brings back (0 = none, 1 = all).</p>",
        _table(frame),
        _figure(
            name,
            "Recovered fraction of the forget-set knowledge for each attack and unlearned "
            "model. Bars near 1 mean the attack undoes the unlearning; bars near 0 mean the "
            "knowledge stays hidden from that attack.",
        ),
    ]


def write_report(study: StudyResult, directory: str | Path) -> Path:
    """Writes the study's HTML report, its figures and ``results.json`` into ``directory``.

    Args:
        study: The result of :func:`unlearnlens.dissect`.
        directory: The report folder (created if missing). The report is written to a
            temporary folder and swapped in once complete, so a failed write leaves an earlier
            report there as it was; other files in the folder are kept.

    Returns:
        The path of ``index.html``.

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
        FileFormatError: ``directory`` cannot be written.
    """
    import matplotlib  # noqa: F401  (fail early, with the package's own message)

    final = check_writable(directory, what="report folder")
    with atomic_directory(final, keep_others=True) as directory:
        _write_into(study, directory)
    return final / "index.html"


def _write_into(study: StudyResult, directory: Path) -> None:
    write_text(directory / "results.json", study.to_json())

    meta = study.meta
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>unlearnlens report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Unlearning study: forgotten, or hidden?</h1>",
        '<p class="meta">'
        + html.escape(
            f"base model: {meta.get('base', '?')} · methods: {', '.join(study.methods)} · "
            f"window: {meta.get('window', '?')} layers · metric: {meta.get('metric', '?')} · "
            f"{meta.get('n_prompts', '?')} forget prompts"
        )
        + "</p>",
    ]

    summary = study.summary()
    if len(summary):
        parts += [
            "<h2>Summary</h2>",
            "<p>For each unlearned model and each sweep: the highest score over layers, the "
            "layer (window centre) where it is reached, and the mean over layers. With KRS, 0 "
            "is the unlearned model and 1 the base model: high peaks for patched activations "
            "with low scores for restored value vectors mean the knowledge is still stored and "
            "only its retrieval changed.</p>",
            _table(summary),
        ]
    if study.evaluation is not None:
        parts += [
            "<h2>Behaviour</h2>",
            "<p>Per model and split: greedy accuracy, mean answer log-probability and "
            "probability; exact_match and rouge_l compare each model's greedy generations with "
            "the base model's (1 = unchanged); capability is perplexity on probe texts (lower "
            "is better) or task accuracy.</p>",
            _table(study.evaluation.table),
        ]

    figures = []
    krs = _krs_curves(study, directory)
    if krs is not None:
        name, analyses = krs
        whats = "; ".join(f"{a}: {_WHAT[a]}" for a in analyses)
        figures.append(
            _figure(
                name, _KRS_CAPTION.format(what="activations or parameters") + f" Panels — {whats}."
            )
        )
    resid = _resid_heatmaps(study, directory)
    if resid is not None:
        figures.append(
            _figure(
                resid,
                "Residual stream (resid_pre) patched from the base model at one layer and one "
                "token position at a time. Colour is KRS: 0 = the unlearned model, 1 = the base "
                "model's output recovered. Cells that light up show where (depth and position) "
                "the information that unlearning changed enters the computation.",
            )
        )
    lens = _lens_curves(study, directory)
    if lens is not None:
        figures.append(
            _figure(
                lens,
                "Logit lens: the answer's mean log-probability read from the residual stream "
                "after each layer through the model's own final norm and unembedding. An "
                "unlearned curve that follows the base model's through the middle layers and "
                "drops only at the end computes the answer and then suppresses it.",
            )
        )
    coef = _coefficient_curves(study, directory)
    if coef is not None:
        figures.append(
            _figure(
                coef,
                "MLP coefficients of the unlearned models against the base model's, at the "
                "positions that predict the answer: relative shift and cosine per layer, and "
                "each layer's share of the change of the answer logit (solid: total, dashed: "
                "the coefficients alone, with the base model's weights held fixed).",
            )
        )
    if figures:
        parts += ["<h2>Figures</h2>", *figures]

    if study.coefficients:
        parts.append("<h2>Neurons whose change moves the answer most</h2>")
        for method, tables in study.coefficients.items():
            parts += [
                f"<h3>{html.escape(method)}</h3>",
                html.escape(
                    f"mean answer logit {tables.base_logit:.4g} (base) → "
                    f"{tables.unlearned_logit:.4g} (unlearned)"
                ),
                _table(tables.top_by_logit.head(10)),
            ]
    if study.audit is not None:
        parts += _audit_section(study.audit, directory)
    parts += [
        "<h2>Data</h2>",
        '<p>Every number of this report is in <a href="results.json">results.json</a>; '
        "<code>unlearnlens.StudyResult.load(folder)</code> reads it back.</p>",
        "</body></html>",
    ]
    write_text(directory / "index.html", "\n".join(parts))
