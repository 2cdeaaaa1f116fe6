"""Tests for run_suite / SuiteResult: equal to dissect by hand, resumable after SIGKILL, Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import unlearnlens as ul
from unlearnlens.cli import quick_base
from unlearnlens.errors import CheckpointError, ConfigError, UnknownMethodError
from unlearnlens.toy import make_world, toy_suite

SRC = str(Path(__file__).resolve().parents[1] / "src")
ANALYSES = ("behaviour", "patch_mlp", "patch_attn", "restore_w_out")
METHODS = ("grad_diff", "npo")
STEPS = 2
SETTINGS = dict(analyses=ANALYSES, window=1, threads=1, progress=False)
# the resume and Ray tests skip the behaviour test (generation is the slow part)
SWEEPS = ("patch_mlp", "patch_attn", "restore_w_out")
FAST = dict(analyses=SWEEPS, window=1, threads=1, progress=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    world = make_world(0, n_concepts=6, n_relations=2, n_capability=8)
    with pytest.MonkeyPatch.context() as env:  # the CLI's --quick base, cached under root
        env.setenv("UNLEARNLENS_CACHE", str(root / "cache"))
        base = quick_base(world, progress=False)
    ul.save_model(base, root / "base")
    return world, base, root


def _cases(world, base):
    return toy_suite(world, base, n_concepts=3, methods=METHODS, options={"steps": STEPS})


@pytest.fixture(scope="module")
def uninterrupted(toy):
    world, _, root = toy
    cases = _cases(world, str(root / "base"))
    return ul.run_suite(cases, out=root / "full", **FAST), cases


def test_suite_equals_dissect_by_hand(toy, tmp_path):
    world, base, _ = toy
    cases = _cases(world, base)  # the in-memory base
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = ul.run_suite(cases, out=tmp_path / "s", **SETTINGS)
    assert result.concepts == [c.concept for c in cases] and result.methods == list(METHODS)
    torch.set_num_threads(1)
    for case in cases:
        for method in METHODS:
            model = ul.unlearn(
                base, case.forget, retain=case.retain, method=method, steps=STEPS, progress=False
            ).model
            by_hand = ul.dissect(
                base,
                {method: model},
                case.forget,
                unrelated=case.unrelated,
                window=1,
                analyses=ANALYSES,
                progress=False,
            )
            assert result.study(case.concept, method) == by_hand, (case.concept, method)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())

    # the tidy table and averaged curves, against the sweeps themselves
    table = result.to_dataframe()
    assert list(table.columns) == ["concept", "method", "analysis", "layer", "score"]
    assert len(table) == 3 * 2 * 3 * base.cfg.n_layers
    curves = result.curves(n_boot=500)
    for method in METHODS:
        scores = np.array(
            [
                result.study(c.concept, method).sweeps[method]["patch_mlp"].scores.numpy()
                for c in cases
            ]
        )
        row = curves[(curves.method == method) & (curves.analysis == "patch_mlp")]
        np.testing.assert_allclose(row["mean"], scores.mean(0), rtol=1e-6)
        assert (row["low"] <= row["mean"] + 1e-9).all() and (
            row["mean"] <= row["high"] + 1e-9
        ).all()
        assert (row["low"] >= scores.min(0) - 1e-9).all() and (
            row["high"] <= scores.max(0) + 1e-9
        ).all()
    both = np.array(
        [
            [result.study(c.concept, m).sweeps[m]["restore_w_out"].scores.numpy() for m in METHODS]
            for c in cases
        ]
    )
    pooled = curves[(curves.method == "pooled") & (curves.analysis == "restore_w_out")]
    np.testing.assert_allclose(pooled["mean"], both.mean(1).mean(0), rtol=1e-6)

    # exact save / load, a report, and a re-run that redoes nothing
    assert ul.SuiteResult.load(result.save(tmp_path / "copy")) == result
    index = result.report(tmp_path / "report")
    assert index.is_file() and (tmp_path / "report" / "averaged.png").is_file()
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("done.json"))
    assert ul.run_suite(cases, out=tmp_path / "s", **SETTINGS) == result
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("done.json")) == stamps


_KILLED_RUN = """
import sys, time
import torch
import unlearnlens as ul
import unlearnlens.study_result as sr
from unlearnlens.toy import make_world, toy_suite

out, base, flag = sys.argv[1:4]
real_save, calls = sr.StudyResult.save, []

def save(self, directory):
    calls.append(directory)
    path = real_save(self, directory)
    if len(calls) == 3:  # the first study of the second case is half-written
        open(flag, "w").close()
        time.sleep(300)
    return path

sr.StudyResult.save = save
world = make_world(0, n_concepts=6, n_relations=2, n_capability=8)
cases = toy_suite(world, base, n_concepts=3, methods=("grad_diff", "npo"), options={"steps": 2})
ul.run_suite(cases, out=out, analyses=ANALYSES, window=1, threads=1, progress=False)
"""


def test_sigkill_mid_case_then_resume(toy, uninterrupted, tmp_path, monkeypatch):
    _, _, root = toy
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN.replace("ANALYSES", repr(SWEEPS)))
    out, flag = tmp_path / "s", tmp_path / "flag"
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(root / "base"), str(flag)], env=env
    )
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, "the suite process ended before it was killed"
            assert time.monotonic() < deadline, "the suite never reached its second case"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list(out.rglob("done.json"))) == 2  # the first case; the third study is a tmp
    with pytest.raises(ul.FileFormatError, match="not finished"):
        ul.SuiteResult.load(out)

    import unlearnlens.study as study_module

    calls = []
    real = study_module.dissect
    monkeypatch.setattr(study_module, "dissect", lambda *a, **k: calls.append(1) or real(*a, **k))
    full, cases = uninterrupted
    resumed = ul.run_suite(cases, out=out, **FAST)
    assert len(calls) == 4  # 6 studies, 2 finished before the kill
    assert resumed == full
    assert resumed.curves().equals(full.curves())


def test_ray_executor_gives_the_same_aggregate(uninterrupted, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (the 'ray' extra)")
    from unlearnlens.ray_executor import RayExecutor

    full, cases = uninterrupted
    started = time.perf_counter()
    env = {"env_vars": {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}}
    init = {"num_cpus": 2, "runtime_env": env, "include_dashboard": False}
    with RayExecutor(num_cpus=1, init=init) as executor:
        result = ul.run_suite(cases, out=tmp_path / "ray", executor=executor, **FAST)
    print(f"ray suite: {time.perf_counter() - started:.1f} s")
    assert result == full
    assert result.curves().equals(full.curves())


def test_bad_suites_fail_before_any_work(toy, tmp_path):
    world, base, _ = toy
    cases = _cases(world, base)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="in-memory"):
        ul.run_suite(cases, out=out, executor=object.__new__(type("E", (), {"submit": print})))
    with pytest.raises(ConfigError, match="two cases"):
        ul.run_suite([cases[0], cases[0]], out=out)
    missing = ul.SuiteCase("x", cases[0].forget, {"npo": tmp_path / "nope"}, base=base)
    with pytest.raises(CheckpointError, match="nope"):
        ul.run_suite([missing], out=out)
    unknown = ul.SuiteCase("x", cases[0].forget, {"m": ul.Recipe("forgetful")}, base=base)
    with pytest.raises(UnknownMethodError):
        ul.run_suite([unknown], out=out)
    with pytest.raises(ConfigError, match="method name"):
        ul.run_suite([ul.SuiteCase("x", cases[0].forget, {"a/b": base}, base=base)], out=out)
    assert not out.exists()
