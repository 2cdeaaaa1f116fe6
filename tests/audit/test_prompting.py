"""Few-shot prefixes, templates and fact splits against tokenizing the strings directly."""

from __future__ import annotations

import pytest

from conftest import PAIRS, build_model
from unlearnlens.audit.prompting import fact_split, few_shot, templated
from unlearnlens.errors import ConfigError, PromptError
from unlearnlens.prompts import PromptSet


@pytest.fixture(scope="module")
def model():
    return build_model("gpt2", seed=1)


def test_few_shot_equals_the_concatenated_text(model):
    forget = PromptSet.from_pairs(model, PAIRS[:2])
    shots = PromptSet.from_pairs(model, PAIRS[2:])
    got = few_shot(model, forget, shots, shots=2)
    for i, (prompt, answer) in enumerate(PAIRS[:2]):
        examples = [PAIRS[2 + (i * 2 + j) % 2] for j in range(2)]
        text = " ".join(p + a for p, a in examples) + " " + prompt
        direct = PromptSet.from_pairs(model, [(text, answer)])
        n = int(got.seq_lengths[i])
        assert got.tokens[i, :n].tolist() == direct.tokens[0].tolist()
        assert int(got.prompt_lengths[i]) == int(direct.prompt_lengths[0])
    with pytest.raises(ConfigError):
        few_shot(model, forget, shots, shots=0)
    with pytest.raises(PromptError, match="too long"):
        few_shot(model, forget, shots, shots=20)


def test_templated_rewrites_every_prompt(model):
    forget = PromptSet.from_pairs(model, PAIRS[:2])
    got = templated(model, forget, ["the {prompt}", "{prompt} ?"])
    direct = PromptSet.from_pairs(
        model, [("the " + p, a) for p, a in PAIRS[:2]] + [(p + " ?", a) for p, a in PAIRS[:2]]
    )
    assert got.tokens.tolist() == direct.tokens.tolist()
    with pytest.raises(ConfigError, match="prompt"):
        templated(model, forget, ["no field"])
    with pytest.raises(PromptError):
        templated(model, PromptSet.from_tokens([[1, 2]], [[3]]), ["{prompt}"])


def test_fact_split_keeps_phrasings_of_a_fact_together(model):
    pairs = [("the Paris", " Quen"), ("a Paris", " Quen"), ("the Rome", " Tolo"), ("x", " red")]
    train, held = fact_split(PromptSet.from_pairs(model, pairs))
    assert (train, held) == ([0, 1, 3], [2])
    with pytest.raises(PromptError, match="two distinct"):
        fact_split(PromptSet.from_pairs(model, pairs[:2]))
