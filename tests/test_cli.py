from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import PAIRS, build_model, perturbed
from unlearnlens import load_model, save_model
from unlearnlens.cli import main, read_train_file
from unlearnlens.patching import patch_mlp_coefficients
from unlearnlens.prompts import PromptSet, format_question
from unlearnlens.study import StudyResult

QUESTIONS = ["Where was Zorblax born ?", "Who is Mira ?", "What is the capital of France ?"]
UNRELATED = ["Where was Tolo born ?", "What city is the capital of Italy ?"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = build_model("llama", seed=1)
    save_model(base, root / "base")
    save_model(perturbed(base, 0.2, seed=2), root / "u1")
    save_model(perturbed(base, 0.4, seed=3), root / "u2")
    concepts = [
        {"Concept": "Zorblax", "Layer": 2, "Dim": 5, "QA": QUESTIONS, "unrelated_QA": UNRELATED},
        {"Concept": "Mira", "Layer": 1, "Dim": 3, "QA": QUESTIONS[1:], "unrelated_QA": UNRELATED},
    ]
    (root / "concepts.json").write_text(json.dumps(concepts))
    (root / "forget.json").write_text(json.dumps([list(p) for p in PAIRS[:2]]))
    return root


def one_error_line(capsys, rc, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1, err
    assert err[0].startswith("unlearnlens: error: ")
    for f in fragments:
        assert f in err[0], err[0]


def test_dissect_writes_a_report_of_the_concept(saved, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(
        [
            "dissect",
            "--base",
            str(saved / "base"),
            "--unlearned",
            f"u1={saved / 'u1'}",
            f"u2={saved / 'u2'}",
            "--concepts",
            str(saved / "concepts.json"),
            "--concept",
            "zorblax",
            "--out",
            str(out),
            "--window",
            "1",
            "--analyses",
            "behaviour,patch_mlp,restore_w_out",
            "--max-new-tokens",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed
    assert "patch_mlp" in printed and "u2" in printed
    study = StudyResult.load(out)
    assert study.methods == ["u1", "u2"]
    assert set(study.sweeps["u1"]) == {"patch_mlp", "restore_w_out"}
    base, u1 = load_model(saved / "base"), load_model(saved / "u1")
    ps = PromptSet.from_model_answers(
        base, [format_question(q) for q in QUESTIONS], max_new_tokens=3
    )
    assert study.sweeps["u1"]["patch_mlp"] == patch_mlp_coefficients(base, u1, ps, progress=False)
    assert study.evaluation.meta["n_prompts"] == {"forget": 3, "unrelated": 2}


def test_dissect_loads_the_base_on_its_own_device(saved, tmp_path, monkeypatch):
    import unlearnlens.cli as cli

    seen = []
    real = cli.load_any

    def recording(path, *, device=None, dtype=None):
        seen.append((Path(path).name, device))
        return real(path, device=device, dtype=dtype)

    monkeypatch.setattr(cli, "load_any", recording)
    args = ["dissect", "--base", str(saved / "base"), "--unlearned", f"u1={saved / 'u1'}"]
    args += ["--concepts", str(saved / "concepts.json"), "--out", str(tmp_path / "r")]
    args += ["--base-device", "cpu", "--analyses", "patch_mlp", "--window", "1"]
    assert main([*args, "--max-new-tokens", "2", "--no-progress"]) == 0
    assert seen == [("base", "cpu"), ("u1", None)]


def test_unlearn_saves_the_unlearned_model(saved, tmp_path, capsys):
    forget = tmp_path / "forget.json"
    forget.write_text(json.dumps([list(p) for p in PAIRS[:2]]))
    retain = tmp_path / "retain.txt"
    retain.write_text("the capital of France is Paris\nTolo eats bread fish rice\n")
    out = tmp_path / "unlearned"
    rc = main(
        [
            "unlearn",
            "--model",
            str(saved / "base"),
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--method",
            "grad_diff",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert f"saved: {out}" in capsys.readouterr().out
    base, new = load_model(saved / "base"), load_model(out)
    pairs = zip(base.parameters(), new.parameters(), strict=True)
    changed = [not torch.equal(a, b) for a, b in pairs]
    assert any(changed)
    assert base.cfg.n_layers == new.cfg.n_layers


def test_train_files(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("one text\nanother text\n\n")
    assert read_train_file(lines) == ["one text", "another text"]
    paras = tmp_path / "paras.txt"
    paras.write_text("first paragraph\nstill first\n\nsecond\n")
    assert read_train_file(paras) == ["first paragraph still first", "second"]
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["a", "b"]))
    assert read_train_file(texts) == ["a", "b"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([["q", "a", "extra"]]))
    with pytest.raises(ValueError, match="item 0"):
        read_train_file(bad)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            [
                "dissect",
                "--base",
                "{root}/missing",
                "--unlearned",
                "u={root}/u1",
                "--concepts",
                "{root}/concepts.json",
                "--out",
                "{tmp}/r",
            ],
            ["--base", "missing"],
        ),
        (
            [
                "dissect",
                "--base",
                "{root}/base",
                "--unlearned",
                "u1{root}/u1",
                "--concepts",
                "{root}/concepts.json",
                "--out",
                "{tmp}/r",
            ],
            ["NAME=DIR"],
        ),
        (
            [
                "dissect",
                "--base",
                "{root}/base",
                "--unlearned",
                "u={root}/u1",
                "--concepts",
                "{root}/concepts.json",
                "--out",
                "{tmp}/r",
                "--analyses",
                "patch_mlp,patching",
            ],
            ["unknown analysis 'patching'", "valid analyses"],
        ),
        (
            [
                "dissect",
                "--base",
                "{root}/base",
                "--unlearned",
                "u={root}/u1",
                "--concepts",
                "{root}/concepts.json",
                "--concept",
                "Nobody",
                "--out",
                "{tmp}/r",
            ],
            ["no concept 'Nobody'"],
        ),
        (
            [
                "dissect",
                "--base",
                "{root}/base",
                "--unlearned",
                "u={root}/u1",
                "--concepts",
                "{root}/missing.json",
                "--out",
                "{tmp}/r",
            ],
            ["ConceptVectors"],
        ),
        (
            [
                "unlearn",
                "--model",
                "{root}/base",
                "--forget",
                "{root}/concepts.json",
                "--method",
                "forgetful",
                "--out",
                "{tmp}/m",
            ],
            ["unknown unlearning method 'forgetful'", "npo"],
        ),
        (
            [
                "unlearn",
                "--model",
                "{root}/base",
                "--forget",
                "{tmp}/nothing.json",
                "--method",
                "npo",
                "--out",
                "{tmp}/m",
            ],
            ["nothing.json"],
        ),
        (
            [
                "unlearn",
                "--model",
                "{tmp}",
                "--forget",
                "{root}/forget.json",
                "--method",
                "npo",
                "--out",
                "{tmp}/m",
            ],
            ["neither"],
        ),
        (
            [
                "unlearn",
                "--model",
                "{root}/base",
                "--forget",
                "{root}/concepts.json",
                "--method",
                "npo",
                "--out",
                "{tmp}/m",
            ],
            ["item 0 is not a [question, answer] pair"],
        ),
        (
            [
                "dissect",
                "--base",
                "{root}/base",
                "--unlearned",
                "u={root}/u1",
                "--concepts",
                "{root}/concepts.json",
                "--out",
                "{tmp}/r",
                "--window",
                "4",
            ],
            ["window", "odd"],
        ),
        (["dissect", "--base", "{root}/base"], ["required"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_bad_input_exits_with_one_clear_line(saved, tmp_path, capsys, argv, fragments):
    argv = [a.format(root=saved, tmp=tmp_path) for a in argv]
    one_error_line(capsys, main(argv), *fragments)
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main([]) == 2


def test_module_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["unlearnlens", "demo", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("unlearnlens", run_name="__main__")
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_quick_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARNLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"report: {out / 'index.html'}"
    study = StudyResult.load(out)
    assert study.methods == ["grad_diff", "npo", "dpo", "rmu"]
    for method in study.methods:
        assert "patch_mlp" in study.sweeps[method]
        assert method in printed
    assert list(study.evaluation.table.index) == ["base", *study.methods]


@pytest.mark.slow
def test_full_demo(tmp_path, capsys):
    import time

    out = tmp_path / "demo"
    started = time.perf_counter()
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    elapsed = time.perf_counter() - started
    study = StudyResult.load(out)
    assert study.methods == ["grad_diff", "npo", "dpo", "rmu"]
    assert set(study.sweeps["npo"]) >= {"patch_mlp", "patch_attn", "restore_w_out", "logit_lens"}
    assert (out / "index.html").is_file()
    print(f"demo wall time {elapsed:.1f} s")


def test_load_any_reads_saved_and_hugging_face_folders(saved, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearnlens.cli import load_any

    model = load_any(saved / "base", dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    converted = load_any(tmp_path / "hf", device="cpu")
    tokens = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        want = hf(tokens).logits
        got = converted(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
