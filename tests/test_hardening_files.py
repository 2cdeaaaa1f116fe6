"""Corrupt and truncated files, odd models: our errors, naming the file or the argument."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import unlearnlens as ul
from conftest import PAIRS, build_model, llama_like_config, make_word_tokenizer, perturbed
from unlearnlens.errors import (
    CheckpointError,
    ComponentError,
    FileFormatError,
    HookError,
    UnlearnLensError,
)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_names(info, path: Path) -> None:
    assert isinstance(info.value, UnlearnLensError)
    assert str(path) in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def study():
    base = build_model("gpt2", seed=1)
    return ul.dissect(
        base,
        perturbed(base, 0.2, seed=2),
        PAIRS[:2],
        window=1,
        analyses=["patch_mlp"],
        progress=False,
    )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing_field", "list"])
@pytest.mark.parametrize("which", ["study.json", "study.safetensors"])
def test_damaged_study_files_are_a_file_format_error_naming_the_file(
    study, tmp_path, damage, which
):
    folder = study.save(tmp_path / "s")
    path = folder / which
    if damage == "truncate":
        truncate(path)
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 40)
    elif damage == "empty":
        path.write_bytes(b"")
    elif which == "study.json":
        data = json.loads(path.read_text())
        if damage == "missing_field":
            data.pop("methods", None)
            data.pop("sweeps", None)
        else:
            data = [data]
        path.write_text(json.dumps(data))
    else:
        pytest.skip("field damage applies to the JSON header")
    with pytest.raises(FileFormatError) as info:
        ul.StudyResult.load(folder)
    assert_names(info, path)


def test_a_damaged_report_results_file_names_the_file(study, tmp_path):
    pytest.importorskip("matplotlib")
    index = study.report(tmp_path / "r")
    results = index.parent / "results.json"
    truncate(results, 0.3)
    with pytest.raises(FileFormatError) as info:
        ul.StudyResult.load(index.parent)
    assert_names(info, results)
    with pytest.raises(FileFormatError):
        ul.StudyResult.from_json('{"not": "a study"}')
    with pytest.raises(FileFormatError):
        ul.StudyResult.from_json("{truncated")


def test_damaged_sweep_and_evaluation_files(study, tmp_path):
    sweep = next(iter(study.sweeps["unlearned"].values()))
    path = sweep.save(tmp_path / "sweep.safetensors")
    truncate(path, 0.6)
    with pytest.raises(FileFormatError) as info:
        ul.SweepResult.load(path)
    assert_names(info, path)
    other = tmp_path / "plain.safetensors"  # a valid safetensors file of something else
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(FileFormatError) as info:
        ul.SweepResult.load(other)
    assert_names(info, other)
    with pytest.raises(FileFormatError) as info:
        ul.SweepResult.load(tmp_path / "missing.safetensors")
    assert_names(info, tmp_path / "missing.safetensors")

    from unlearnlens.evaluation import Evaluation

    bad = tmp_path / "eval.json"
    bad.write_text('{"format": "unlearnlens.Evaluation/1", "models": [')
    with pytest.raises(FileFormatError) as info:
        Evaluation.load(bad)
    assert_names(info, bad)
    bad.write_text(json.dumps({"format": "unlearnlens.Evaluation/1"}))
    with pytest.raises(FileFormatError) as info:
        Evaluation.load(bad)
    assert_names(info, bad)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "model"
    ul.save_model(build_model("llama", seed=3), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("model.safetensors", "truncate"),
        ("model.safetensors", "garbage"),
        ("unlearnlens_config.json", "truncate"),
        ("unlearnlens_config.json", "wrong_shape"),
        ("unlearnlens_config.json", "bad_value"),
        ("tokenizer/tokenizer.json", "truncate"),
    ],
)
def test_damaged_saved_models_are_a_checkpoint_error_naming_the_file(
    saved_model, tmp_path, file, damage
):
    folder = _copy(saved_model, tmp_path / "m")
    path = folder / file
    if damage == "truncate":
        truncate(path, 0.4)
    elif damage == "garbage":
        path.write_bytes(b"\x07" * 64)
    else:
        payload = json.loads(path.read_text())
        if damage == "wrong_shape":
            payload["config"]["d_mlp"] = payload["config"]["d_mlp"] * 2
        else:
            payload["config"]["n_layers"] = "four"
        path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError) as info:
        ul.load_model(folder)
    if "tokenizer" in file:
        path = path.parent
    elif damage == "wrong_shape":  # the config is readable; the weights do not fit it
        path = folder / "model.safetensors"
    assert_names(info, path)


def _hf_checkpoint(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_word_tokenizer()
    config = llama_like_config(LlamaConfig, len(tok))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return _hf_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt")


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("model.safetensors", "truncate"),
        ("model.safetensors", "delete"),
        ("config.json", "truncate"),
        ("config.json", "list"),
        ("config.json", "bad_field"),
        ("config.json", "binary"),
        ("tokenizer.json", "truncate"),
    ],
)
def test_damaged_hugging_face_checkpoints_are_a_checkpoint_error(hf_folder, tmp_path, file, damage):
    folder = _copy(hf_folder, tmp_path / "ckpt")
    path = folder / file
    if damage == "truncate":
        truncate(path, 0.4)
    elif damage == "delete":
        path.unlink()
    elif damage == "list":
        path.write_text("[1, 2]")
    elif damage == "binary":
        path.write_bytes(b"\xff\xfe\x00\x01")
    else:
        config = json.loads(path.read_text())
        config["num_hidden_layers"] = "two"
        path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        ul.load_hf(folder, device="cpu")
    assert_names(info, path if file == "config.json" else folder)


def _attn_only() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        d_head=4,
        n_heads=4,
        n_ctx=16,
        d_vocab=20,
        attn_only=True,
        act_fn="gelu",
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(cfg)


def test_attention_only_models_are_refused_by_the_mlp_analyses():
    a, b = _attn_only(), _attn_only()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    ps = ul.PromptSet.from_tokens([[1, 2, 3], [4, 5]], [[6], [7, 8]])
    for call in (
        lambda: ul.compare_coefficients(a, b, ps),
        lambda: ul.mlp_coefficients(a, ps),
        lambda: ul.vocab_projection(a, 0, 1),
        lambda: ul.locate_concept_vectors(a, [3]),
        lambda: ul.dissect(a, b, ps, progress=False),
    ):
        with pytest.raises(ComponentError, match="attention-only"):
            call()
    # the MLP hooks TransformerLens creates on attention-only blocks never run
    with pytest.raises(HookError, match="never fires"):
        ul.patch(a, b, ps, hooks="hook_mlp_out", progress=False)
    # the attention analyses still run
    out = ul.dissect(a, b, ps, analyses=["patch_attn"], window=1, progress=False)
    assert torch.isfinite(out.sweeps["unlearned"]["patch_attn"].scores).all()
