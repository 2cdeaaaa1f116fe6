"""No surprise network: a path that looks local fails locally, even with the hub reachable.

The tests switch offline mode off (as a user's shell would have it) and make every socket
connection and DNS look-up fail the test, so a single network attempt is caught.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import unlearnlens as ul
from conftest import build_model, make_word_tokenizer
from unlearnlens.errors import CheckpointError
from unlearnlens.models import hub_id


@pytest.fixture
def online_but_watched(monkeypatch, tmp_path):
    """Offline mode off, the working directory empty, and a record of every network attempt."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(tmp_path)
    return attempts


@pytest.fixture
def hub_calls(monkeypatch):
    """Records the names transformers is asked to load, and fails each load like the hub."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    names: list[str] = []

    def fake(cls, name, *args, **kwargs):
        names.append(str(name))
        raise OSError(f"{name} is not a local folder and is not in the cache")

    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(fake))
    return names


LOCAL_LOOKING = [
    "./checkpoints/base",
    "../base",
    "~/no-such-unlearnlens-model",
    "/no/such/absolute/checkpoint",
    "runs/npo/final",  # two separators
    "org\\name",  # a backslash
    "models/llama",  # "models" exists here
    "org/name/",  # trailing separator
    "org/",
    "/org/name",
    "org/../name",
    "org/name.",
    " org/name",
    "org/na me",
    "gpt2",  # a bare name
    "",
]


@pytest.mark.parametrize("source", LOCAL_LOOKING)
def test_a_local_looking_path_fails_locally_without_any_network(
    source, online_but_watched, hub_calls, tmp_path
):
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError) as info:
        ul.load_hf(source, device="cpu")
    assert online_but_watched == []
    assert hub_calls == []  # transformers was never even asked
    assert any(w in str(info.value) for w in ("does not exist", "not a checkpoint", "empty"))


def test_a_path_object_is_always_local(online_but_watched, hub_calls):
    with pytest.raises(CheckpointError, match="does not exist"):
        ul.load_hf(Path("org/name"), device="cpu")
    assert online_but_watched == [] and hub_calls == []


def test_a_partly_existing_path_names_what_exists(online_but_watched, hub_calls, tmp_path):
    (tmp_path / "org").mkdir()
    with pytest.raises(CheckpointError) as info:
        ul.load_hf("org/typo-name", device="cpu")
    message = str(info.value)
    assert "'org'" in message and "local path" in message
    assert online_but_watched == [] and hub_calls == []


@pytest.mark.parametrize("name", ["EleutherAI/pythia-70m", "meta-llama/Llama-3.2-1B", "a/b"])
def test_a_clear_hub_id_is_still_handed_to_transformers(name, online_but_watched, hub_calls):
    with pytest.raises(CheckpointError, match="hub") as info:
        ul.load_hf(name, device="cpu")
    assert hub_calls[:1] == [name]
    assert name in str(info.value)
    assert online_but_watched == []  # the fake loader stands in for the hub


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m"),
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
        ("a_b/c-d.e", "a_b/c-d.e"),
        ("gpt2", None),
        ("./a/b", None),
        ("~/a", None),
        ("a/b/c", None),
        ("a\\b", None),
        ("a/..", None),
        ("-a/b", None),
        ("a/.b", None),
        ("a/b.", None),
        ("a//b", None),
        (Path("a/b"), None),
        (3, None),
    ],
)
def test_the_hub_id_rule(source, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert hub_id(source) == expected


def test_the_hub_id_rule_backs_off_when_the_folder_exists(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/name") == "org/name"
    (tmp_path / "org").mkdir()
    assert hub_id("org/name") is None
    (tmp_path / "org").rmdir()
    (tmp_path / "org").write_text("a file counts too")
    assert hub_id("org/name") is None


def test_an_in_memory_tokenizer_named_like_a_hub_id_is_not_reloaded(online_but_watched, hub_calls):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_word_tokenizer()
    tok.name_or_path = "some-org/some-tokenizer"
    tok.init_kwargs["name_or_path"] = "some-org/some-tokenizer"
    tok.init_kwargs.pop("add_bos_token", None)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    )
    model = ul.load_hf(hf, device="cpu", tokenizer=tok)
    assert hub_calls == [] and online_but_watched == []
    want = [tok.bos_token_id, *tok("Paris")["input_ids"][-1:]]
    assert model.to_tokens("Paris")[0].tolist() == want


def test_loading_a_saved_model_never_touches_the_network(online_but_watched, tmp_path):
    folder = ul.save_model(build_model("gpt2", seed=1), tmp_path / "saved")
    ul.load_model(folder)
    assert online_but_watched == []
