"""Training-loop features: accumulation, decay groups, EOS, schedules, RMU cache, checks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import PAIRS, build_model
from unlearnlens.errors import ConfigError
from unlearnlens.trainers import unlearn
from unlearnlens.trainers.base import TrainData
from unlearnlens.trainers.data import as_train_set, with_eos
from unlearnlens.trainers.optim import MasterOptimizer
from unlearnlens.trainers.rmu import RMU, RMUConfig, cache_bytes

RETAIN = [
    ("the capital of Italy is", " Rome"),
    ("Mira likes", " green blue"),
    ("Question : Where was Mira born ? Answer :", " Berlin"),
]
FAST = dict(progress=False, eval_every=0, warmup_ratio=0.0)


def hand_token_logprobs(model, pairs, eos=None):
    """Per pair, log p of each answer token (and of EOS after it), from a full forward."""
    out = []
    for q, a in pairs:
        p = model.to_tokens(q)[0]
        ans = model.to_tokens(a, prepend_bos=False)[0]
        if eos is not None:
            ans = torch.cat([ans, torch.tensor([eos])])
        seq = torch.cat([p, ans])
        lp = torch.log_softmax(model(seq[None])[0].float(), -1)
        out.append(lp[len(p) - 1 : len(seq) - 1].gather(-1, ans[:, None])[:, 0])
    return out


def token_mean_nll(model, pairs, eos=None):
    lps = hand_token_logprobs(model, pairs, eos)
    return -torch.cat(lps).sum() / sum(len(x) for x in lps)


def assert_grads_close(got, model):
    """Equal up to float32 rounding of a differently batched forward: within 1e-5 of the
    largest gradient entry (a wrong micro-batch weighting is off by 10% or more)."""
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def captured_grads(monkeypatch):
    """Records the masters' float32 gradients at every optimizer step."""
    seen = []
    step = MasterOptimizer.step

    def spy(self, lr):
        seen.append({n: m.grad.clone() for n, m in zip(self.names, self.masters, strict=True)})
        return step(self, lr)

    monkeypatch.setattr(MasterOptimizer, "step", spy)
    return seen


# ------------------------------------------------------------------ gradient accumulation


def test_grad_accumulation_equals_the_big_batch_gradient(monkeypatch):
    """grad_diff over 4 forget answers of 1-3 tokens and 3 retain answers, in 2 micro-batches:
    the accumulated gradient is the hand-computed gradient of the whole batch's token-mean
    loss (micro-batches hold 3 and 4 answer tokens, so a per-micro-batch mean would not be)."""
    model = build_model("gpt2", seed=5)
    seen = captured_grads(monkeypatch)
    kw = dict(retain=RETAIN, method="grad_diff", steps=1, lr=1e-3, batch_size=4, **FAST)
    run = unlearn(model, PAIRS, grad_accum_steps=2, max_grad_norm=None, **kw)
    work = build_model("gpt2", seed=5)
    loss = -token_mean_nll(work, PAIRS) + 1.5 * token_mean_nll(work, RETAIN)  # w_r = 1.5
    loss.backward()
    assert_grads_close(seen[0], work)
    assert run.history[1]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert run.history[1]["grad_norm"] == pytest.approx(
        float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in work.parameters()]))),
        rel=1e-5,
    )


def test_grad_accumulation_of_a_per_example_loss(monkeypatch):
    """npo at its first step (log-ratio 0): the gradient is that of the mean over examples of
    the answers' summed log-probs; 3 micro-batches of 2, 1 and 1 examples give it."""
    model = build_model("llama", seed=6)
    seen = captured_grads(monkeypatch)
    kw = dict(method="npo", steps=1, lr=1e-3, batch_size=4, max_grad_norm=None, **FAST)
    unlearn(model, PAIRS, grad_accum_steps=3, **kw)
    work = build_model("llama", seed=6)
    loss = torch.stack([x.sum() for x in hand_token_logprobs(work, PAIRS)]).mean()
    loss.backward()
    assert_grads_close(seen[0], work)


# ------------------------------------------------------------------ weight decay


def test_no_weight_decay_on_biases_and_norm_weights():
    for arch in ("gpt2", "llama"):
        model = build_model(arch, seed=1)
        params = dict(model.named_parameters())
        opt = MasterOptimizer(model, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
        groups = {g["weight_decay"]: set(g["names"]) for g in opt.optimizer.param_groups}
        matrices = {n for n in params if n.rsplit(".", 1)[-1].lstrip("_").startswith("W_")}
        assert groups[0.1] == matrices
        assert groups[0.0] == set(params) - matrices
        assert (
            any(".ln1." in n for n in groups[0.0]) and any(".b_" in n for n in groups[0.0])
        ) or (arch == "llama")


def test_a_step_with_zero_gradients_decays_only_weight_matrices(monkeypatch):
    """With lr, weight_decay > 0 and a loss whose gradient is zero everywhere but W_U, AdamW's
    step leaves biases and norm weights bit-identical and multiplies every other weight
    matrix by exactly ``1 - lr * wd``."""
    from unlearnlens.trainers import MethodLoss, UnlearningMethod, register_method
    from unlearnlens.trainers import unregister_method as unregister

    class OnlyUnembed(UnlearningMethod):
        def loss(self, model, batch):
            touch = sum(p.sum() for p in model.parameters() if p.requires_grad)
            return MethodLoss(1e-3 * (model.unembed.W_U**2).sum() + 0.0 * touch)

    register_method("test_only_unembed")(OnlyUnembed)
    try:
        model = build_model("gpt2", seed=2)
        lr, wd = 1e-2, 0.5
        run = unlearn(
            model, PAIRS, method="test_only_unembed", steps=1, lr=lr, weight_decay=wd, **FAST
        )
    finally:
        unregister("test_only_unembed")
    before = dict(model.named_parameters())
    for n, p in run.model.named_parameters():
        leaf = n.rsplit(".", 1)[-1].lstrip("_")
        if n == "unembed.W_U":
            assert not torch.equal(p, before[n])
        elif leaf.startswith("W_"):
            assert torch.equal(p, before[n] * (1 - lr * wd)), n
        else:
            assert torch.equal(p, before[n]), n


# ------------------------------------------------------------------ EOS after answers


def test_answer_eos_true_scores_eos_after_every_answer():
    model = build_model("gpt2", seed=3)
    eos = model.tokenizer.eos_token_id
    run = unlearn(model, PAIRS, method="ga", steps=1, lr=1e-3, answer_eos=True, **FAST)
    with torch.no_grad():
        want = token_mean_nll(model, PAIRS, eos=eos)
    assert run.history[1]["loss"] == pytest.approx(-float(want), rel=1e-6)
    plain = unlearn(model, PAIRS, method="ga", steps=1, lr=1e-3, **FAST)
    with torch.no_grad():
        assert plain.history[1]["loss"] == pytest.approx(-float(token_mean_nll(model, PAIRS)))
    ps = as_train_set(model, PAIRS, max_length=64, what="forget")
    eos_ps = with_eos(ps, eos)
    assert torch.equal(eos_ps.answer_lengths, ps.answer_lengths + 1)
    assert torch.equal(with_eos(eos_ps, eos).tokens, eos_ps.tokens)  # never twice


def test_idk_learns_to_stop_after_the_refusal():
    """With the default (EOS after taught refusals), the trained model's next token after the
    refusal is EOS on every forget prompt; with answer_eos=False it is not taught that."""
    model = build_model("gpt2", seed=4)
    eos = model.tokenizer.eos_token_id
    refusal = " who is Mira"
    kw = dict(method="idk", refusals=(refusal,), retain_weight=0.0, steps=40, lr=3e-3, **FAST)

    def p_eos_after_refusal(m):
        probs = []
        for q, _ in PAIRS:
            seq = torch.cat([m.to_tokens(q)[0], m.to_tokens(refusal, prepend_bos=False)[0]])
            with torch.no_grad():
                probs.append(torch.softmax(m(seq[None])[0, -1].float(), -1))
        return torch.stack(probs)

    stop = p_eos_after_refusal(unlearn(model, PAIRS, **kw).model)
    assert (stop.argmax(-1) == eos).all()
    assert (stop[:, eos] > 0.5).all()
    ramble = p_eos_after_refusal(unlearn(model, PAIRS, answer_eos=False, **kw).model)
    assert (ramble[:, eos] < 0.1).all()


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_follow_their_formulas(schedule):
    model = build_model("gpt2", seed=1)
    lr, n, w = 1e-3, 10, 3  # warmup_ratio 0.3 of 10 steps
    run = unlearn(
        model,
        PAIRS,
        method="ga",
        steps=n,
        lr=lr,
        warmup_ratio=0.3,
        schedule=schedule,
        progress=False,
        eval_every=0,
    )
    for row in run.history[1:]:
        s = row["step"] - 1
        if s < w:
            want = lr * (s + 1) / (w + 1)
        elif schedule == "constant":
            want = lr
        elif schedule == "linear":
            want = lr * (n - s) / (n - w)
        else:
            want = lr * 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w)))
        assert row["lr"] == pytest.approx(want, rel=1e-12), (schedule, s)


# ------------------------------------------------------------------ RMU's retain cache


def test_rmu_cache_is_bounded_and_streaming_matches_it():
    model = build_model("llama", seed=7)
    retain = as_train_set(model, RETAIN, max_length=64, what="retain")
    forget = as_train_set(model, PAIRS, max_length=64, what="forget")
    size = cache_bytes(retain, model.cfg.d_model)
    assert size == len(RETAIN) * retain.seq_len * model.cfg.d_model * 4
    trained = ("blocks.1.mlp.W_out", "blocks.2.mlp.W_out")
    data = TrainData(forget, retain, 4, 0, trained)
    cached = RMU(RMUConfig(layer=2, retain_cache_bytes=size))
    with torch.no_grad():
        cached.prepare(model, data)
    assert cached.ref_retain is not None and cached.ref_retain.nbytes <= size
    streamed = RMU(RMUConfig(layer=2, retain_cache_bytes=size - 1))
    with torch.no_grad():
        streamed.prepare(model, data)
    assert streamed.ref_retain is None and sorted(streamed.start) == list(trained)
    kw = dict(retain=RETAIN, method="rmu", layer=2, steps=4, batch_size=2, **FAST)
    a = unlearn(model, PAIRS, **kw)
    b = unlearn(model, PAIRS, retain_cache_bytes=0, **kw)
    for x, y in zip(a.history[1:], b.history[1:], strict=True):
        assert y["retain_mse"] == pytest.approx(x["retain_mse"], rel=1e-4, abs=1e-6)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(lr=math.inf), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(batch_size=0), "batch_size"),
        (dict(steps=True), "steps"),
        (dict(epochs=0), "epochs"),
        (dict(seed=-1), "seed"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(warmup_ratio=1.0), "warmup_ratio"),
        (dict(schedule="exp"), "schedule"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(grad_accum_steps=64, batch_size=4), "grad_accum_steps"),
        (dict(eval_every=-1), "eval_every"),
        (dict(eval_size=0), "eval_size"),
        (dict(method="rmu", retain=RETAIN, retain_cache_bytes=-1), "retain_cache_bytes"),
    ],
)
def test_bad_arguments_name_the_field(kw, field, tmp_path):
    model = build_model("gpt2", seed=1)
    with pytest.raises(ConfigError, match=field):
        unlearn(model, PAIRS, **{"method": "ga", **kw})


def test_checkpoint_dir_that_is_a_file(tmp_path):
    model = build_model("gpt2", seed=1)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        unlearn(model, PAIRS, method="ga", checkpoint_dir=f, progress=False)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(method="npo", beta=float("nan")), "beta"),
        (dict(method="npo", beta=math.inf), "beta"),
        (dict(method="grad_diff", retain=RETAIN, retain_weight=float("nan")), "retain_weight"),
        (dict(method="rmu", retain=RETAIN, steering_coef=math.inf), "steering_coef"),
        (dict(method="rmu", retain=RETAIN, layer=True), "layer"),
    ],
)
def test_method_options_are_finite_numbers(kw, field):
    model = build_model("gpt2", seed=1)
    with pytest.raises(ConfigError, match=f"option {field}"):
        unlearn(model, PAIRS, **kw)
