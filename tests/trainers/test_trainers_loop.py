"""The shared loop: registry, guards, checkpoints, determinism, freezing, the caller's model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import PAIRS, build_model
from unlearnlens.errors import (
    ComponentError,
    ConfigError,
    NonFiniteLossError,
    PromptError,
    UnknownMethodError,
)
from unlearnlens.trainers import (
    MethodConfig,
    MethodLoss,
    UnlearningMethod,
    available_methods,
    register_method,
    relearn,
    unlearn,
    unregister_method,
)
from unlearnlens.trainers.npo import NPO

RETAIN = [
    ("the capital of Italy is", " Rome"),
    ("Mira likes", " green blue"),
    ("Question : Where was Mira born ? Answer :", " Berlin"),
]
FAST = dict(progress=False, eval_every=0, warmup_ratio=0.0)


def snapshot(model):
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()),
    }


def assert_same(model, snap):
    now = snapshot(model)
    assert now["grads"] == snap["grads"]
    assert now["modes"] == snap["modes"]
    assert now["hooks"] == snap["hooks"]
    for n, w in snap["weights"].items():
        assert torch.equal(now["weights"][n], w), n


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture
def model():
    m = build_model("gpt2", seed=11)
    m.blocks[0].requires_grad_(False)  # the caller's own flags and modes, to be kept
    m.blocks[2].train()
    return m


@dataclass(frozen=True)
class ScaledNLLConfig(MethodConfig):
    scale: float = 1.0
    """Multiplier of the forget NLL (negative: ascent)."""
    blow_up_at: int = -1
    """Return an infinite loss from this step on (-1: never)."""

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ConfigError("scale must be non-zero")


class ScaledNLL(UnlearningMethod):
    """A user's method: ``scale · mean -log p(answer)``, computed by hand from full logits."""

    config_class = ScaledNLLConfig
    default_lr = 1e-2
    default_steps = 3

    def loss(self, model, batch):
        f = batch.forget
        logp = torch.log_softmax(model(f.tokens), -1)
        rows = torch.arange(len(f))[:, None]
        tok = logp[rows, f.target_positions, f.answer_tokens]
        value = -(tok * f.answer_mask).sum() / f.answer_mask.sum()
        if 0 <= self.config.blow_up_at <= batch.step:
            value = value * float("inf")
        return MethodLoss(self.config.scale * value, {"nll": value})


@pytest.fixture
def user_method():
    register_method("test_scaled_nll")(ScaledNLL)
    yield "test_scaled_nll"
    unregister_method("test_scaled_nll")


def test_user_method_trains_through_unlearn(model, user_method):
    run = unlearn(model, PAIRS, method=user_method, steps=4, scale=-1.0, **FAST)
    assert run.config.lr == ScaledNLL.default_lr and run.config.steps == 4
    assert run.method_config == ScaledNLLConfig(scale=-1.0)
    assert [h["step"] for h in run.history] == [0, 1, 2, 3, 4]
    frame = run.history_frame()
    assert frame["forget_logprob"].iloc[-1] < frame["forget_logprob"].iloc[0]  # ascent
    assert not same_weights(run.model, model)
    assert user_method in available_methods()


def test_registry_rejects_duplicates_and_unknown_names(user_method):
    with pytest.raises(ValueError, match="already registered"):
        register_method(user_method)(ScaledNLL)
    with pytest.raises(ValueError, match="already registered"):
        register_method("npo")(ScaledNLL)
    with pytest.raises(UnknownMethodError, match=r"'nope'.*dpo.*ga.*npo.*rmu"):
        unlearn(build_model("gpt2", seed=0), PAIRS, method="nope")
    with pytest.raises(TypeError):
        register_method("not_a_method")(object)


def test_unknown_option_lists_the_method_options(model):
    with pytest.raises(ConfigError, match=r"no option\(s\) \['betta'\].*beta"):
        unlearn(model, PAIRS, method="npo", betta=0.1)
    with pytest.raises(ConfigError, match="beta must be positive"):
        unlearn(model, PAIRS, method="npo", beta=-1.0)


def test_bad_input_fails_before_any_work(model, tmp_path):
    snap = snapshot(model)
    ckpt = tmp_path / "ckpt"
    cases = [
        (ConfigError, "needs a retain set", dict(method="npo_kl")),
        (ConfigError, "needs a retain set", dict(method="grad_diff")),
        (ComponentError, "unknown component 'mlp.W_up'", dict(params={"components": "mlp.W_up"})),
        (ComponentError, "has no 'mlp.W_gate'", dict(params="mlp.W_gate")),
        (ComponentError, "empty", dict(params=[])),
        (ConfigError, "steps or epochs", dict(steps=3, epochs=1)),
        (ConfigError, "lr must be a positive number", dict(lr=-1.0)),
    ]
    for err, msg, kw in cases:
        with pytest.raises(err, match=msg):
            unlearn(model, PAIRS, checkpoint_dir=ckpt, **{**FAST, **kw})
    with pytest.raises(PromptError, match="forget set is empty"):
        unlearn(model, [], checkpoint_dir=ckpt, **FAST)
    with pytest.raises(PromptError, match="retain set is empty"):
        unlearn(model, PAIRS, retain=[], method="npo_rt", checkpoint_dir=ckpt, **FAST)
    assert not ckpt.exists()
    assert_same(model, snap)


def test_caller_model_untouched_and_inplace(model):
    snap = snapshot(model)
    run = unlearn(model, PAIRS, retain=RETAIN, method="npo_kl", steps=3, lr=1e-2, **FAST)
    assert_same(model, snap)
    assert run.model is not model and not same_weights(run.model, model)
    # the copy comes back with the caller's modes and grad flags
    assert [m.training for m in run.model.modules()] == snap["modes"]
    assert {n: p.requires_grad for n, p in run.model.named_parameters()} == snap["grads"]
    run2 = unlearn(model, PAIRS, method="ga", steps=2, lr=1e-2, inplace=True, **FAST)
    assert run2.model is model
    now = snapshot(model)
    assert now["grads"] == snap["grads"] and now["modes"] == snap["modes"]
    assert any(not torch.equal(now["weights"][n], w) for n, w in snap["weights"].items())


def test_caller_model_untouched_after_interrupt(model, user_method):
    snap = snapshot(model)

    class Boom(ScaledNLL):
        def loss(self, model, batch):
            if batch.step == 1:
                raise KeyboardInterrupt
            return super().loss(model, batch)

    register_method("test_boom")(Boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            unlearn(model, PAIRS, method="test_boom", steps=3, **FAST)
        assert_same(model, snap)
        with pytest.raises(KeyboardInterrupt):
            unlearn(model, PAIRS, method="test_boom", steps=3, inplace=True, **FAST)
        now = snapshot(model)
        assert now["grads"] == snap["grads"] and now["modes"] == snap["modes"]
    finally:
        unregister_method("test_boom")


def test_params_freeze_everything_else(model):
    run = unlearn(
        model,
        PAIRS,
        method="ga",
        steps=3,
        lr=1e-2,
        params={"layers": [1, 3], "components": "mlp.W_out"},
        **FAST,
    )
    assert run.trained == ("blocks.1.mlp.W_out", "blocks.3.mlp.W_out")
    before = dict(model.named_parameters())
    for n, p in run.model.named_parameters():
        if n in run.trained:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_rmu_trains_only_its_default_parameters(model):
    run = unlearn(model, PAIRS, retain=RETAIN, method="rmu", layer=2, steps=2, **FAST)
    assert run.trained == ("blocks.0.mlp.W_out", "blocks.1.mlp.W_out", "blocks.2.mlp.W_out")
    before = dict(model.named_parameters())
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(run.trained)


def test_deterministic_for_a_seed(model):
    kw = dict(retain=RETAIN, method="npo_rt", steps=4, lr=1e-2, batch_size=2, **FAST)
    a = unlearn(model, PAIRS, seed=3, **kw)
    b = unlearn(model, PAIRS, seed=3, **kw)
    c = unlearn(model, PAIRS, seed=4, **kw)
    assert same_weights(a.model, b.model)
    assert a.history == b.history
    assert not same_weights(a.model, c.model)


def test_non_finite_loss_stops_at_last_finite_state(model, user_method):
    kw = dict(method=user_method, scale=-1.0, lr=1e-2, batch_size=2, **FAST)
    with pytest.raises(NonFiniteLossError, match=r"'test_scaled_nll'.*step 3") as info:
        unlearn(model, PAIRS, steps=6, blow_up_at=3, **kw)
    finite = unlearn(model, PAIRS, steps=3, **kw)
    assert info.value.step == 3
    assert same_weights(info.value.model, finite.model)
    # in place: the caller's model itself is left after step 2, flags and modes restored
    snap = snapshot(model)
    with pytest.raises(NonFiniteLossError):
        unlearn(model, PAIRS, steps=6, blow_up_at=3, inplace=True, **kw)
    assert same_weights(model, finite.model)
    now = snapshot(model)
    assert now["grads"] == snap["grads"] and now["modes"] == snap["modes"]


def test_exploding_learning_rate_is_caught(model):
    with pytest.raises(NonFiniteLossError, match="'ga'") as info:
        unlearn(
            model,
            PAIRS,
            method="ga",
            steps=20,
            lr=1e30,
            max_grad_norm=None,
            weight_decay=0.0,
            **FAST,
        )
    assert all(torch.isfinite(p).all() for p in info.value.model.parameters())


def test_resume_from_checkpoint_is_bit_identical(model, tmp_path):
    stop = {"at": None}

    class Interruptible(NPO):
        def loss(self, model, batch):
            if batch.step == stop["at"]:
                raise KeyboardInterrupt
            return super().loss(model, batch)

    register_method("test_interruptible_npo")(Interruptible)
    try:
        kw = dict(
            method="test_interruptible_npo",
            steps=7,
            lr=1e-2,
            batch_size=3,
            eval_every=2,
            warmup_ratio=0.3,
            schedule="linear",
            checkpoint_every=2,
            progress=False,
        )
        full = unlearn(model, PAIRS, checkpoint_dir=tmp_path / "a", **kw)
        stop["at"] = 5
        with pytest.raises(KeyboardInterrupt):
            unlearn(model, PAIRS, checkpoint_dir=tmp_path / "b", **kw)
        assert (tmp_path / "b" / "ckpt-4").is_dir()
        stop["at"] = None
        resumed = unlearn(model, PAIRS, checkpoint_dir=tmp_path / "b", **kw)
        assert same_weights(full.model, resumed.model)
        assert full.history == resumed.history
        with pytest.raises(ConfigError, match="other settings"):
            unlearn(model, PAIRS, checkpoint_dir=tmp_path / "b", **{**kw, "lr": 2e-2})
    finally:
        unregister_method("test_interruptible_npo")


def test_epochs_and_history(model):
    run = unlearn(
        model,
        PAIRS,
        retain=RETAIN,
        method="grad_diff",
        epochs=2,
        batch_size=3,
        lr=1e-3,
        progress=False,
        eval_every=2,
    )
    assert run.config.steps == 4  # 2 epochs of ceil(4 / 3) batches
    frame = run.history_frame()
    assert list(frame.index) == [0, 1, 2, 3, 4]
    evaluated = frame["forget_accuracy"].notna()
    assert list(frame.index[evaluated]) == [0, 2, 4]
    assert {"loss", "lr", "grad_norm", "forget_nll", "retain_nll", "retain_logprob"} <= set(frame)


def plain_scores(model, pairs):
    """Accuracy and mean answer log-prob per pair, from a full forward on each pair."""
    acc, logp = [], []
    for q, a in pairs:
        p = model.to_tokens(q)[0]
        ans = model.to_tokens(a, prepend_bos=False)[0]
        seq = torch.cat([p, ans])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq[None])[0], -1)
        rows = lp[len(p) - 1 : len(seq) - 1]
        acc.append(float((rows.argmax(-1) == ans).all()))
        logp.append(float(rows.gather(-1, ans[:, None]).mean()))
    return sum(acc) / len(acc), sum(logp) / len(logp)


def test_relearn_reports_before_and_after(model):
    snap = snapshot(model)
    run = relearn(model, PAIRS[:3], steps=5, lr=1e-2, batch_size=2, eval=PAIRS, progress=False)
    assert_same(model, snap)
    acc0, logp0 = plain_scores(model, PAIRS)
    _, logp1 = plain_scores(run.model, PAIRS)
    assert run.before["eval_accuracy"] == pytest.approx(acc0)
    assert run.before["eval_logprob"] == pytest.approx(logp0, abs=1e-5)
    assert run.after["eval_logprob"] == pytest.approx(logp1, abs=1e-5)
    assert logp1 > logp0  # fine-tuning on the eval answers raises their log-prob
    assert len(run.history) == 6


def test_bfloat16_model_trains_in_its_dtype():
    model = build_model("llama", seed=2, dtype=torch.bfloat16)
    run = unlearn(model, PAIRS, retain=RETAIN, method="npo_kl", steps=3, lr=1e-2, **FAST)
    assert all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    assert run.history[-1]["forget_logprob"] < run.history[0]["forget_logprob"]
