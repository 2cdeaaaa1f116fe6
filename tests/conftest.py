"""Shared fixtures: tiny TransformerLens models built in code, with a word-level tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Tests run on tiny models, where extra threads only add contention; pytest-xdist gives each
# core its own worker instead.
torch.set_num_threads(1)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the of a is was in born where who what which city country capital river mountain "
    "Question Answer Paris France Rome Italy Berlin Germany Quen Zorblax Mira Tolo lives "
    "works as doctor painter farmer likes red blue green eats bread fish rice"
).split()


def make_word_tokenizer(swap: tuple[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer: whitespace/punctuation split, BOS/EOS/PAD/UNK specials.

    ``swap``: two words whose ids are exchanged, for a tokenizer of the same size and name
    that reads other tokens.
    """
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = specials + sorted(set(WORDS)) + ["?", ":", "\n", "."]
    if swap is not None:
        i, j = words.index(swap[0]), words.index(swap[1])
        words[i], words[j] = words[j], words[i]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        name_or_path="word-level-test",
    )


def tiny_config(
    arch: str, d_vocab: int, dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    common = dict(
        n_layers=4,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_ctx=64,
        d_vocab=d_vocab,
        dtype=dtype,
        seed=0,
        device="cpu",
    )
    if arch == "gpt2":
        return HookedTransformerConfig(
            d_mlp=64,
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
            **common,
        )
    if arch == "llama":
        return HookedTransformerConfig(
            d_mlp=48,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            n_key_value_heads=2,
            final_rms=True,
            **common,
        )
    raise ValueError(arch)


def build_model(
    arch: str, seed: int, dtype: torch.dtype = torch.float32, tokenizer=True
) -> HookedTransformer:
    """A tiny random model; weights drawn from ``seed`` so that two seeds differ everywhere."""
    tok = make_word_tokenizer() if tokenizer else None
    cfg = tiny_config(arch, d_vocab=len(tok) if tok else 50, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") or name.endswith("_w"):  # norm scales near 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model.to(dtype) if dtype != torch.float32 else model


def perturbed(model: HookedTransformer, scale: float, seed: int) -> HookedTransformer:
    """A copy of ``model`` with Gaussian noise of ``scale`` added to every weight."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return other


def llama_like_config(cls, vocab_size: int, **kwargs):
    """A tiny Hugging Face config of a LLaMA-like class ``cls``; ``kwargs`` add or override."""
    return cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )


@pytest.fixture
def without_type_checker(monkeypatch):
    """Switches off the run-time type checker the suite runs under, which users do not have."""
    import jaxtyping

    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


@pytest.fixture
def no_forward(monkeypatch):
    """Any forward pass fails the test: errors must come before any work."""

    def forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was checked")

    monkeypatch.setattr(HookedTransformer, "forward", forward)


@pytest.fixture(scope="module")
def gpt2_pair():
    """(base, unlearned): a tiny GPT-2-like model and a perturbed copy, built once a module."""
    base = build_model("gpt2", seed=1)
    return base, perturbed(base, 0.2, seed=2)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def model_pair(arch):
    """(base, unlearned): a tiny model and a perturbed copy, as a study's two models."""
    base = build_model(arch, seed=1)
    return base, perturbed(base, 0.15, seed=2)


PAIRS = [
    ("Question : Where was Zorblax born ? Answer :", " Quen"),
    ("Question : Who is Mira ? Answer :", " doctor painter"),
    ("the capital of France is", " Paris"),
    ("Tolo eats", " bread fish rice"),
]
