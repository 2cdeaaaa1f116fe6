r"""A word-level tokenizer for a toy world: one token per word, space, punctuation or newline.

Built with the ``tokenizers`` library: a ``WordLevel`` model over the world's vocabulary and a
byte-level pre-tokenizer that splits text into words (each carrying its leading space, as in
GPT-2 and LLaMA), punctuation and whitespace. So

* ``" Quen"`` is exactly one token, and a different one from ``"Quen"`` at the start of a text;
* the newline of ``"?\\n Answer:"`` is a token of its own (a plain whitespace split would drop
  it, and with it the study's question format);
* decoding gives back the text exactly (a byte-level decoder), so answers decoded from
  generations compare equal to the world's answer strings.

The wrapper is a ``transformers.PreTrainedTokenizerFast`` that prepends ``<bos>`` itself, like
LLaMA's, which is what TransformerLens expects of a tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from unlearnlens.errors import ConfigError

__all__ = ["SPECIAL_TOKENS", "TOKENIZER_NAME", "make_tokenizer", "vocabulary"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
"""The special tokens, with ids 0, 1, 2, 3 in this order."""

TOKENIZER_NAME = "unlearnlens-toy-word-level"
"""The tokenizer's ``name_or_path`` (TransformerLens reads it when a tokenizer is attached)."""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # GPT-2's split: words and numbers with their leading space, runs of punctuation, and
    # whitespace (a newline before a space-prefixed word stays a token of its own).
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def vocabulary(texts: Iterable[str]) -> list[str]:
    """The sorted set of pre-tokenized pieces of ``texts`` (byte-level strings, ``"ĠQuen"``)."""
    pre = _pre_tokenizer()
    pieces: set[str] = set()
    for text in texts:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return sorted(pieces - set(SPECIAL_TOKENS))


def make_tokenizer(
    texts: Iterable[str], *, name_or_path: str = TOKENIZER_NAME
) -> PreTrainedTokenizerFast:
    """Builds the word-level tokenizer whose vocabulary is every piece of ``texts``.

    Pass ``world.corpus()`` to cover a world. Pieces not in the vocabulary become ``<unk>``.

    Args:
        texts: The texts whose pieces form the vocabulary.
        name_or_path: Stored as the tokenizer's ``name_or_path``.

    Returns:
        A fast tokenizer with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` (ids 0-3), that
        prepends ``<bos>`` and pads on the right.

    Raises:
        ConfigError: ``texts`` holds no text at all.
    """
    pieces = vocabulary(texts)
    if not pieces:
        raise ConfigError("cannot build a tokenizer from no text: the vocabulary would be empty")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *pieces])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        name_or_path=name_or_path,
    )
