"""Each method's loss equals its formula, written out here on log-probs from a plain forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import PAIRS, build_model, perturbed
from unlearnlens.prompts import PromptSet
from unlearnlens.trainers import Batch, TrainData, get_method
from unlearnlens.trainers.data import as_train_set

RETAIN = [
    ("the capital of Italy is", " Rome"),
    ("Question : Where was Mira born ? Answer :", " Berlin"),
    ("Mira likes", " green blue"),
]


def close(a, b, tol=1e-6):
    a, b = float(a), float(b)
    assert abs(a - b) <= tol * max(1.0, abs(b)), (a, b)


def plain_token_logprobs(model, prompts: PromptSet) -> list[list[float]]:
    """Per example, log p of each answer token, from a full forward and log_softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(prompts.tokens).double(), dim=-1)
    out = []
    for i in range(len(prompts)):
        n, m = int(prompts.prompt_lengths[i]), int(prompts.answer_lengths[i])
        out.append([float(logp[i, n - 1 + j, prompts.tokens[i, n + j]]) for j in range(m)])
    return out


def seq_logp(model, prompts):
    return torch.tensor([sum(x) for x in plain_token_logprobs(model, prompts)], dtype=torch.float64)


def token_nll(model, prompts):
    toks = [t for x in plain_token_logprobs(model, prompts) for t in x]
    return -sum(toks) / len(toks)


@pytest.fixture(params=["gpt2", "llama"])
def setup(request):
    ref = build_model(request.param, seed=3)
    theta = perturbed(ref, 0.05, seed=4)
    forget = PromptSet.from_pairs(ref, PAIRS)
    retain = PromptSet.from_pairs(ref, RETAIN)
    return ref, theta, forget, retain


def run_loss(name, ref, theta, forget, retain, **options):
    cls = get_method(name)
    method = cls(cls.config_class(**options))
    with torch.no_grad():
        method.prepare(ref, TrainData(forget, retain, batch_size=2, seed=0))
    f_idx = torch.tensor([2, 0, 3])
    r_idx = torch.tensor([1, 2, 0])
    batch = Batch(forget[f_idx], f_idx, retain[r_idx], r_idx, step=0)
    with torch.no_grad():
        out = method.loss(theta, batch)
    return out, batch, method


def test_ga(setup):
    ref, theta, forget, retain = setup
    out, batch, _ = run_loss("ga", ref, theta, forget, retain, forget_weight=0.7)
    close(out.total, -0.7 * token_nll(theta, batch.forget))


def test_grad_diff(setup):
    ref, theta, forget, retain = setup
    out, batch, _ = run_loss("grad_diff", ref, theta, forget, retain, forget_weight=1.0)
    expected = -token_nll(theta, batch.forget) + 1.5 * token_nll(theta, batch.retain)
    close(out.total, expected)


def npo_term(ref, theta, batch, beta):
    ratio = seq_logp(theta, batch.forget) - seq_logp(ref, batch.forget)
    return float(-(2 / beta) * F.logsigmoid(-beta * ratio).mean())


def test_npo(setup):
    ref, theta, forget, retain = setup
    out, batch, _ = run_loss("npo", ref, theta, forget, retain, beta=0.3)
    close(out.total, npo_term(ref, theta, batch, 0.3))
    # the reference equals the model at the start: the loss is (2/β) log 2
    out0, _, _ = run_loss("npo", ref, ref, forget, retain, beta=0.3)
    close(out0.total, 2 / 0.3 * math.log(2))


def test_npo_rt(setup):
    ref, theta, forget, retain = setup
    out, batch, _ = run_loss("npo_rt", ref, theta, forget, retain, beta=0.1, retain_weight=2.0)
    close(out.total, npo_term(ref, theta, batch, 0.1) + 2.0 * token_nll(theta, batch.retain))


def test_npo_kl(setup):
    ref, theta, forget, retain = setup
    out, batch, method = run_loss("npo_kl", ref, theta, forget, retain, beta=0.1, retain_weight=0.5)
    r = batch.retain
    with torch.no_grad():
        lp_t = torch.log_softmax(theta(r.tokens).double(), -1)
        lp_r = torch.log_softmax(ref(r.tokens).double(), -1)
    kls = []
    for i in range(len(r)):
        n, m = int(r.prompt_lengths[i]), int(r.answer_lengths[i])
        for j in range(m):
            p = lp_r[i, n - 1 + j]
            kls.append(float((p.exp() * (p - lp_t[i, n - 1 + j])).sum()))
    close(out.total, npo_term(ref, theta, batch, 0.1) + 0.5 * sum(kls) / len(kls))
    assert not any(p.requires_grad for p in method.reference.parameters())


def test_simnpo(setup):
    ref, theta, forget, retain = setup
    beta, gamma = 2.5, 0.4
    out, batch, _ = run_loss("simnpo", ref, theta, forget, retain, beta=beta, gamma=gamma)
    logp = seq_logp(theta, batch.forget)
    length = batch.forget.answer_lengths.double()
    expected = -(2 / beta) * F.logsigmoid(-(beta / length) * logp - gamma).mean()
    close(out.total, expected)


def refusal_logp(model, prompts, refusal_ids, rows):
    """log π(refusal_k | prompt) for each prompt, from a plain forward of prompt + refusal."""
    out = []
    for i, k in zip(range(len(prompts)), rows, strict=True):
        n = int(prompts.prompt_lengths[i])
        seq = torch.cat([prompts.tokens[i, :n], torch.tensor(refusal_ids[k % len(refusal_ids)])])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq[None]).double(), -1)[0]
        out.append(sum(float(lp[n - 1 + j, seq[n + j]]) for j in range(len(seq) - n)))
    return torch.tensor(out, dtype=torch.float64)


def test_dpo(setup):
    ref, theta, forget, retain = setup
    refusals = (" who is", " the river")
    out, batch, _ = run_loss(
        "dpo", ref, theta, forget, retain, beta=0.2, refusals=refusals, retain_weight=0.5
    )
    ids = [ref.to_tokens(r, prepend_bos=False)[0].tolist() for r in refusals]
    rows = batch.forget_index.tolist()
    win = refusal_logp(theta, batch.forget, ids, rows) - refusal_logp(ref, batch.forget, ids, rows)
    lose = seq_logp(theta, batch.forget) - seq_logp(ref, batch.forget)
    pref = -(2 / 0.2) * F.logsigmoid(0.2 * (win - lose)).mean()
    close(out.total, pref + 0.5 * token_nll(theta, batch.retain))


def test_dpo_retain(setup):
    ref, theta, forget, retain = setup
    out, batch, _ = run_loss("dpo_retain", ref, theta, forget, retain, beta=0.1)
    win = seq_logp(theta, batch.retain) - seq_logp(ref, batch.retain)
    lose = seq_logp(theta, batch.forget) - seq_logp(ref, batch.forget)
    close(out.total, -(2 / 0.1) * F.logsigmoid(0.1 * (win - lose)).mean())


def test_idk(setup):
    ref, theta, forget, retain = setup
    refusals = (" who is", " the river", " a")
    out, batch, _ = run_loss(
        "idk", ref, theta, forget, retain, refusals=refusals, retain_weight=1.0
    )
    ids = [ref.to_tokens(r, prepend_bos=False)[0].tolist() for r in refusals]
    total, count = 0.0, 0
    for i, k in enumerate(batch.forget_index.tolist()):
        n = int(batch.forget.prompt_lengths[i])
        seq = torch.cat([batch.forget.tokens[i, :n], torch.tensor(ids[k % 3])])
        with torch.no_grad():
            lp = torch.log_softmax(theta(seq[None]).double(), -1)[0]
        for j in range(len(seq) - n):
            total -= float(lp[n - 1 + j, seq[n + j]])
            count += 1
    close(out.total, total / count + token_nll(theta, batch.retain))


@pytest.mark.parametrize("positions", ["target", "all"])
def test_rmu(setup, positions):
    ref, theta, forget, retain = setup
    layer, alpha, scale = 2, 3.0, 4.0
    out, batch, method = run_loss(
        "rmu",
        ref,
        theta,
        forget,
        retain,
        layer=layer,
        alpha=alpha,
        adaptive_scale=scale,
        positions=positions,
    )
    hook = f"blocks.{layer}.hook_resid_post"

    def acts(model, prompts):
        with torch.no_grad():
            _, cache = model.run_with_cache(prompts.tokens, names_filter=hook)
        return cache[hook].double()

    def positions_of(prompts):
        rows = []
        for i in range(len(prompts)):
            n, m = int(prompts.prompt_lengths[i]), int(prompts.answer_lengths[i])
            rows.append(range(n - 1, n + m - 1) if positions == "target" else range(n + m))
        return rows

    # c: scale x mean norm of the starting model's forget activations at the chosen positions
    h_all = acts(ref, forget)
    norms = [float(h_all[i, t].norm()) for i, rows in enumerate(positions_of(forget)) for t in rows]
    close(method.c, scale * sum(norms) / len(norms), tol=1e-5)
    u = method.u.double()
    close(u.norm(), 1.0)

    def mse(h, target, prompts):
        vals = [
            float(
                (
                    (h[i, t] - target[i][t] if isinstance(target, list) else h[i, t] - target).pow(
                        2
                    )
                ).mean()
            )
            for i, rows in enumerate(positions_of(prompts))
            for t in rows
        ]
        return sum(vals) / len(vals)

    forget_term = mse(acts(theta, batch.forget), method.c * u, batch.forget)
    h_ref = acts(ref, batch.retain)
    retain_term = mse(
        acts(theta, batch.retain), [h_ref[i] for i in range(len(batch.retain))], batch.retain
    )
    close(out.total, forget_term + alpha * retain_term, tol=1e-5)


def test_text_chunks_train_every_token():
    """Plain texts: the chunk's answer is everything after its first token (full LM loss)."""
    model = build_model("gpt2", seed=5)
    texts = [
        "the capital of France is Paris . Tolo eats bread fish rice .",
        "Mira works as doctor in Rome",
    ]
    chunks = as_train_set(model, texts, max_length=6, what="forget")
    ids = [model.to_tokens(t, prepend_bos=False)[0].tolist() for t in texts]
    expected = []
    for t in ids:
        for s in range(0, len(t), 5):
            piece = [model.tokenizer.bos_token_id, *t[s : s + 5]]
            if len(piece) >= 2:
                expected.append(piece)
    assert len(chunks) == len(expected)
    for i, piece in enumerate(expected):
        assert chunks.tokens[i, : len(piece)].tolist() == piece
        assert int(chunks.prompt_lengths[i]) == 1
    # GA on the chunks is minus the mean next-token NLL over every real token after the first
    out, _, _ = run_loss("ga", model, model, chunks, chunks)
    idx = torch.tensor([2, 0, 3])
    total, count = 0.0, 0
    for k in idx.tolist():
        piece = torch.tensor(expected[k])
        with torch.no_grad():
            lp = torch.log_softmax(model(piece[None]).double(), -1)[0]
        for j in range(len(piece) - 1):
            total -= float(lp[j, piece[j + 1]])
            count += 1
    close(out.total, -total / count)
