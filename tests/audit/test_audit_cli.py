"""``unlearnlens audit`` through ``main(argv)``, against ``ul.audit`` called directly."""

from __future__ import annotations

import json

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens.audit import AuditResult
from unlearnlens.cli import main


def test_audit_command_matches_the_function(tmp_path, capsys):
    base = build_model("llama", seed=1)
    unl = perturbed(base, 0.2, seed=2)
    ul.save_model(base, tmp_path / "base")
    ul.save_model(unl, tmp_path / "unl")
    (tmp_path / "forget.json").write_text(json.dumps([list(p) for p in PAIRS]))
    (tmp_path / "retain.json").write_text(json.dumps([list(p) for p in PAIRS[2:]]))
    argv = [
        "audit",
        "--base", str(tmp_path / "base"),
        "--unlearned", f"u={tmp_path / 'unl'}",
        "--forget", str(tmp_path / "forget.json"),
        "--retain", str(tmp_path / "retain.json"),
        "--probes", "quant4,in_context,extraction",
        "--metric", "answer_logprob",
        "--out", str(tmp_path / "audit.json"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "quant4" in out and "saved:" in out
    got = AuditResult.load(tmp_path / "audit.json")
    direct = ul.audit(
        base,
        {"u": unl},
        PAIRS,
        retain=PAIRS[2:],
        probes=["quant4", "in_context", "extraction"],
        metric="answer_logprob",
        progress=False,
    )
    assert got == direct


def test_audit_command_rejects_bad_input(tmp_path, capsys):
    assert main(["audit", "--base", "x", "--unlearned", "u=y", "--toy", "--probes", "nope",
                 "--out", str(tmp_path / "a.json")]) == 2  # fmt: skip
    assert "unknown probe 'nope'" in capsys.readouterr().err
    assert main(["audit", "--base", "x", "--unlearned", "u=y", "--out", "a.json"]) == 2
    assert "--forget FILE and --toy" in capsys.readouterr().err
