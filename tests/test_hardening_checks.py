"""Arguments are checked, never coerced: integers where integers are meant, finite numbers.

The test suite runs every function under a run-time type checker that users do not have; these
tests switch it off because they are about what users get.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS
from unlearnlens._checks import check_batch_size, check_float, check_int, check_layers
from unlearnlens.errors import ConfigError, LayerError, UnlearnLensError

pytestmark = pytest.mark.usefixtures("without_type_checker")


@pytest.mark.parametrize(
    "layers",
    [
        [1.7],
        1.7,
        "13",
        "1",
        True,
        [True],
        [False, 1],
        [1, None],
        b"1",
        {1: 2},
        [np.float64(1)],
        [torch.tensor(1.0)],
        [torch.tensor(True)],
        np.array(2.0),
        np.bool_(True),
    ],
)
def test_non_integer_layers_are_refused(gpt2_pair, layers, no_forward):
    base, unlearned = gpt2_pair
    with pytest.raises(LayerError, match="integer"):
        check_layers(base, layers)
    with pytest.raises(LayerError, match="integer"):
        ul.patch_mlp_coefficients(base, unlearned, PAIRS, layers=layers, progress=False)
    with pytest.raises(LayerError, match="integer"):
        ul.restore_sweep(base, unlearned, PAIRS, layers=layers, progress=False)
    with pytest.raises(LayerError, match="integer"):
        ul.mlp_coefficients(base, PAIRS, layers=layers)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (np.int64(2), [2]),
        (np.array(1), [1]),
        ([np.int32(0), -1], [0, 3]),
        (np.array([1, 3]), [1, 3]),
        (torch.tensor([2, 0]), [2, 0]),
        (range(1, 3), [1, 2]),
        ((3,), [3]),
        (None, [0, 1, 2, 3]),
    ],
)
def test_integer_layers_of_every_kind_are_accepted(gpt2_pair, layers, expected):
    base, _ = gpt2_pair
    out = check_layers(base, layers)
    assert out == expected and all(type(v) is int for v in out)


def test_numpy_layers_give_the_same_sweep_as_python_ints(gpt2_pair):
    base, unlearned = gpt2_pair
    want = ul.patch_mlp_coefficients(base, unlearned, PAIRS, layers=[1, 2], progress=False)
    got = ul.patch_mlp_coefficients(
        base, unlearned, PAIRS, layers=np.array([1, 2]), window=np.int64(3), progress=False
    )
    want3 = ul.patch_mlp_coefficients(
        base, unlearned, PAIRS, layers=[1, 2], window=3, progress=False
    )
    assert got.axes == want3.axes == want.axes
    assert torch.equal(got.scores, want3.scores)
    assert got.meta["window"] == 3 and type(got.meta["window"]) is int


@pytest.mark.parametrize("window", [2, 0, -1, 3.0, "3", True, np.float32(3), None])
def test_bad_windows_are_refused(gpt2_pair, window, no_forward):
    base, unlearned = gpt2_pair
    with pytest.raises(LayerError, match="window must be a positive odd number"):
        ul.patch_attention(base, unlearned, PAIRS, window=window, progress=False)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, "4", True, np.float64(2)])
def test_bad_batch_sizes_are_refused_everywhere_before_work(gpt2_pair, batch_size, no_forward):
    base, unlearned = gpt2_pair
    calls = [
        lambda: ul.patch(
            base, unlearned, PAIRS, hooks="resid_pre", batch_size=batch_size, progress=False
        ),
        lambda: ul.restore_sweep(base, unlearned, PAIRS, batch_size=batch_size, progress=False),
        lambda: ul.mlp_coefficients(base, PAIRS, batch_size=batch_size),
        lambda: ul.compare_coefficients(base, unlearned, PAIRS, batch_size=batch_size),
        lambda: ul.logit_lens(base, PAIRS, batch_size=batch_size),
        lambda: ul.evaluate(base, forget=PAIRS, batch_size=batch_size),
        lambda: ul.dissect(base, unlearned, PAIRS, batch_size=batch_size, progress=False),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match="batch_size"):
            call()


def test_numpy_batch_size_is_an_integer_and_gives_the_same_scores(gpt2_pair):
    base, unlearned = gpt2_pair
    want = ul.patch_mlp_coefficients(base, unlearned, PAIRS, batch_size=1, progress=False)
    got = ul.patch_mlp_coefficients(base, unlearned, PAIRS, batch_size=np.int64(1), progress=False)
    assert torch.allclose(got.scores, want.scores, atol=1e-6)
    assert check_batch_size(None) is None and check_batch_size(np.int16(5)) == 5


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, np.float32("nan"), "1e-3", True])
def test_non_finite_or_non_numeric_reals_are_refused(bad):
    with pytest.raises(ConfigError, match="lr"):
        check_float(bad, "lr", positive=True)


def test_training_config_refuses_infinite_rates_and_nan_clipping(gpt2_pair, no_forward):
    base, _ = gpt2_pair
    unlearn = ul.unlearn
    for kw, word in [
        (dict(lr=math.inf), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(lr=0.0), "lr"),
        (dict(lr=1e-3, max_grad_norm=math.nan), "max_grad_norm"),
        (dict(lr=1e-3, max_grad_norm=math.inf), "max_grad_norm"),
        (dict(lr=1e-3, steps=2.0), "steps"),
        (dict(lr=1e-3, steps=True), "steps"),
        (dict(lr=1e-3, batch_size=0), "batch_size"),
    ]:
        kw.setdefault("steps", 1)
        with pytest.raises(ConfigError, match=word):
            unlearn(base, PAIRS, method="ga", progress=False, **kw)


@pytest.mark.parametrize("value", [1.0, "2", True, np.bool_(True), None, 2.5])
def test_check_int_refuses_what_is_not_an_integer(value):
    with pytest.raises(ConfigError, match="top_k must be an integer"):
        check_int(value, "top_k")


def test_top_k_and_neurons_take_numpy_integers_and_refuse_floats(gpt2_pair, no_forward):
    base, unlearned = gpt2_pair
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="top_k"):
            ul.compare_coefficients(base, unlearned, PAIRS, top_k=bad)
        with pytest.raises(ConfigError, match="top_k"):
            ul.dissect(base, unlearned, PAIRS, top_k=bad, progress=False)
    with pytest.raises(LayerError, match="neuron"):
        ul.vocab_projection(base, 0, 1.5)
    with pytest.raises(ConfigError, match="k must"):
        ul.vocab_projection(base, 0, 1, k=2.0)


def test_vocab_projection_with_numpy_indices_matches_the_weights(gpt2_pair):
    base, _ = gpt2_pair
    got = ul.vocab_projection(base, np.int64(1), np.int64(3), k=np.int64(4))
    logits = base.blocks[1].mlp.W_out[3].detach() @ base.unembed.W_U.detach()
    top = logits.topk(4)
    assert [round(v, 4) for _, v in got] == [round(float(v), 4) for v in top.values]


def test_every_refusal_is_a_library_error(gpt2_pair):
    base, _ = gpt2_pair
    for bad in ([1.7], "13", True):
        with pytest.raises(UnlearnLensError):
            check_layers(base, bad)


@pytest.mark.parametrize(
    ("method", "options", "word"),
    [
        ("npo", {"beta": math.nan}, "beta"),
        ("npo", {"beta": "0.1"}, "beta"),
        ("rmu", {"alpha": math.inf}, "alpha"),
        ("grad_diff", {"retain_weight": math.nan}, "retain_weight"),
    ],
)
def test_method_options_are_checked_against_their_types(
    gpt2_pair, method, options, word, no_forward
):
    base, _ = gpt2_pair
    with pytest.raises(ConfigError, match=word):
        ul.unlearn(base, PAIRS, method=method, steps=1, progress=False, **options)
