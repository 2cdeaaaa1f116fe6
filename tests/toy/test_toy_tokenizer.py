from __future__ import annotations

import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig

from unlearnlens.errors import ConfigError
from unlearnlens.toy import SPECIAL_TOKENS, make_tokenizer, make_world


@pytest.fixture(scope="module")
def world():
    return make_world(0, n_concepts=6, n_relations=3, n_capability=4)


@pytest.fixture(scope="module")
def tok(world):
    return make_tokenizer(world.corpus())


@pytest.fixture(scope="module")
def model(tok):
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        d_head=8,
        n_heads=2,
        d_mlp=16,
        n_ctx=64,
        d_vocab=len(tok),
        act_fn="gelu_new",
        normalization_type="LN",
        device="cpu",
    )
    return HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")


def test_specials_first(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.init_kwargs["name_or_path"]


def test_question_pieces_and_round_trip(world, tok):
    concept = world.forget_concepts[0]
    q = f"Question: Where was {concept} born?\n Answer:"
    ids = tok(q)["input_ids"]
    # written out by hand: BOS, then words with their leading space (Ġ), punctuation, newline (Ċ)
    expected = [
        "<bos>",
        "Question",
        ":",
        "ĠWhere",
        "Ġwas",
        f"Ġ{concept}",
        "Ġborn",
        "?",
        "Ċ",
        "ĠAnswer",
        ":",
    ]
    assert tok.convert_ids_to_tokens(ids) == expected
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == q
    assert tok.decode(ids) == "<bos>" + q


def test_bos_handling(world, tok, model):
    q, a = world.forget[0]
    with_bos = model.to_tokens(q)[0].tolist()
    without = model.to_tokens(q, prepend_bos=False)[0].tolist()
    assert with_bos[0] == tok.bos_token_id and with_bos.count(tok.bos_token_id) == 1
    assert with_bos[1:] == without and tok.bos_token_id not in without
    assert model.to_tokens(a, prepend_bos=False).shape == (1, 1)


def test_newline_is_a_token(tok, model):
    strs = model.to_str_tokens("Question: Who?\n Answer:")
    assert "\n" in strs
    assert strs.index("\n") == strs.index("?") + 1
    assert tok.convert_tokens_to_ids("Ċ") != tok.unk_token_id


def test_leading_space_matters(world, tok, model):
    a = world.forget[0][1]
    spaced = model.to_tokens(a, prepend_bos=False)[0].tolist()
    bare = tok(a.strip(), add_special_tokens=False)["input_ids"]
    assert len(spaced) == 1 and spaced != bare
    assert model.to_string(spaced) == a


def test_unknown_word_and_empty_vocab(tok):
    assert tok(" Flibbertigibbet", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    with pytest.raises(ConfigError, match="no text"):
        make_tokenizer([])
