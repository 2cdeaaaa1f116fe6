"""Notebook conventions: one progress switch, plots that take ax= and return it, dtype names."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens import _progress


@pytest.fixture
def pair():
    base = build_model("gpt2", seed=1)
    return base, perturbed(base, 0.15, seed=2)


@pytest.fixture(autouse=True)
def _reset_switch(monkeypatch):
    monkeypatch.delenv(_progress.ENV_VAR, raising=False)
    yield
    ul.set_progress(None)
    plt.close("all")


# --------------------------------------------------------------------------------- progress

CALLS = {
    "patch": lambda b, u, **kw: ul.patch(b, u, PAIRS, hooks="mlp.hook_post", **kw),
    "patch_residual": lambda b, u, **kw: ul.patch_residual(b, u, PAIRS, **kw),
    "restore_sweep": lambda b, u, **kw: ul.restore_sweep(b, u, PAIRS, **kw),
    "score": lambda b, u, **kw: ul.score(b, u, PAIRS, metric="answer_logprob", **kw),
    "logit_lens": lambda b, u, **kw: ul.logit_lens(u, PAIRS, **kw),
    "compare_coefficients": lambda b, u, **kw: ul.compare_coefficients(b, u, PAIRS, **kw),
    "evaluate": lambda b, u, **kw: ul.evaluate(u, forget=PAIRS, **kw),
    "dissect": lambda b, u, **kw: ul.dissect(b, u, PAIRS, analyses=["patch_mlp"], **kw),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_one_switch_for_every_bar(pair, name, capsys, monkeypatch):
    base, unlearned = pair
    call = CALLS[name]
    call(base, unlearned, batch_size=2)  # default: on (several batches, so a bar is drawn)
    assert "it/s]" in capsys.readouterr().err or name == "evaluate"
    ul.set_progress(False)
    call(base, unlearned, batch_size=2)
    assert capsys.readouterr().err == ""
    call(base, unlearned, batch_size=2, progress=True)  # an explicit argument wins
    assert "it/s]" in capsys.readouterr().err
    ul.set_progress(None)
    monkeypatch.setenv(_progress.ENV_VAR, "0")
    call(base, unlearned, batch_size=2)
    assert capsys.readouterr().err == ""


def test_progress_is_checked_and_defaults_to_none():
    import inspect

    for fn in (ul.patch, ul.patch_residual, ul.patch_mlp_coefficients, ul.patch_attention,
               ul.restore_sweep, ul.score, ul.dissect, ul.evaluate, ul.logit_lens,
               ul.logit_lens_compare, ul.compare_coefficients, ul.mlp_coefficients,
               ul.attribution_patch, ul.toy.train_base):  # fmt: skip
        assert inspect.signature(fn).parameters["progress"].default is None, fn.__name__


def test_bars_fall_back_to_text_without_ipywidgets(monkeypatch):
    import builtins

    from tqdm.std import tqdm as std

    real_import = builtins.__import__

    def no_widgets(name, *args, **kwargs):
        if name == "ipywidgets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_widgets)
    assert _progress._tqdm_class() is std


# ---------------------------------------------------------------------------------- plotting


def test_line_plots_name_the_models_once(pair):
    base, unlearned = pair
    mlp = ul.patch_mlp_coefficients(base, unlearned, PAIRS, progress=False)
    attn = ul.patch_attention(base, unlearned, PAIRS, progress=False)
    w_out = ul.restore_sweep(base, unlearned, PAIRS, progress=False)
    _, ax = plt.subplots()
    assert mlp.plot(ax=ax) is ax
    assert attn.plot(ax=ax) is ax
    assert w_out.plot(ax=ax, label="value vectors") is ax
    _, labels = ax.get_legend_handles_labels()
    assert labels == [
        "patch mlp.hook_post", "unlearned", "base", "patch hook_attn_out", "value vectors",
    ]  # fmt: skip
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["unlearned"].get_ydata()) == [0.0, 0.0]  # KRS of the unlearned model
    assert list(lines["base"].get_ydata()) == [1.0, 1.0]
    assert list(lines["patch mlp.hook_post"].get_ydata()) == pytest.approx(mlp.scores.tolist())
    new = attn.plot()  # a new figure's Axes
    assert new is not ax and new.figure is not ax.figure


def test_variant_results_plot_by_name(pair):
    base, unlearned = pair
    res = ul.restore_sweep(
        base, unlearned, PAIRS, variants={"a": dict(layers=[0]), "b": dict(layers=[3])}
    )
    ax = res.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert ax.get_xlabel() == "variant"


def test_heatmaps_diverge_around_zero_with_readable_ticks(pair):
    base, unlearned = pair
    long_pairs = [(" ".join(["the"] * 40), " Paris"), ("Tolo eats", " bread")]
    res = ul.patch_residual(base, unlearned, long_pairs, positions="each", progress=False)
    _, ax = plt.subplots()
    assert res.plot(ax=ax) is ax
    image = ax.get_images()[0]
    assert image.norm.vmin == -image.norm.vmax
    assert image.norm.vmax >= max(1.0, float(res.scores.nan_to_num().abs().max()))
    assert image.get_cmap().name.startswith("RdBu")  # diverging
    assert res.scores.shape[1] == 42  # BOS, 40 words, the answer
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 8 <= len(labels) <= 17 and labels[0] == "0"
    aligned = ul.patch_residual(
        base, unlearned, long_pairs, positions="each", align="answer", progress=False
    ).plot()
    texts = [t.get_text() for t in aligned.get_xticklabels()]
    assert texts[0] == "prompt-41" and all(t.startswith(("prompt-", "answer+")) for t in texts)


# ------------------------------------------------------------------------------------ dtypes


def test_load_hf_takes_dtype_names():
    from test_models import make_hf

    hf = make_hf("llama-gqa")
    by_name = ul.load_hf(hf, device="cpu", dtype="bfloat16")
    by_dtype = ul.load_hf(hf, device="cpu", dtype=torch.bfloat16)
    assert by_name.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in by_name.parameters())
    for (n, a), (_, b) in zip(by_name.named_parameters(), by_dtype.named_parameters()):
        assert torch.equal(a, b), n
    assert ul.load_hf(hf, device="cpu", dtype="float16").cfg.dtype == torch.float16
    for bad in ["bf16", "float64", "int8"]:
        with pytest.raises(ul.ConfigError, match=repr(bad)):
            ul.load_hf(hf, device="cpu", dtype=bad)
