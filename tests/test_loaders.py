"""Tests for unlearnlens.loaders: each format written here, and clear errors on bad files."""

from __future__ import annotations

import csv
import json

import pytest

import unlearnlens as ul
from unlearnlens.errors import DataFileError, UnlearnLensError

TOFU = [
    {"question": "Who wrote Night Tides?", "answer": "Basil Mahfouz Al-Kuwaiti."},
    {"question": "Where was he born?", "answer": " Kuwait City"},
]


def test_tofu_json_and_jsonl(tmp_path):
    expected = [
        ("Question: Who wrote Night Tides?\n Answer:", " Basil Mahfouz Al-Kuwaiti."),
        ("Question: Where was he born?\n Answer:", " Kuwait City"),
    ]
    (tmp_path / "t.json").write_text(json.dumps(TOFU))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in TOFU) + "\n")
    assert ul.load_tofu(tmp_path / "t.json") == expected
    assert ul.load_tofu(tmp_path / "t.jsonl") == expected


def test_wmdp_letters(tmp_path):
    rows = [
        {
            "question": "Which is a toxin?",
            "choices": ["salt", "ricin", "water", "air"],
            "answer": 1,
        },
        {"question": "Pick C.", "choices": ["x", "y", "z"], "answer": 2},
    ]
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = ul.load_wmdp(tmp_path / "w.jsonl")
    assert pairs[0] == ("Which is a toxin?\nA. salt\nB. ricin\nC. water\nD. air\nAnswer:", " B")
    assert pairs[1] == ("Pick C.\nA. x\nB. y\nC. z\nAnswer:", " C")


def test_plain_pairs_jsonl_json_csv(tmp_path):
    pairs = [("The capital of France is", " Paris"), ("Tolo eats", " bread, fish")]
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in pairs) + "\n\n"
    )
    (tmp_path / "p.json").write_text(json.dumps([list(p) for p in pairs]))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "answer"])
        w.writerows(pairs)
    for name in ("p.jsonl", "p.json", "p.csv"):
        assert ul.load_pairs(tmp_path / name) == pairs, name


@pytest.mark.parametrize(
    ("name", "text", "loader", "fragments"),
    [
        (
            "bad.jsonl",
            '{"prompt": "a", "answer": "b"}\n{"prompt": "a",\n',
            ul.load_pairs,
            ["line 2"],
        ),
        ("bad.jsonl", '{"prompt": "a"}\n', ul.load_pairs, ["line 1", "'answer'"]),
        ("bad.csv", "prompt,reply\nx,y\n", ul.load_pairs, ["line 2", "'answer'"]),
        (
            "bad.json",
            json.dumps([TOFU[0], {"question": 3, "answer": "x"}]),
            ul.load_tofu,
            ["entry 1", "'question'"],
        ),
        (
            "bad.jsonl",
            json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}),
            ul.load_wmdp,
            ["line 1", "out of range"],
        ),
        (
            "bad.jsonl",
            json.dumps({"question": "q", "choices": "ab", "answer": 0}),
            ul.load_wmdp,
            ["line 1", "choices"],
        ),
        ("empty.jsonl", "\n", ul.load_pairs, ["no records"]),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, loader, fragments):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataFileError) as info:
        loader(path)
    assert isinstance(info.value, UnlearnLensError)
    assert name in str(info.value)
    for f in fragments:
        assert f in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        ul.load_tofu(tmp_path / "nope.json")


def test_pairs_feed_a_promptset():
    from conftest import build_model

    model = build_model("llama", seed=1)
    ps = ul.PromptSet.from_pairs(model, [("the capital of France is", " Paris")])
    assert len(ps) == 1
