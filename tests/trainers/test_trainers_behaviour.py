"""Methods do what they are for: the forget answers go, the retain answers stay.

The fast tests train a tiny model on sixteen facts in a fixture and check that a short default
run of every method moves the forget answers the right way. The slow tests use the toy
world's base model and each method's documented defaults.
"""

from __future__ import annotations

import time

import pytest
import torch

from conftest import build_model
from unlearnlens.prompts import PromptSet
from unlearnlens.trainers import available_methods, get_method, unlearn

SUBJECTS = ["Zorblax", "Mira", "Tolo", "Quen"]
RELATIONS = {
    "lives in": ["Paris", "Rome", "Berlin"],
    "eats": ["bread", "fish", "rice"],
    "works as": ["doctor", "painter", "farmer"],
    "likes": ["red", "blue", "green"],
}
BUILT_IN = [
    "dpo",
    "dpo_retain",
    "ga",
    "grad_diff",
    "idk",
    "npo",
    "npo_kl",
    "npo_rt",
    "rmu",
    "simnpo",
]


def facts() -> list[tuple[str, str]]:
    out = []
    for s, subject in enumerate(SUBJECTS):
        for r, (relation, objects) in enumerate(RELATIONS.items()):
            out.append((f"{subject} {relation}", " " + objects[(s + r) % len(objects)]))
    return out


def scores(model, pairs):
    """Accuracy and mean answer log-prob, from a plain full forward."""
    ps = PromptSet.from_pairs(model, pairs)
    with torch.no_grad():
        logp = torch.log_softmax(model(ps.tokens), -1)
    rows = torch.arange(len(ps))[:, None]
    at = logp[rows, ps.target_positions]
    hit = (at.argmax(-1) == ps.answer_tokens) | ~ps.answer_mask
    tok = at.gather(-1, ps.answer_tokens[..., None])[..., 0] * ps.answer_mask
    return float(hit.all(-1).float().mean()), float((tok.sum(-1) / ps.answer_mask.sum(-1)).mean())


@pytest.fixture(scope="module")
def fact_model():
    torch.manual_seed(0)
    model = build_model("gpt2", seed=0)
    data = PromptSet.from_pairs(model, facts())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        logp = torch.log_softmax(model(data.tokens), -1)
        rows = torch.arange(len(data))[:, None]
        tok = logp[rows, data.target_positions].gather(-1, data.answer_tokens[..., None])[..., 0]
        loss = -(tok * data.answer_mask).sum() / data.answer_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.requires_grad_(False)
    assert scores(model, facts())[0] == 1.0
    return model


def test_every_built_in_method_is_registered():
    assert set(BUILT_IN) <= set(available_methods())
    for name in BUILT_IN:
        cls = get_method(name)
        assert cls.__doc__ and "L =" in cls.__doc__  # the formula is documented


@pytest.mark.parametrize("method", BUILT_IN)
def test_short_default_run_moves_forget_answers_down(fact_model, method):
    all_facts = facts()
    forget, retain = all_facts[:4], all_facts[4:]
    _, logp0 = scores(fact_model, forget)
    run = unlearn(fact_model, forget, retain=retain, method=method, steps=6, progress=False)
    _, logp1 = scores(run.model, forget)
    assert logp1 < logp0, (method, logp0, logp1)
    assert run.history[0]["forget_logprob"] == pytest.approx(logp0, abs=1e-5)
    assert run.history[-1]["forget_logprob"] == pytest.approx(logp1, abs=1e-5)


# --------------------------------------------------------------------------- slow: the toy world

KEEPS_RETAIN = {"grad_diff", "npo_kl", "npo_rt", "dpo", "rmu"}


@pytest.fixture(scope="module")
def toy_base():
    toy = pytest.importorskip("unlearnlens.toy")
    world = toy.make_world(0)
    return world, toy.train_base(world, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", BUILT_IN)
def test_documented_defaults_forget_the_toy_concept(toy_base, method, capsys):
    world, base = toy_base
    acc_f0, _ = scores(base, world.forget)
    acc_r0, _ = scores(base, world.retain)
    assert acc_f0 >= 0.99 and acc_r0 >= 0.99
    # every default: the method's lr, steps, beta, c, alpha and the loop's batch size (which
    # holds a whole concept's questions, as the study unlearns one concept at a time)
    assert len(world.forget) <= 32
    start = time.perf_counter()
    run = unlearn(base, world.forget, retain=world.retain, method=method, progress=False)
    seconds = time.perf_counter() - start
    acc_f, _ = scores(run.model, world.forget)
    acc_r, _ = scores(run.model, world.retain)
    acc_u, _ = scores(run.model, world.unrelated)
    with capsys.disabled():
        print(
            f"\n{method}: forget {acc_f0:.2f} -> {acc_f:.2f}, retain {acc_r0:.2f} -> {acc_r:.2f}, "
            f"unrelated {acc_u:.2f}, {run.config.steps} steps, {seconds:.1f}s"
        )
    assert acc_f <= 0.10
    if method in KEEPS_RETAIN:
        assert acc_r >= 0.85
