"""The command line: user errors end with exit status 2 and one line, before any work."""

from __future__ import annotations

import json

import pytest
import torch

import unlearnlens.cli as cli
from conftest import PAIRS, build_model, perturbed
from unlearnlens import save_model
from unlearnlens.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = build_model("gpt2", seed=1)
    save_model(base, root / "base")
    save_model(perturbed(base, 0.2, seed=2), root / "u1")
    concepts = [{"Concept": "Zorblax", "Layer": 1, "Dim": 2, "QA": ["Where was Zorblax born ?"]}]
    (root / "concepts.json").write_text(json.dumps(concepts))
    (root / "forget.json").write_text(json.dumps([list(p) for p in PAIRS[:2]]))
    (root / "a_file").write_text("not a folder")
    return root


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the error must come before."""

    def load_any(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_any", load_any)


def one_error_line(capsys, rc, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err)
    errors = [line for line in lines if line.startswith("unlearnlens: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for f in fragments:
        assert f in errors[0], errors[0]


def _dissect(saved, *extra, out=None):
    return [
        "dissect",
        "--base",
        str(saved / "base"),
        "--unlearned",
        f"u1={saved / 'u1'}",
        "--concepts",
        str(saved / "concepts.json"),
        "--out",
        str(out if out is not None else saved / "report"),
        *extra,
    ]


def _unlearn(saved, *extra, out=None):
    return [
        "unlearn",
        "--model",
        str(saved / "base"),
        "--forget",
        str(saved / "forget.json"),
        "--method",
        "ga",
        "--out",
        str(out if out is not None else saved / "out"),
        *extra,
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["dissect", "unlearn"])
def test_device_cuda_without_cuda_is_one_line(saved, capsys, no_loading, command):
    argv = (_dissect if command == "dissect" else _unlearn)(saved, "--device", "cuda")
    one_error_line(capsys, main(argv), "--device", "CUDA is not available")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--device", "tpu9"], "--device"),
        (["--device", "cuda:99"], "--device"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-2"], "--batch-size"),
        (["--window", "2"], "window"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--analyses", "patch_everything"], "patch_everything"),
    ],
)
def test_bad_dissect_arguments_fail_before_loading(saved, capsys, no_loading, extra, fragment):
    one_error_line(capsys, main(_dissect(saved, *extra)), fragment)


def test_an_output_folder_that_cannot_be_written_fails_before_loading(saved, capsys, no_loading):
    for out in (saved / "a_file", saved / "a_file" / "report"):
        one_error_line(capsys, main(_dissect(saved, out=out)), "--out", str(saved / "a_file"))
        one_error_line(capsys, main(_unlearn(saved, out=out)), "--out")
    assert (saved / "a_file").read_text() == "not a folder"


def test_the_base_folder_as_unlearned_model_fails_before_loading(saved, capsys, no_loading):
    argv = _dissect(saved)
    argv[argv.index("--unlearned") + 1] = f"same={saved / 'base'}/"
    one_error_line(capsys, main(argv), "--base folder itself")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--steps", "0"], "--steps"),
        (["--method", "no_such_method"], "no_such_method"),
    ],
)
def test_bad_unlearn_arguments_fail_before_loading(saved, capsys, no_loading, extra, fragment):
    argv = _unlearn(saved)
    if extra[0] == "--method":
        argv[argv.index("--method") + 1] = extra[1]
        extra = []
    one_error_line(capsys, main([*argv, *extra]), fragment)


def test_damaged_training_files_are_one_line_naming_the_file(saved, tmp_path, capsys):
    bad_json = tmp_path / "forget.json"
    bad_json.write_text('[["q", "a"], ["q2"')
    binary = tmp_path / "forget.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    for path in (bad_json, binary, tmp_path / "missing.json"):
        argv = _unlearn(saved)
        argv[argv.index("--forget") + 1] = str(path)
        one_error_line(capsys, main(argv), str(path))


def test_a_damaged_model_folder_is_one_line_naming_the_file(saved, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(saved / "u1", tmp_path / "u1")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = _dissect(saved, out=tmp_path / "report")
    argv[argv.index("--unlearned") + 1] = f"u1={broken}"
    one_error_line(capsys, main(argv), str(weights))
    assert not (tmp_path / "report").exists()


def test_demo_refuses_bad_threads_and_an_unwritable_folder_before_training(
    saved, capsys, monkeypatch
):
    import unlearnlens.toy as toy

    def train_base(*args, **kwargs):
        raise AssertionError("the demo started training before checking its arguments")

    monkeypatch.setattr(toy, "train_base", train_base)
    one_error_line(capsys, main(["demo", "--threads", "0"]), "--threads")
    one_error_line(capsys, main(["demo", "--out", str(saved / "a_file")]), "--out")
