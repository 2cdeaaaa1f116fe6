"""A failed save (disk full part-way, a failed swap) leaves the earlier results as they were."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch

import unlearnlens._storage as storage
from conftest import PAIRS, build_model, perturbed
from unlearnlens.evaluation import Evaluation
from unlearnlens.models import load_model, save_model
from unlearnlens.report import write_report
from unlearnlens.results import SweepResult
from unlearnlens.study import StudyResult, dissect


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256 of its bytes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _no_leftovers(parent: Path) -> None:
    leftovers = [p.name for p in parent.iterdir() if re.search(r"\.(tmp|old)$", p.name)]
    assert leftovers == []


@pytest.fixture(scope="module")
def two_studies():
    base = build_model("gpt2", seed=1)
    kw = dict(window=1, progress=False, analyses=["patch_mlp"])
    first = dissect(base, {"a": perturbed(base, 0.1, seed=2)}, PAIRS[:2], **kw)
    second = dissect(base, {"a": perturbed(base, 0.3, seed=5)}, PAIRS[:2], **kw)
    assert first != second
    return first, second


def test_study_save_that_fails_on_the_second_file_keeps_the_first_save(
    two_studies, tmp_path, monkeypatch
):
    first, second = two_studies
    folder = tmp_path / "study"
    first.save(folder)
    (folder / "notes.txt").write_text("mine")
    before = _snapshot(folder)
    # the tensors of the new save are written in full; the JSON header then hits a full disk
    monkeypatch.setattr(Path, "write_text", _disk_full)
    with pytest.raises(OSError) as info:
        second.save(folder)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert StudyResult.load(folder) == first
    _no_leftovers(tmp_path)


def test_study_save_that_fails_while_swapping_folders_keeps_everything(
    two_studies, tmp_path, monkeypatch
):
    first, second = two_studies
    folder = tmp_path / "study"
    first.save(folder)
    (folder / "notes.txt").write_text("mine")
    before = _snapshot(folder)
    real = os.replace

    def replace(src, dst):  # the last rename, new folder -> destination, fails
        if Path(dst) == folder and Path(src).name.endswith(".tmp"):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(OSError):
        second.save(folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert StudyResult.load(folder) == first
    _no_leftovers(tmp_path)


def test_study_save_over_an_earlier_one_replaces_it_and_keeps_other_files(two_studies, tmp_path):
    first, second = two_studies
    folder = tmp_path / "study"
    first.save(folder)
    (folder / "notes.txt").write_text("mine")
    second.save(folder)
    assert StudyResult.load(folder) == second
    assert (folder / "notes.txt").read_text() == "mine"
    _no_leftovers(tmp_path)


def test_report_that_fails_part_way_leaves_the_old_report(two_studies, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    first, second = two_studies
    folder = tmp_path / "report"
    write_report(first, folder)
    (folder / "notes.txt").write_text("mine")
    before = _snapshot(folder)
    assert "results.json" in before and "index.html" in before
    monkeypatch.setattr(Figure, "savefig", _disk_full)  # results.json is already written
    with pytest.raises(OSError):
        write_report(second, folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert StudyResult.load(folder) == first
    _no_leftovers(tmp_path)
    write_report(second, folder)
    assert StudyResult.load(folder) == second
    assert (folder / "notes.txt").read_text() == "mine"


def test_sweep_save_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sweep.safetensors"
    old = SweepResult(
        scores=torch.tensor([0.1, 0.2]),
        axes={"layer": [0, 1]},
        metric="krs",
        baseline=0.0,
        reference=1.0,
    )
    new = SweepResult(
        scores=torch.tensor([0.5, 0.7]),
        axes={"layer": [0, 1]},
        metric="krs",
        baseline=0.0,
        reference=1.0,
    )
    old.save(path)
    data = path.read_bytes()

    def partial_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 7)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "save_file", partial_then_full)
    with pytest.raises(OSError):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert torch.equal(SweepResult.load(path).scores, torch.tensor([0.1, 0.2]))
    _no_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.safetensors"]


def test_model_save_that_fails_on_the_tokenizer_keeps_the_old_model(tmp_path, monkeypatch):
    first = build_model("gpt2", seed=1)
    second = build_model("gpt2", seed=2)
    folder = tmp_path / "model"
    save_model(first, folder)
    before = _snapshot(folder)
    monkeypatch.setattr(type(second.tokenizer), "save_pretrained", _disk_full)
    with pytest.raises(OSError):
        save_model(second, folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    loaded = load_model(folder)
    for (name, p), (_, q) in zip(
        first.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    _no_leftovers(tmp_path)


def test_evaluation_save_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    import pandas as pd

    path = tmp_path / "eval.json"
    table = pd.DataFrame([[0.5]], index=pd.Index(["base"], name="model"), columns=["acc"])
    Evaluation(table=table, meta={}).save(path)
    data = path.read_bytes()
    monkeypatch.setattr(Path, "write_text", _disk_full)
    with pytest.raises(OSError):
        Evaluation(table=table * 2, meta={}).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert Evaluation.load(path).table.iloc[0, 0] == 0.5
    _no_leftovers(tmp_path)


def test_every_write_in_the_package_goes_through_the_storage_module():
    src = Path(__file__).resolve().parents[1] / "src" / "unlearnlens"
    direct = re.compile(
        r"\.write_text\(|\.write_bytes\(|save_file\(|json\.dump\(|torch\.save\(|"
        r"open\([^)]*['\"][wa]b?['\"]|\.mkdir\(|shutil\.rmtree\(|savefig\(\s*directory"
    )
    offenders = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.name == "_storage.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if direct.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


def test_saving_into_the_working_directory_swaps_files_in_place(two_studies, tmp_path, monkeypatch):
    first, second = two_studies
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (folder / "notes.txt").write_text("mine")
    first.save(".")
    before = _snapshot(folder)
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", _disk_full)
        with pytest.raises(OSError):
            second.save(".")
    assert _snapshot(folder) == before
    second.save(".")
    assert Path.cwd() == folder and folder.is_dir()
    assert StudyResult.load(folder) == second
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.txt",
        "study.json",
        "study.safetensors",
    ]


def test_a_failed_in_place_swap_puts_every_old_file_back(two_studies, tmp_path, monkeypatch):
    first, second = two_studies
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    first.save(".")
    before = _snapshot(folder)
    real = os.replace

    def replace(src, dst):  # the second new file fails to move in, after the first did
        if Path(dst) == folder / "study.safetensors" and ".tmp" in str(src):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(storage.os, "replace", replace)
        with pytest.raises(OSError):
            second.save(".")
    assert _snapshot(folder) == before
    assert StudyResult.load(folder) == first
    assert sorted(p.name for p in folder.iterdir()) == ["study.json", "study.safetensors"]
