"""load_hf prepends BOS exactly when the checkpoint's tokenizer does, as Hugging Face does."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import unlearnlens as ul
from conftest import make_word_tokenizer
from test_models import make_hf

PAIRS = [("who is Mira ?", " Paris ."), ("the capital of France is", " Paris")]


def _tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose post-processor adds BOS (``<bos> $A``) or adds nothing."""
    vocab = make_word_tokenizer().get_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.mark.parametrize("arch", ["pythia", "qwen2", "llama-gqa"])
@pytest.mark.parametrize("adds_bos", [True, False])
def test_prompt_tokens_follow_the_checkpoint_tokenizer(arch, adds_bos, tmp_path):
    hf = make_hf(arch)
    hf.save_pretrained(str(tmp_path))
    _tokenizer(adds_bos).save_pretrained(str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))  # what Hugging Face encodes
    first = reference("who is Mira")["input_ids"][0]
    assert (first == reference.bos_token_id) == adds_bos  # the two tokenizers really differ

    model = ul.load_hf(tmp_path, device="cpu")
    assert model.cfg.default_prepend_bos == adds_bos
    ps = ul.PromptSet.from_pairs(model, PAIRS)
    for i, (prompt, answer) in enumerate(PAIRS):
        want_prompt = reference(prompt)["input_ids"]
        want_answer = reference(answer, add_special_tokens=False)["input_ids"]
        n, m = int(ps.prompt_lengths[i]), int(ps.answer_lengths[i])
        assert ps.tokens[i, :n].tolist() == want_prompt
        assert ps.tokens[i, n : n + m].tolist() == want_answer
        assert model.to_tokens(prompt)[0].tolist() == want_prompt


def test_without_a_tokenizer_the_architecture_decides():
    assert ul.load_hf(make_hf("pythia"), device="cpu").cfg.default_prepend_bos is False
    assert ul.load_hf(make_hf("llama-gqa"), device="cpu").cfg.default_prepend_bos is True
