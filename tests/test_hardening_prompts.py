"""A PromptSet belongs to the tokenizer that made it; token ids are integers, never rounded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

import unlearnlens as ul
from conftest import PAIRS, build_model, make_word_tokenizer, tiny_config
from unlearnlens.errors import PromptError
from unlearnlens.prompts import tokenizer_fingerprint

pytestmark = pytest.mark.usefixtures("without_type_checker")


@pytest.fixture(scope="module")
def two_models():
    own = build_model("gpt2", seed=1)
    tok = make_word_tokenizer(swap=("Paris", "Rome"))  # same size and name, other tokens
    other = HookedTransformer(
        tiny_config("gpt2", d_vocab=len(tok)), tokenizer=tok, default_padding_side="right"
    )
    other.load_state_dict(own.state_dict())
    assert len(other.tokenizer) == len(own.tokenizer)
    return own, other


def test_another_tokenizer_of_the_same_size_reads_other_tokens_and_is_refused(two_models):
    own, other = two_models
    ps = ul.PromptSet.from_pairs(own, PAIRS)
    # independent: the same answer ids are other words under the other tokenizer
    paris = ps.answer_tokens[2, :1].tolist()
    assert own.tokenizer.convert_ids_to_tokens(paris) == ["Paris"]
    assert other.tokenizer.convert_ids_to_tokens(paris) == ["Rome"]
    for call in (
        lambda: ul.logit_lens(other, ps),
        lambda: ul.mlp_coefficients(other, ps),
        lambda: ul.evaluate(other, forget=ps),
        lambda: ps.check_fits(other),
    ):
        with pytest.raises(PromptError, match="another tokenizer"):
            call()


def test_the_fingerprint_follows_the_vocabulary_not_the_name(tmp_path):
    own = build_model("gpt2", seed=1)
    saved = ul.load_model(ul.save_model(own, tmp_path / "m"))
    assert saved.tokenizer is not own.tokenizer
    assert saved.tokenizer.name_or_path != own.tokenizer.name_or_path
    ps = ul.PromptSet.from_pairs(own, PAIRS)
    ps.check_fits(saved)  # the same vocabulary, loaded from elsewhere
    ps.check_fits(copy.deepcopy(own))
    renamed = make_word_tokenizer()
    renamed.name_or_path = "somewhere/else"
    assert tokenizer_fingerprint(renamed) == tokenizer_fingerprint(own.tokenizer)
    assert tokenizer_fingerprint(
        make_word_tokenizer(swap=("Paris", "Rome"))
    ) != tokenizer_fingerprint(own.tokenizer)


def test_adding_a_token_changes_the_fingerprint():
    tok = make_word_tokenizer()
    before = tokenizer_fingerprint(tok)
    tok.add_tokens(["Zyx"])
    assert tokenizer_fingerprint(tok) != before


def test_the_fingerprint_survives_slicing_batches_and_moves(two_models):
    own, other = two_models
    ps = ul.PromptSet.from_pairs(own, PAIRS)
    parts = [ps[1:], ps[[0, 2]], ps.to("cpu"), next(iter(ps.batches(2)))[1]]
    for part in parts:
        assert part.tokenizer_fingerprint == ps.tokenizer_fingerprint is not None
        with pytest.raises(PromptError, match="another tokenizer"):
            part.check_fits(other)


def test_model_answers_carry_the_fingerprint(two_models):
    own, other = two_models
    ps = ul.PromptSet.from_model_answers(own, [q for q, _ in PAIRS], max_new_tokens=2)
    with pytest.raises(PromptError, match="another tokenizer"):
        ps.check_fits(other)


def test_bare_token_ids_stay_usable_with_any_model(two_models):
    own, other = two_models
    bare = build_model("gpt2", seed=3, tokenizer=False)
    ps = ul.PromptSet.from_tokens([[1, 5, 6], [1, 7]], [[8], [9, 10]])
    assert ps.tokenizer_fingerprint is None
    for model in (own, other, bare):
        ps.check_fits(model)
    lens = ul.logit_lens(bare, ps)
    assert torch.isfinite(lens.scores).all()
    tokenized = ul.PromptSet.from_pairs(own, PAIRS)
    with pytest.raises(PromptError, match="has none"):
        tokenized.check_fits(bare)


@pytest.mark.parametrize(
    "bad",
    [
        [[1, 2.0]],
        [[1, 2.7]],
        [[True, 2]],
        [torch.tensor([1.0, 2.0])],
        [np.array([1.0, 2.0])],
        [[1, None]],
        [[1, "2"]],
        [[1, -4]],
        [5],
        [b"ab"],
    ],
)
def test_float_and_other_non_integer_token_ids_are_refused(bad):
    with pytest.raises(PromptError, match="prompt 0"):
        ul.PromptSet.from_tokens(bad, [[3]])
    with pytest.raises(PromptError, match="answer 0"):
        ul.PromptSet.from_tokens([[3]], bad)


def test_integer_ids_of_every_kind_give_the_same_set():
    want = ul.PromptSet.from_tokens([[1, 2, 3]], [[4, 5]])
    for p, a in [
        ([np.array([1, 2, 3])], [np.array([4, 5], dtype=np.int32)]),
        ([torch.tensor([1, 2, 3])], [torch.tensor([4, 5])]),
        ([[np.int64(1), np.int16(2), 3]], [(4, 5)]),
        (torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])),
        ([[torch.tensor(1), torch.tensor(2), 3]], [[4, 5]]),
    ]:
        got = ul.PromptSet.from_tokens(p, a)
        assert torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.answer_lengths, want.answer_lengths)
