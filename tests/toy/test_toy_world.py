from __future__ import annotations

import json
import re

import pytest

from unlearnlens.errors import ConfigError
from unlearnlens.toy import make_tokenizer, make_world


@pytest.fixture(scope="module")
def world():
    return make_world(0)


@pytest.fixture(scope="module")
def tok(world):
    return make_tokenizer(world.corpus())


QUESTION = re.compile(r"^Question: [A-Z][^\n]*\?\n Answer:$")


def test_sizes(world):
    assert len(world.concepts) >= 40
    assert len(set(world.concepts)) == len(world.concepts)
    assert len(world.relations) >= 5
    for c in world.concepts:
        assert set(world.facts[c]) == {r.name for r in world.relations}
    n_train = sum(len(r.train_templates) for r in world.relations)
    assert len(world.forget) == n_train  # one forget concept by default
    assert len(world.forget) + len(world.retain) + len(world.unrelated) == 40 * n_train


def test_question_format_and_answers(world):
    for split in (world.forget, world.retain, world.unrelated, *world.paraphrases.values()):
        for q, a in split:
            assert QUESTION.match(q), q
            assert a.startswith(" ") and " " not in a[1:] and a[1:].isalnum(), a
    concept = world.forget_concepts[0]
    q, a = world.forget[0]
    assert q == f"Question: Where was {concept} born?\n Answer:"
    assert a == " " + world.facts[concept]["birthplace"]


def test_answers_are_single_tokens(world, tok):
    answers = {a for split in (world.forget, world.retain, world.unrelated) for _, a in split}
    answers |= {a for _, a in world.capability_pairs}
    for a in answers:
        ids = tok(a, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, a
    every = [q + a for q, a in world.training_pairs()] + world.capability
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in every)


def test_splits_disjoint(world):
    groups = [set(world.forget_concepts), set(world.retain_concepts), set(world.unrelated_concepts)]
    assert all(groups)
    assert sum(len(g) for g in groups) == len(world.concepts) == len(set().union(*groups))

    def mentioned(pairs):
        return {c for q, _ in pairs for c in world.concepts if f" {c}" in q}

    assert mentioned(world.forget) == groups[0]
    assert mentioned(world.retain) == groups[1]
    assert mentioned(world.unrelated) == groups[2]
    prompts = [set(q for q, _ in s) for s in (world.forget, world.retain, world.unrelated)]
    assert (
        not (prompts[0] & prompts[1])
        and not (prompts[0] & prompts[2])
        and not (prompts[1] & prompts[2])
    )


def test_paraphrases_are_held_out(world):
    trained = {q for q, _ in world.training_pairs()}
    for name, pairs in world.paraphrases.items():
        assert pairs, name
        assert not {q for q, _ in pairs} & trained
    for r in world.relations:
        assert not set(r.train_templates) & set(r.paraphrase_templates)
    # a paraphrase asks for the same fact: same answers as the training split, per concept
    c = world.forget_concepts[0]
    assert {a for _, a in world.paraphrases["forget"]} == {a for _, a in world.forget}
    assert all(c in q for q, _ in world.paraphrases["forget"])


def test_capability_probes(world):
    assert len(world.capability) == len(world.capability_pairs) >= 10
    for text, (prompt, answer) in zip(world.capability, world.capability_pairs, strict=True):
        assert text.startswith("Copy: ")
        listed, copied = text[len("Copy: ") :].split(" ; ")
        assert listed == copied
        words = listed.split()
        assert len(set(words)) == len(words)
        # the answer is the next word of the copy, read off the text itself
        done = prompt.split(" ; ", 1)[1].split() if " ; " in prompt else []
        assert prompt.startswith(text[: text.index(" ; ") + 2])
        assert answer == " " + words[len(done)]
    trained_facts = {q for q, _ in world.training_pairs()}
    assert not set(world.capability) & trained_facts


def test_texts_hold_the_facts(world):
    c = world.retain_concepts[0]
    texts = world.texts(c)
    assert len(texts) >= 2 and len(set(texts)) == len(texts)
    for text in texts:
        for obj in world.facts[c].values():
            assert re.search(rf"\b{re.escape(obj)}\b", text)
    assert world.forget_texts == world.texts(world.forget_concepts[0])


def test_deterministic_for_a_seed():
    a, b = make_world(3), make_world(3)
    assert a == b
    assert (
        a.forget == b.forget
        and a.capability == b.capability
        and a.texts(a.concepts[0]) == b.texts(b.concepts[0])
    )
    assert a.fingerprint() == b.fingerprint()


def test_seeds_differ():
    a, b = make_world(0), make_world(1)
    assert a.concepts != b.concepts
    assert a.forget != b.forget
    assert a.fingerprint() != b.fingerprint()


def test_lists_are_copies(world):
    got = world.forget
    got.clear()
    assert world.forget


def test_bad_sizes_raise():
    with pytest.raises(ConfigError, match="n_retain"):
        make_world(0, n_concepts=5, n_forget=1, n_retain=4)
    with pytest.raises(ConfigError, match="n_relations"):
        make_world(0, n_relations=99)
    with pytest.raises(ConfigError, match="n_concepts"):
        make_world(0, n_concepts=2)
    with pytest.raises(ConfigError, match="unknown concept"):
        make_world(0).questions("Nobody")


def test_conceptvectors_export(world, tmp_path):
    path = world.to_conceptvectors(tmp_path / "sub" / "cv.json")
    entries = json.loads(path.read_text())
    assert isinstance(entries, list)
    assert len(entries) == len(world.forget_concepts) + len(world.retain_concepts)
    first = entries[0]
    for key in (
        "Concept",
        "Layer",
        "Dim",
        "QA",
        "text_completion",
        "unrelated_QA",
        "wikipedia_content",
    ):
        assert key in first
    assert first["Concept"] == world.forget_concepts[0]
    assert first["Layer"] == 0 and first["Dim"] == 0
    assert all(isinstance(q, str) and q.endswith("?") for q in first["QA"])
    assert {f"Question: {q}\n Answer:" for q in first["QA"]} == {q for q, _ in world.forget}
    for tc in first["text_completion"]:
        assert set(tc) == {"First_half", "Second_half"}
        assert (tc["First_half"] + tc["Second_half"]) in first["wikipedia_content"]
    assert first["unrelated_QA"] and not any(
        world.forget_concepts[0] in q for q in first["unrelated_QA"]
    )
    assert first["wikipedia_content"] == world.texts(world.forget_concepts[0])[0]
