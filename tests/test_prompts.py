"""PromptSet: exact target positions, padding, slicing, bad input."""

from __future__ import annotations

import pytest
import torch

import unlearnlens as ul
from conftest import PAIRS, build_model
from unlearnlens.errors import PromptError


@pytest.fixture(scope="module")
def model():
    return build_model("llama", seed=1)


def test_from_tokens_positions_by_hand():
    ps = ul.PromptSet.from_tokens(
        [[1, 5, 6], [1, 7], [9, 8, 7, 6]], [[10, 11], [12], [13, 14, 15]], pad_token_id=0
    )
    assert ps.tokens.tolist() == [
        [1, 5, 6, 10, 11, 0, 0],
        [1, 7, 12, 0, 0, 0, 0],
        [9, 8, 7, 6, 13, 14, 15],
    ]
    assert ps.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    # prompt of n tokens, answer of m: targets n-1 .. n+m-2 (padded slots masked)
    assert ps.answer_mask.tolist() == [
        [True, True, False],
        [True, False, False],
        [True, True, True],
    ]
    assert ps.target_positions[ps.answer_mask].tolist() == [2, 3, 1, 3, 4, 5]
    assert ps.answer_tokens[ps.answer_mask].tolist() == [10, 11, 12, 13, 14, 15]
    assert ps.last_target_position.tolist() == [3, 1, 5]
    assert ps.position_mask("last").nonzero().tolist() == [[0, 2], [1, 1], [2, 3]]
    assert ps.position_mask("answer").sum(1).tolist() == [2, 1, 3]
    assert ps.position_mask("prompt").sum(1).tolist() == [3, 2, 4]
    assert (ps.position_mask("all") == ps.attention_mask.bool()).all()


@pytest.mark.parametrize("bos", [True, False])
def test_from_pairs_concatenates_prompt_and_answer_tokens(model, bos):
    ps = ul.PromptSet.from_pairs(model, PAIRS, prepend_bos=bos)
    for i, (prompt, answer) in enumerate(PAIRS):
        p = model.to_tokens(prompt, prepend_bos=bos)[0]
        a = model.to_tokens(answer, prepend_bos=False)[0]
        assert (p[0] == model.tokenizer.bos_token_id) == bos
        n, m = len(p), len(a)
        assert int(ps.prompt_lengths[i]) == n and int(ps.answer_lengths[i]) == m
        assert ps.tokens[i, : n + m].tolist() == p.tolist() + a.tolist()
        assert (ps.tokens[i, n + m :] == ps.pad_token_id).all()
        # the logits at the target positions predict the answer tokens
        assert ps.target_positions[i, :m].tolist() == list(range(n - 1, n + m - 1))
        assert ps.answer_tokens[i, :m].tolist() == a.tolist()
    assert ps.answer_lengths.tolist() == [1, 2, 1, 3]


def test_logits_at_targets_predict_answers_by_hand(model):
    ps = ul.PromptSet.from_pairs(model, PAIRS)
    logits = model(ps.tokens)
    for i, (prompt, answer) in enumerate(PAIRS):
        full = torch.cat([model.to_tokens(prompt), model.to_tokens(answer, prepend_bos=False)], 1)
        own = model(full)[0]
        n = model.to_tokens(prompt).shape[1]
        m = int(ps.answer_lengths[i])
        expected = own[n - 1 : n + m - 1]
        got = logits[i, ps.target_positions[i, :m]]
        assert (got - expected).abs().max() < 1e-4


def test_slicing_batches_and_devices(model):
    ps = ul.PromptSet.from_pairs(model, PAIRS)
    sub = ps[[2, 0]]
    assert sub.prompts == (PAIRS[2][0], PAIRS[0][0])
    assert sub.seq_len == int(ps.seq_lengths[[2, 0]].max())
    assert torch.equal(sub.answer_tokens, ps.answer_tokens[[2, 0]][:, : sub.max_answer_len])
    assert len(ps[1:3]) == 2 and len(ps[-1]) == 1
    chunks = list(ps.batches(3))
    assert [len(c) for _, c in chunks] == [3, 1]
    assert torch.equal(chunks[1][1].tokens, ps[3:].tokens)
    assert ps.to("cpu").tokens.device.type == "cpu"
    with pytest.raises(IndexError):
        ps[7]


def test_from_model_answers_uses_greedy_continuation(model):
    qs = ["the capital of", "Tolo eats"]
    ps = ul.PromptSet.from_model_answers(model, qs, max_new_tokens=4)
    for i, q in enumerate(qs):
        toks = model.to_tokens(q)
        expected = []
        for _ in range(4):  # a plain greedy loop without a cache
            nxt = int(model(toks)[0, -1].argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            expected.append(nxt)
            toks = torch.cat([toks, torch.tensor([[nxt]])], 1)
        m = int(ps.answer_lengths[i])
        n = int(ps.prompt_lengths[i])
        assert ps.tokens[i, n : n + m].tolist() == expected


def test_format_question():
    assert (
        ul.format_question("Where was Zorblax born?")
        == "Question: Where was Zorblax born?\n Answer:"
    )


def test_bad_input(model):
    with pytest.raises(PromptError, match="empty"):
        ul.PromptSet.from_pairs(model, [])
    with pytest.raises(PromptError, match="tokenizes to nothing"):
        ul.PromptSet.from_pairs(model, [("the city", "")])
    with pytest.raises(PromptError, match="n_ctx"):
        ul.PromptSet.from_pairs(model, [("the " * 70, " Paris")])
    no_tok = build_model("gpt2", seed=1, tokenizer=False)
    with pytest.raises(PromptError, match="no tokenizer"):
        ul.PromptSet.from_pairs(no_tok, PAIRS)
    with pytest.raises(PromptError, match="no tokenizer"):
        ul.PromptSet.from_model_answers(no_tok, ["the city"])
    with pytest.raises(PromptError, match="answer 1 has no tokens"):
        ul.PromptSet.from_tokens([[1, 2], [1, 3]], [[4], []])
    with pytest.raises(PromptError, match="pair up"):
        ul.PromptSet.from_tokens([[1, 2]], [[4], [5]])
    big = ul.PromptSet.from_tokens([[1, 2]], [[no_tok.cfg.d_vocab + 3]])
    with pytest.raises(PromptError, match="outside the model's vocabulary"):
        big.check_fits(no_tok)
