"""Tests for ``unlearnlens suite`` and ``unlearnlens dissect --pairs``."""

from __future__ import annotations

import json

import pytest

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens.cli import main
from unlearnlens.patching import patch_mlp_coefficients


def _saved(tmp_path):
    base = build_model("llama", seed=1)
    ul.save_model(base, tmp_path / "base")
    ul.save_model(perturbed(base, 0.2, seed=2), tmp_path / "u1")
    ul.save_model(perturbed(base, 0.3, seed=3), tmp_path / "u2")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for p, a in PAIRS:
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return base


def test_dissect_pairs_file(tmp_path, capsys):
    base = _saved(tmp_path)
    args = ["dissect", "--base", str(tmp_path / "base"), "--unlearned", f"u1={tmp_path / 'u1'}"]
    args += ["--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "r")]
    args += ["--window", "1", "--analyses", "patch_mlp", "--no-progress"]
    assert main(args) == 0
    study = ul.StudyResult.load(tmp_path / "r")
    u1 = ul.load_model(tmp_path / "u1")
    assert study.sweeps["u1"]["patch_mlp"] == patch_mlp_coefficients(
        base, u1, PAIRS, progress=False
    )
    capsys.readouterr()
    assert main([*args, "--concepts", str(tmp_path / "cv.json")]) == 2
    assert "exactly one of --concepts" in capsys.readouterr().err


def test_suite_command_on_a_cases_file(tmp_path, capsys):
    _saved(tmp_path)
    cases = [
        {"concept": c, "pairs": "pairs.jsonl", "unlearned": {"a": "u1", "b": "u2"}}
        for c in ("one", "two")
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    args = ["suite", "--cases", str(tmp_path / "cases.json"), "--base", str(tmp_path / "base")]
    args += ["--out", str(tmp_path / "s"), "--analyses", "patch_mlp", "--window", "1"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "patch_mlp" in printed
    result = ul.SuiteResult.load(tmp_path / "s")
    assert result.concepts == ["one", "two"] and result.methods == ["a", "b"]
    base, u2 = ul.load_model(tmp_path / "base"), ul.load_model(tmp_path / "u2")
    expected = patch_mlp_coefficients(base, u2, PAIRS, progress=False)
    assert result.study("two", "b").sweeps["b"]["patch_mlp"] == expected
    assert (tmp_path / "s" / "report" / "index.html").is_file()


@pytest.mark.slow
def test_quick_demo_runs_a_suite_over_its_own_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARNLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--suite-concepts", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"report: {out / 'index.html'}"
    assert f"suite report: {out / 'suite' / 'report' / 'index.html'}" in printed
    study = ul.StudyResult.load(out)
    suite = ul.SuiteResult.load(out / "suite")
    assert len(suite.concepts) == 2 and suite.methods == study.methods
    first = suite.concepts[0]
    for method in study.methods:  # the first case is the demo's own models
        sweep = suite.study(first, method).sweeps[method]["patch_mlp"]
        assert sweep == study.sweeps[method]["patch_mlp"]


def test_changed_settings_rerun_a_finished_study(tmp_path):
    base = _saved(tmp_path)
    case = ul.SuiteCase("one", PAIRS, {"a": tmp_path / "u1"}, base=tmp_path / "base")
    first = ul.run_suite([case], out=tmp_path / "s", analyses="patch_mlp", window=1)
    with pytest.warns(UserWarning, match="other data, models or settings"):
        second = ul.run_suite([case], out=tmp_path / "s", analyses="patch_mlp", window=3)
    u1 = ul.load_model(tmp_path / "u1")
    expected = patch_mlp_coefficients(base, u1, PAIRS, window=3, progress=False)
    assert second.study("one", "a").sweeps["a"]["patch_mlp"] == expected
    assert first != second


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--batch-size", "0"),
        ("--threads", "0"),
        ("--window", "2"),
        ("--concepts", "0"),
        ("--steps", "0"),
        ("--device", "cuda:99"),
        ("--methods", "npo,no_such_method"),
    ],
)
def test_suite_refuses_bad_options_before_training(tmp_path, capsys, monkeypatch, flag, value):
    import unlearnlens.toy as toy

    def train_base(*args, **kwargs):
        raise AssertionError("the toy base model was trained before the options were checked")

    monkeypatch.setattr(toy, "train_base", train_base)
    args = ["suite", "--out", str(tmp_path / "s"), "--quick", "--no-progress", flag, value]
    assert main(args) == 2
    assert flag.lstrip("-") in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_dissect_pairs_puts_the_base_model_on_base_device(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import unlearnlens.cli as cli

    _saved(tmp_path)
    seen = []
    real = cli.load_any

    def recording(path, *, device=None, dtype=None):
        seen.append((Path(path).name, device))
        return real(path, device=device, dtype=dtype)

    monkeypatch.setattr(cli, "load_any", recording)
    args = ["dissect", "--base", str(tmp_path / "base"), "--unlearned", f"u1={tmp_path / 'u1'}"]
    args += ["--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "r")]
    args += ["--window", "1", "--analyses", "patch_mlp", "--no-progress"]
    assert main([*args, "--base-device", "cpu"]) == 0
    assert seen == [("base", "cpu"), ("u1", None)]
    seen.clear()
    assert main([*args, "--base-device", "cuda:99"]) == 2
    assert "--base-device" in capsys.readouterr().err
    assert seen == []
