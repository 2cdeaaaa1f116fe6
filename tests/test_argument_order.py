"""One argument order: the source (base) model first, the target (unlearned) second."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS, build_model, perturbed
from unlearnlens._roles import mark_base, mark_unlearned


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.fixture
def pair():
    base = build_model("llama", seed=1)
    return base, perturbed(base, 0.15, seed=2)


def test_restored_changes_the_second_model_only(pair):
    base, unlearned = pair
    base_w, unl_w = _weights(base), _weights(unlearned)
    with ul.restored(base, unlearned, layers=[1], components="mlp.W_out"):
        assert _same(base, base_w)
        assert torch.equal(unlearned.blocks[1].mlp.W_out, base_w["blocks.1.mlp.W_out"])
    assert _same(unlearned, unl_w)
    # keyword names say the roles; any order of keywords
    with ul.restored(unlearned=unlearned, base=base, layers=[1], components="mlp.W_out"):
        assert _same(base, base_w)
        assert torch.equal(unlearned.blocks[1].mlp.W_out, base_w["blocks.1.mlp.W_out"])
    ul.restore_(base=base, unlearned=unlearned, layers=[2], components="mlp.W_out")
    assert _same(base, base_w)
    assert torch.equal(unlearned.blocks[2].mlp.W_out, base_w["blocks.2.mlp.W_out"])


def test_old_order_on_models_the_library_made_is_refused(pair):
    base, unlearned = pair
    mark_base(base)
    mark_unlearned(unlearned)
    base_w, unl_w = _weights(base), _weights(unlearned)
    with pytest.raises(ul.ArgumentOrderError, match=r"restored\(base=\.\.\., unlearned=\.\.\.\)"):
        ul.restored(unlearned, base, layers=[1], components="mlp.W_out")
    with pytest.raises(ul.ArgumentOrderError, match="restore_"):
        ul.restore_(unlearned, base, components="mlp")
    assert _same(base, base_w) and _same(unlearned, unl_w)
    # nothing is changed by a sweep, so the other direction only warns
    with pytest.warns(ul.ArgumentOrderWarning, match="restore_sweep"):
        ul.restore_sweep(unlearned, base, PAIRS, layers=[0], progress=False)
    with pytest.warns(ul.ArgumentOrderWarning, match="patch"):
        ul.patch_mlp_coefficients(unlearned, base, PAIRS, layers=[0], progress=False)
    with pytest.warns(ul.ArgumentOrderWarning, match="score"):
        ul.score(unlearned, base, PAIRS, metric="answer_logprob")
    # one known model is enough to see the swap
    mark_unlearned(copy.deepcopy(base))  # unrelated model, no effect on these two
    other = perturbed(base, 0.1, seed=5)
    with pytest.raises(ul.ArgumentOrderError):
        ul.restored(unlearned, other, components="mlp.W_out")
    with pytest.raises(ul.ArgumentOrderError):
        ul.restored(other, base, components="mlp.W_out")
    # the right order runs silently; copies carry no role, for the other direction on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ul.restored(base, unlearned, components="mlp.W_out"):
            pass
        with ul.restored(copy.deepcopy(unlearned), copy.deepcopy(base), components="mlp.W_out"):
            pass
        ul.restore_sweep(base, unlearned, PAIRS, layers=[0], progress=False)
    assert _same(base, base_w) and _same(unlearned, unl_w)


def test_unlearn_and_train_base_give_models_their_roles():
    from unlearnlens import _roles

    base = build_model("llama", seed=1)
    run = ul.unlearn(base, PAIRS[:2], method="ga", steps=1, lr=1e-4, progress=False)
    assert run.model in _roles._UNLEARNED and base not in _roles._UNLEARNED
    with pytest.raises(ul.ArgumentOrderError):
        ul.restored(run.model, base, components="mlp.W_out")


@pytest.mark.parametrize(
    "call",
    [
        lambda b, d: ul.patch(b, d, PAIRS, hooks="mlp.hook_post"),
        lambda b, d: ul.patch_residual(b, d, PAIRS),
        lambda b, d: ul.patch_mlp_coefficients(b, d, PAIRS),
        lambda b, d: ul.patch_attention(b, d, PAIRS),
        lambda b, d: ul.restore_sweep(b, d, PAIRS),
        lambda b, d: ul.restored(b, d),
        lambda b, d: ul.score(b, d, PAIRS),
    ],
)
def test_a_dict_of_models_points_to_dissect(pair, call):
    base, unlearned = pair
    with pytest.raises(ul.ConfigError, match=r"dict of 2 models.*ul\.dissect"):
        call(base, {"npo": unlearned, "ga": unlearned})
