"""Errors come before any work: a forward pass never runs for input that cannot succeed."""

from __future__ import annotations

import copy

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS
from unlearnlens.errors import ConfigError, HookError, IncompatibleModelsError
from unlearnlens.models import check_distinct

pytestmark = pytest.mark.usefixtures("without_type_checker")


def test_dissect_refuses_top_k_zero_before_work(gpt2_pair, no_forward):
    base, unlearned = gpt2_pair
    with pytest.raises(ConfigError, match="top_k"):
        ul.dissect(base, unlearned, PAIRS, top_k=0, progress=False)
    with pytest.raises(ConfigError, match="eval_max_new_tokens"):
        ul.dissect(base, unlearned, PAIRS, eval_max_new_tokens=0, progress=False)


def test_dissect_refuses_the_base_model_as_unlearned_model(gpt2_pair, no_forward):
    base, unlearned = gpt2_pair
    with pytest.raises(IncompatibleModelsError, match="base model itself"):
        ul.dissect(base, base, PAIRS, progress=False)
    with pytest.raises(IncompatibleModelsError, match="exactly the base model's weights"):
        ul.dissect(base, copy.deepcopy(base), PAIRS, progress=False)
    with pytest.raises(IncompatibleModelsError, match="'same'"):
        ul.dissect(base, {"a": unlearned, "same": base}, PAIRS, progress=False)
    with pytest.raises(ConfigError, match="base must be a transformer_lens HookedTransformer"):
        ul.dissect(None, unlearned, PAIRS, progress=False)


def test_krs_sweeps_refuse_identical_models_but_other_metrics_run(
    gpt2_pair, no_forward, monkeypatch
):
    base, _ = gpt2_pair
    twin = copy.deepcopy(base)
    for fn in (ul.patch_mlp_coefficients, ul.restore_sweep):
        for metric in ("krs", "recovery"):
            with pytest.raises(IncompatibleModelsError, match="undefined"):
                fn(base, twin, PAIRS, metric=metric, progress=False)
    monkeypatch.undo()  # forward passes allowed again
    out = ul.patch_mlp_coefficients(base, twin, PAIRS, metric="answer_logprob", progress=False)
    # patching a model with its own twin changes nothing: every score is the baseline
    assert torch.allclose(out.scores, torch.full_like(out.scores, out.baseline), atol=1e-5)


def test_the_check_stops_at_the_first_differing_parameter(gpt2_pair, monkeypatch):
    base, unlearned = gpt2_pair
    calls = []
    real = torch.equal

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(torch, "equal", counting)
    check_distinct(base, unlearned)
    assert len(calls) == 1  # every parameter of the perturbed copy differs


def test_a_hook_that_never_fires_is_refused_and_works_once_switched_on(
    gpt2_pair, no_forward, monkeypatch
):
    base, unlearned = gpt2_pair
    with pytest.raises(HookError, match=r"never fires.*use_attn_result"):
        ul.patch(base, unlearned, PAIRS, hooks="attn.hook_result", progress=False)
    with pytest.raises(HookError, match="never fires"):
        ul.attribution_patch(base, unlearned, PAIRS, hooks="attn.hook_result")
    monkeypatch.undo()
    b, u = copy.deepcopy(base), copy.deepcopy(unlearned)
    u.set_use_attn_result(True)
    with pytest.raises(HookError, match="on the source model but never fires"):
        ul.patch(b, u, PAIRS, hooks="attn.hook_result", progress=False)
    b.set_use_attn_result(True)
    # hook_attn_out is the sum over heads of hook_result plus b_O, the same in both models'
    # patched runs up to b_O: patching all heads' results patches attn_out up to that bias
    u.blocks[0].attn.b_O.data.copy_(b.blocks[0].attn.b_O.data)
    by_result = ul.patch(b, u, PAIRS, hooks="attn.hook_result", layers=[0], progress=False)
    by_out = ul.patch(b, u, PAIRS, hooks="hook_attn_out", layers=[0], progress=False)
    assert torch.allclose(by_result.scores, by_out.scores, atol=1e-4)


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(gpt2_pair, tmp_path, no_forward):
    base, _ = gpt2_pair
    path = tmp_path / "ckpt"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"checkpoint_dir.*file"):
        ul.unlearn(base, PAIRS, method="ga", steps=1, checkpoint_dir=path, progress=False)
    with pytest.raises(ConfigError, match=r"checkpoint_dir.*file"):
        ul.unlearn(base, PAIRS, method="ga", steps=1, checkpoint_dir=path / "x", progress=False)
    assert path.read_text() == "not a folder"


def test_unlearn_of_none_names_the_argument(no_forward):
    with pytest.raises(ConfigError, match="model must be a transformer_lens HookedTransformer"):
        ul.unlearn(None, PAIRS, method="ga", steps=1)


def test_a_report_folder_that_cannot_be_written_is_refused(gpt2_pair, tmp_path):
    from unlearnlens._storage import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "report"):
        with pytest.raises(ConfigError, match="file"):
            check_writable(bad, what="report folder")
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
