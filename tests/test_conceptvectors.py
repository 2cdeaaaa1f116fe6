import json

import pytest

import unlearnlens as ul
from unlearnlens.conceptvectors import ConceptDataError


def _entry(name, **extra):
    return {
        "Concept": name,
        "Layer": 3,
        "Dim": 17,
        "QA": ["Who wrote it?", "Where is it set?"],
        "text_completion": [{"First_half": "Harry met", "Second_half": " Ron"}],
        "unrelated_QA": ["What is the capital of France?"],
        "wikipedia_content": "Some text.",
        **extra,
    }


def test_reads_entries_with_and_without_ids(tmp_path):
    path = tmp_path / "cv.json"
    raw = [_entry("Harry Potter", id=1), _entry("Star Wars", ID="sw"), _entry("Netflix")]
    path.write_text(json.dumps(raw))
    before = path.read_bytes()
    concepts = ul.load_conceptvectors(path)
    assert [c.concept for c in concepts] == ["Harry Potter", "Star Wars", "Netflix"]
    assert [c.id for c in concepts] == [1, "sw", None]
    c = concepts[0]
    assert (c.layer, c.dim, c.neuron) == (3, 17, 17)
    assert c.qa == ("Who wrote it?", "Where is it set?")
    assert c.text_completion == (("Harry met", " Ron"),)
    assert c.unrelated_qa == ("What is the capital of France?",)
    assert c.wikipedia_content == "Some text."
    assert path.read_bytes() == before  # never written


def test_bad_files(tmp_path):
    with pytest.raises(ul.CheckpointError):
        ul.load_conceptvectors(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConceptDataError, match="not valid JSON"):
        ul.load_conceptvectors(bad)
    bad.write_text(json.dumps([{"Concept": "X", "Layer": 1}]))
    with pytest.raises(ConceptDataError, match=r"entry 0 lacks \['Dim'\]"):
        ul.load_conceptvectors(bad)
    bad.write_text(json.dumps([_entry("X", text_completion=[{"First_half": "a"}])]))
    with pytest.raises(ConceptDataError, match="Second_half"):
        ul.load_conceptvectors(bad)
    bad.write_text("[]")
    with pytest.raises(ConceptDataError, match="no ConceptVectors entries"):
        ul.load_conceptvectors(bad)


def test_keeps_saved_answers_and_warns_on_conflicting_ids(tmp_path):
    path = tmp_path / "cv.json"
    raw = [
        _entry(
            "Harry Potter",
            id=3,
            ID=4,
            QA_with_answers=[{"question": "Who wrote it?", "answer": " Rowling"}, ["Q2", " A2"]],
            answers_tokens_num=[2, 1],
        ),
        _entry("Star Wars", id=5, ID=5),
    ]
    path.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match=r"id=3 and ID=4"):
        concepts = ul.load_conceptvectors(path)
    assert concepts[0].qa_with_answers == (("Who wrote it?", " Rowling"), ("Q2", " A2"))
    assert concepts[0].answers_tokens_num == (2, 1)
    assert concepts[0].id == 3 and concepts[1].id == 5
    assert concepts[1].qa_with_answers == () and concepts[1].answers_tokens_num == ()
    path.write_text(json.dumps([_entry("X", answers_tokens_num=["two"])]))
    with pytest.raises(ConceptDataError, match="answers_tokens_num"):
        ul.load_conceptvectors(path)


def test_binary_file_is_our_error(tmp_path):
    from unlearnlens.errors import UnlearnLensError

    path = tmp_path / "cv.json"
    path.write_bytes(bytes(range(256)) * 4)  # not UTF-8, not JSON
    with pytest.raises(UnlearnLensError, match=r"cv\.json"):
        ul.load_conceptvectors(path)
