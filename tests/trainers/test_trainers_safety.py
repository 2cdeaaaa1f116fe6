"""Checkpoints without pickle, the last finite state, the caller's gradients, seeded runs."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import unlearnlens as ul
from conftest import PAIRS, build_model
from unlearnlens.errors import CheckpointError, ConfigError, FileFormatError, NonFiniteLossError
from unlearnlens.trainers import MethodLoss, UnlearningMethod, register_method, unlearn
from unlearnlens.trainers import unregister_method as unregister
from unlearnlens.trainers.checkpoint import save_checkpoint
from unlearnlens.trainers.losses import forget_nll
from unlearnlens.trainers.optim import MasterOptimizer

FAST = dict(progress=False, eval_every=0, warmup_ratio=0.0)
MARKER = {"ran": False}


class Exploit:
    """A pickle payload: unpickling it calls ``_pwned``."""

    def __reduce__(self):
        return (_pwned, ())


def _pwned():
    MARKER["ran"] = True
    return {}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def model():
    return build_model("gpt2", seed=21)


def checkpointed(model, tmp_path, **kw):
    d = tmp_path / "ck"
    unlearn(model, PAIRS, method="ga", steps=2, lr=1e-3, checkpoint_dir=d, **{**FAST, **kw})
    return d, d / "ckpt-2"


# ------------------------------------------------------------------ checkpoint files


def test_checkpoint_is_safetensors_and_json(model, tmp_path):
    d, folder = checkpointed(model, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors.safetensors"]
    assert json.loads((d / "latest.json").read_text()) == {"folder": "ckpt-2", "step": 2}
    tensors = load_file(folder / "tensors.safetensors")
    for n, p in model.named_parameters():
        assert tensors[f"param/{n}"].shape == p.shape
    assert "rng/torch" in tensors
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 3
    assert not list(d.glob(".*tmp"))  # no temporary left behind


def test_a_crafted_pickle_is_never_loaded(model, tmp_path):
    d, folder = checkpointed(model, tmp_path)
    payload = pickle.dumps(Exploit())
    # the old layout: a state.pt beside the weights
    (folder / "state.pt").write_bytes(payload)
    # and the pickle in place of each real file
    for name in ("tensors.safetensors", "state.json"):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(payload)
        with pytest.raises(FileFormatError, match=re.escape(name)):
            unlearn(model, PAIRS, method="ga", steps=2, lr=1e-3, checkpoint_dir=d, **FAST)
        (folder / name).write_bytes(original)
    assert MARKER["ran"] is False
    src = os.path.join(os.path.dirname(ul.__file__), "trainers")
    for f in os.listdir(src):
        if f.endswith(".py"):
            text = open(os.path.join(src, f)).read()
            assert "torch.load" not in text and "import pickle" not in text, f


def test_non_finite_history_values_survive_a_checkpoint(model, tmp_path):
    """state.json is standard JSON: NaN and infinities are stored as ``{"$float": ...}``."""
    d, folder = checkpointed(model, tmp_path)
    path = folder / "state.json"
    state = json.loads(path.read_text())
    state["history"][1]["loss"] = {"$float": "nan"}
    state["history"][2]["loss"] = {"$float": "-inf"}
    path.write_text(json.dumps(state))
    kw = dict(method="ga", steps=2, lr=1e-3, checkpoint_dir=d, **FAST)
    losses = [row["loss"] for row in unlearn(model, PAIRS, **kw).history[1:]]
    assert losses[0] != losses[0] and losses[1] == float("-inf")
    opt = MasterOptimizer(
        model, dict(model.named_parameters()), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0
    )
    history = [{"step": 0, "a": float("nan"), "b": float("inf"), "c": 2}]
    out = save_checkpoint(tmp_path / "nf", step=0, optimizer=opt, history=history, fingerprint={})

    def no_literal(name):
        raise AssertionError(f"NaN literal {name} in state.json")

    saved = json.loads((out / "state.json").read_text(), parse_constant=no_literal)
    assert saved["history"] == [{"step": 0, "a": {"$float": "nan"}, "b": {"$float": "inf"}, "c": 2}]
    for bad in ("x", {"$float": "many"}, True, [1.0]):
        state["history"][1]["loss"] = bad
        path.write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match=r"state\.json.*non-numeric"):
            unlearn(model, PAIRS, **kw)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_files_name_the_file(model, tmp_path, damage):
    d, folder = checkpointed(model, tmp_path)
    kw = dict(method="ga", steps=2, lr=1e-3, checkpoint_dir=d, **FAST)
    for name in ("tensors.safetensors", "state.json"):
        path = folder / name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2] if damage == "truncate" else b"\x00\x01zz")
        with pytest.raises(FileFormatError, match=re.escape(name)):
            unlearn(model, PAIRS, **kw)
        path.write_bytes(original)
    (d / "latest.json").write_text('{"folder": "../../etc"}')
    with pytest.raises(CheckpointError, match=r"latest\.json"):
        unlearn(model, PAIRS, **kw)
    (d / "latest.json").write_text('{"folder": "ckpt-9", "step": 9}')
    with pytest.raises(CheckpointError, match="ckpt-9"):
        unlearn(model, PAIRS, **kw)


def test_a_wrong_shaped_adamw_moment_is_named(model, tmp_path):
    d, folder = checkpointed(model, tmp_path)
    path = folder / "tensors.safetensors"
    tensors = load_file(path)
    key = "optim/blocks.1.attn.W_Q/exp_avg_sq"
    assert tensors[key].shape == dict(model.named_parameters())["blocks.1.attn.W_Q"].shape
    tensors[key] = torch.zeros(2, 5)
    save_file(tensors, path)
    kw = dict(method="ga", steps=2, lr=1e-3, checkpoint_dir=d, **FAST)
    with pytest.raises(CheckpointError, match=re.escape(f"{key} has shape (2, 5)")):
        unlearn(model, PAIRS, **kw)


def test_failed_resume_leaves_the_caller_model_untouched(model, tmp_path):
    """A checkpoint with one wrong-shaped tensor, then an interrupt while loading: the in-place
    caller's weights and gradients stay exactly as they were."""
    d, folder = checkpointed(model, tmp_path)
    path = folder / "tensors.safetensors"
    tensors = load_file(path)
    good = dict(tensors)
    tensors["param/blocks.3.mlp.W_out"] = torch.zeros(3, 3)
    save_file(tensors, path)
    before = weights(model)
    kw = dict(method="ga", steps=2, lr=1e-3, checkpoint_dir=d, inplace=True, **FAST)
    with pytest.raises(CheckpointError, match=r"tensors.safetensors.*blocks.3.mlp.W_out"):
        unlearn(model, PAIRS, **kw)
    assert same(weights(model), before)
    save_file(good, path)

    calls = {"n": 0}
    copy_ = MasterOptimizer.load_masters

    def interrupted(self, values):
        calls["n"] += 1
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MasterOptimizer, "load_masters", interrupted)
        with pytest.raises(KeyboardInterrupt):
            unlearn(model, PAIRS, **kw)
    assert calls["n"] == 1 and copy_ is MasterOptimizer.load_masters
    assert same(weights(model), before)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ the last finite state


class Overflow(UnlearningMethod):
    """Gradient ascent whose gradient is finite but whose updates overflow (huge lr)."""

    def loss(self, model, batch):
        return MethodLoss(-forget_nll(model, batch))


@pytest.fixture
def overflow():
    register_method("test_overflow")(Overflow)
    yield "test_overflow"
    unregister("test_overflow")


@pytest.mark.parametrize(
    ("dtype", "lr", "what"),
    [
        (torch.float32, 1e37, "loss"),  # weights near 1e38: finite, but the logits overflow
        (torch.float32, 1e38, "weight update"),  # AdamW's first step overflows float32
        (torch.float16, 1e5, "weight update"),  # the master is finite, its fp16 rounding not
    ],
)
def test_non_finite_error_holds_the_last_finite_state(overflow, dtype, lr, what):
    """Huge learning rates make the loss or an update non-finite within a few steps; the
    exception's model is finite and equals a run of exactly the completed steps."""
    model = build_model("gpt2", seed=22, dtype=dtype)
    kw = dict(method=overflow, lr=lr, max_grad_norm=None, weight_decay=0.0, **FAST)
    with pytest.raises(NonFiniteLossError, match=f"non-finite {what}") as info:
        unlearn(model, PAIRS, steps=50, **kw)
    err = info.value
    assert all(bool(torch.isfinite(p).all()) for p in err.model.parameters())
    if err.step > 0:
        shorter = unlearn(model, PAIRS, steps=err.step, **kw)
        assert same(weights(err.model), weights(shorter.model))
    else:
        assert same(weights(err.model), weights(model))


def test_in_place_low_precision_update_says_the_model_is_not_finite(overflow):
    """Without master copies the fp16 update lands in the parameters before it is seen: the
    error must not claim the last finite state, and its model really holds the overflow."""
    model = build_model("gpt2", seed=22, dtype=torch.float16)
    kw = dict(method=overflow, lr=1e5, max_grad_norm=None, weight_decay=0.0, **FAST)
    with pytest.raises(NonFiniteLossError, match="already hold the non-finite update") as info:
        unlearn(model, PAIRS, steps=50, master_weights=False, **kw)
    assert not all(bool(torch.isfinite(p).all()) for p in info.value.model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the caller's


# ------------------------------------------------------------------ the caller's gradients


def test_stale_grads_neither_leak_nor_get_lost(model):
    clean = unlearn(model, PAIRS, method="ga", steps=2, lr=1e-3, **FAST)
    stale = {n: 1e3 * torch.ones_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = stale[n]
    run = unlearn(model, PAIRS, method="ga", steps=2, lr=1e-3, inplace=True, **FAST)
    assert same(weights(run.model), weights(clean.model))  # step 1 saw no stale gradient
    for n, p in model.named_parameters():
        assert p.grad is stale[n]  # the same tensors, back in place


def test_interrupted_inplace_run_leaves_no_new_grads(model):
    class Boom(UnlearningMethod):
        def loss(self, model, batch):
            if batch.step == 1:
                raise KeyboardInterrupt
            return MethodLoss(-forget_nll(model, batch))

    register_method("test_boom_grads")(Boom)
    try:
        model.blocks[1].mlp.W_in.grad = torch.full_like(model.blocks[1].mlp.W_in, 7.0)
        kept = model.blocks[1].mlp.W_in.grad
        with pytest.raises(KeyboardInterrupt):
            unlearn(model, PAIRS, method="test_boom_grads", steps=3, lr=1e-3, inplace=True, **FAST)
        for n, p in model.named_parameters():
            if n == "blocks.1.mlp.W_in":
                assert p.grad is kept
            else:
                assert p.grad is None, n
        # and it stopped after whole step 1: the weights are a 1-step run's
        one = unlearn(build_model("gpt2", seed=21), PAIRS, method="ga", steps=1, lr=1e-3, **FAST)
        assert same(weights(model), weights(one.model))
    finally:
        unregister("test_boom_grads")


def test_interrupt_during_write_back_completes_the_step(model, monkeypatch):
    """A KeyboardInterrupt inside the copy of masters into the model: the copy is finished, so
    no parameter holds half a step."""
    original = MasterOptimizer.write_back
    state = {"n": 0}

    def flaky(self):
        state["n"] += 1
        if state["n"] == 2:  # the second step's write-back, cut after one tensor
            self._pending_write = True
            with torch.no_grad():
                self.params[0].copy_(self.masters[0])
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(MasterOptimizer, "write_back", flaky)
    with pytest.raises(KeyboardInterrupt):
        unlearn(model, PAIRS, method="ga", steps=3, lr=1e-3, inplace=True, **FAST)
    monkeypatch.setattr(MasterOptimizer, "write_back", original)
    two = unlearn(build_model("gpt2", seed=21), PAIRS, method="ga", steps=2, lr=1e-3, **FAST)
    assert same(weights(model), weights(two.model))


# ------------------------------------------------------------------ determinism


class Noisy(UnlearningMethod):
    """Gradient ascent plus noise from the global torch generator (a user's dropout, say)."""

    def loss(self, model, batch):
        noise = torch.randn(()).abs()
        return MethodLoss(-forget_nll(model, batch) * (1 + noise))


def test_seed_everything_seeds_every_generator():
    import random

    import numpy as np

    ul.seed_everything(123)
    got = (random.random(), float(np.random.rand()), float(torch.rand(())))  # noqa: NPY002
    rs = random.Random(123).random()
    ns = float(np.random.RandomState(123).rand())
    ts = float(torch.rand((), generator=torch.Generator().manual_seed(123)))
    assert got == (rs, ns, ts)
    with pytest.raises(ConfigError, match="seed"):
        ul.seed_everything(-1)


def test_deterministic_runs_are_bit_identical_with_two_threads():
    register_method("test_noisy")(Noisy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build_model("llama", seed=23)
        kw = dict(method="test_noisy", steps=4, lr=1e-3, batch_size=2, seed=5, **FAST)
        torch.manual_seed(0)
        caller = torch.get_rng_state()
        a = unlearn(model, PAIRS, deterministic=True, **kw)
        assert torch.equal(torch.get_rng_state(), caller)  # the caller's stream is untouched
        torch.manual_seed(99)
        b = unlearn(model, PAIRS, deterministic=True, **kw)
        assert same(weights(a.model), weights(b.model)) and a.history == b.history
        assert not torch.are_deterministic_algorithms_enabled()
        c = unlearn(model, PAIRS, **kw)  # the global generator differs: so does the run
        assert not same(weights(a.model), weights(c.model))
    finally:
        torch.set_num_threads(threads)
        unregister("test_noisy")


def test_bf16_resume_is_bit_identical_with_its_masters(tmp_path):
    """The checkpoint keeps the float32 masters, not the rounded bf16 weights: a resumed
    bf16 run ends with the same weights and masters as an uninterrupted one."""
    stop = {"at": None}

    class Interruptible(UnlearningMethod):
        def loss(self, model, batch):
            if batch.step == stop["at"]:
                raise KeyboardInterrupt
            return MethodLoss(-forget_nll(model, batch))

    register_method("test_interruptible_ga")(Interruptible)
    try:
        model = build_model("llama", seed=24, dtype=torch.bfloat16)
        kw = dict(
            method="test_interruptible_ga", steps=4, lr=1e-4, batch_size=2, checkpoint_every=2
        )
        full = unlearn(model, PAIRS, checkpoint_dir=tmp_path / "a", **kw, **FAST)
        stop["at"] = 3
        with pytest.raises(KeyboardInterrupt):
            unlearn(model, PAIRS, checkpoint_dir=tmp_path / "b", **kw, **FAST)
        stop["at"] = None
        resumed = unlearn(model, PAIRS, checkpoint_dir=tmp_path / "b", **kw, **FAST)
        assert same(weights(full.model), weights(resumed.model))
        assert same(full.master_weights, resumed.master_weights)
        assert full.history == resumed.history
    finally:
        unregister("test_interruptible_ga")
