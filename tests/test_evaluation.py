from __future__ import annotations

import math

import pytest
import torch

import unlearnlens.evaluation as evaluation_module
from conftest import PAIRS, build_model, perturbed
from unlearnlens.errors import ConfigError, IncompatibleModelsError, PromptError
from unlearnlens.evaluation import Evaluation, evaluate
from unlearnlens.prompts import PromptSet

SAME_LENGTH = [
    ("Tolo eats", " bread"),
    ("Mira eats", " fish"),
    ("Quen likes", " red"),
    ("Zorblax lives", " in"),
]
TEXTS = ["the capital of France is Paris .", "Mira works as a doctor in Rome", "Tolo eats fish"]


def direct_scores(model, pairs):
    """Accuracy, mean answer log-prob and probability from one full forward pass per pair."""
    acc, logp, prob = [], [], []
    with torch.no_grad():
        for prompt, answer in pairs:
            p = model.to_tokens(prompt)[0]
            a = model.to_tokens(answer, prepend_bos=False)[0]
            tokens = torch.cat([p, a])[None]
            lp = torch.log_softmax(model(tokens)[0].float(), dim=-1)
            n, m = len(p), len(a)
            rows = lp[n - 1 : n + m - 1]
            tok = rows[torch.arange(m), a]
            acc.append(float(bool((rows.argmax(-1) == a).all())))
            logp.append(float(tok.mean()))
            prob.append(float(tok.exp().mean()))
    return {
        "accuracy": sum(acc) / len(acc),
        "logprob": sum(logp) / len(logp),
        "prob": sum(prob) / len(prob),
    }


def direct_perplexity(model, texts):
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            tokens = model.to_tokens(text)
            lp = torch.log_softmax(model(tokens)[0].float(), dim=-1)
            for t in range(tokens.shape[1] - 1):
                nll -= float(lp[t, tokens[0, t + 1]])
                count += 1
    return math.exp(nll / count)


def greedy_no_cache(model, prompt, max_new_tokens):
    """Greedy decoding by repeated full forward passes, stopping at EOS (not kept)."""
    ids = model.to_tokens(prompt)[0].tolist()
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            out.append(nxt)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_split_scores_match_a_direct_forward(arch):
    base = build_model(arch, seed=1)
    other = perturbed(base, 0.2, seed=3)
    ev = evaluate(
        {"base": base, "other": other}, forget=PAIRS[:2], retain=PAIRS[2:], unrelated=PAIRS
    )
    assert ev.models == ["base", "other"]
    for name, model in (("base", base), ("other", other)):
        for split, pairs in (("forget", PAIRS[:2]), ("retain", PAIRS[2:]), ("unrelated", PAIRS)):
            want = direct_scores(model, pairs)
            for metric, value in want.items():
                assert ev[name][f"{split}/{metric}"] == pytest.approx(value, abs=1e-5)


def test_a_single_model_gets_one_row_and_a_promptset_is_accepted():
    model = build_model("llama", seed=4)
    ps = PromptSet.from_pairs(model, PAIRS)
    ev = evaluate(model, forget=ps)
    assert ev.models == ["model"]
    assert list(ev.table.columns) == ["forget/accuracy", "forget/logprob", "forget/prob"]
    assert ev["model"]["forget/logprob"] == pytest.approx(
        direct_scores(model, PAIRS)["logprob"], abs=1e-5
    )
    with pytest.raises(KeyError, match="no model named 'nope'"):
        ev["nope"]


def test_perplexity_follows_the_formula():
    model = build_model("gpt2", seed=5)
    ev = evaluate(model, forget=None, capability=TEXTS, batch_size=2)
    assert ev["model"]["capability/perplexity"] == pytest.approx(
        direct_perplexity(model, TEXTS), rel=1e-5
    )
    assert ev.meta["capability"] == "perplexity"


def test_capability_pairs_give_task_accuracy():
    model = build_model("llama", seed=6)
    ev = evaluate(model, forget=None, capability=PAIRS)
    want = direct_scores(model, PAIRS)
    assert ev["model"]["capability/accuracy"] == want["accuracy"]
    assert ev["model"]["capability/logprob"] == pytest.approx(want["logprob"], abs=1e-5)


def test_generation_drift_against_a_reference():
    from rouge_score import rouge_scorer

    base = build_model("llama", seed=1)
    other = perturbed(base, 0.3, seed=9)
    ev = evaluate(
        {"base": base, "other": other},
        forget=PAIRS,
        unrelated=SAME_LENGTH,
        reference=base,
        max_new_tokens=4,
    )
    # a model compared with itself
    assert ev["base"]["forget/exact_match"] == 1.0
    assert ev["base"]["forget/rouge_l"] == 1.0
    # another model: against generations computed here without a key/value cache (prompts of
    # equal length are generated as one batch by evaluate)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for split, pairs in (("forget", PAIRS), ("unrelated", SAME_LENGTH)):
        exact, rouge = [], []
        for prompt, _ in pairs:
            ref = greedy_no_cache(base, prompt, 4)
            got = greedy_no_cache(other, prompt, 4)
            exact.append(float(ref == got))
            a = base.tokenizer.decode(got, skip_special_tokens=True)
            b = base.tokenizer.decode(ref, skip_special_tokens=True)
            rouge.append(1.0 if a == b else scorer.score(b, a)["rougeL"].fmeasure)
        assert ev["other"][f"{split}/exact_match"] == pytest.approx(sum(exact) / len(exact))
        assert ev["other"][f"{split}/rouge_l"] == pytest.approx(sum(rouge) / len(rouge))
        assert ev["other"][f"{split}/exact_match"] < 1.0  # the two models do differ
    assert ev.meta["max_new_tokens"] == 4


def test_batched_generation_equals_one_prompt_at_a_time():
    model = build_model("gpt2", seed=7)
    ids = [model.to_tokens(p)[0].tolist() for p, _ in SAME_LENGTH + PAIRS]
    got = evaluation_module._generate(model, ids, 6)
    assert got == [greedy_no_cache(model, p, 6) for p, _ in SAME_LENGTH + PAIRS]


def test_save_load_round_trip(tmp_path):
    base = build_model("gpt2", seed=1)
    ev = evaluate({"a": base, "b": perturbed(base, 0.1, seed=2)}, forget=PAIRS, capability=TEXTS)
    path = ev.save(tmp_path / "ev.json")
    back = Evaluation.load(path)
    assert back == ev
    assert back.table.equals(ev.table)
    changed = ev.to_dataframe()
    changed.iloc[0, 0] += 1.0
    assert Evaluation(changed, ev.meta) != ev
    assert ev.to_dataframe() is not ev.table


def test_bad_input_is_refused_before_any_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(evaluation_module, "target_logits", forbidden)
    monkeypatch.setattr(evaluation_module, "_generate", forbidden)
    gpt2, llama = build_model("gpt2", seed=1), build_model("llama", seed=1)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(gpt2, forget=None)
    with pytest.raises(PromptError, match="retain split is empty"):
        evaluate(gpt2, forget=PAIRS, retain=[])
    with pytest.raises(IncompatibleModelsError, match="'g' and 'l'"):
        evaluate({"g": gpt2, "l": llama}, forget=PAIRS)
    with pytest.raises(IncompatibleModelsError, match="reference"):
        evaluate(gpt2, forget=PAIRS, reference=llama)
    with pytest.raises(PromptError, match="capability text 1"):
        evaluate(gpt2, forget=PAIRS, capability=["the city of Rome", ""])
    with pytest.raises(ConfigError, match="empty"):
        evaluate({}, forget=PAIRS)


def _state(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()),
        [p.detach().clone() for p in model.parameters()],
    )


def _same_state(a, b):
    return (
        a[0] == b[0]
        and a[1] == b[1]
        and a[2] == b[2]
        and all(torch.equal(x, y) for x, y in zip(a[3], b[3], strict=True))
    )


def test_models_come_back_unchanged_also_after_an_interrupt(monkeypatch):
    base = build_model("llama", seed=1)
    other = perturbed(base, 0.1, seed=2)
    base.train()
    other.blocks[0].mlp.W_out.requires_grad_(False)
    before = {id(m): _state(m) for m in (base, other)}
    evaluate(
        {"base": base, "other": other},
        forget=PAIRS,
        reference=base,
        capability=TEXTS,
        max_new_tokens=2,
    )
    assert all(_same_state(before[id(m)], _state(m)) for m in (base, other))

    real = evaluation_module.target_logits
    calls = []

    def interrupted(model, prompts):
        model.blocks[0].hook_resid_pre.add_hook(lambda act, hook: act)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, prompts)

    monkeypatch.setattr(evaluation_module, "target_logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate({"base": base, "other": other}, forget=PAIRS, retain=PAIRS)
    assert all(_same_state(before[id(m)], _state(m)) for m in (base, other))


def test_bfloat16_models_score_in_float32():
    model = build_model("llama", seed=1, dtype=torch.bfloat16)
    ev = evaluate(model, forget=PAIRS, capability=TEXTS)
    values = ev["model"]
    assert all(math.isfinite(v) for v in values.values())
    ref = build_model("llama", seed=1)  # the same weights in float32
    want = direct_scores(ref, PAIRS)
    assert values["forget/logprob"] == pytest.approx(want["logprob"], abs=0.3)
