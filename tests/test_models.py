"""Tests for unlearnlens.models: Hugging Face conversion, save/load, compatibility checks."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import (
    AutoTokenizer,
    BertConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import build_model, llama_like_config, make_word_tokenizer
from unlearnlens.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleModelsError,
    UnsupportedArchitectureError,
)
from unlearnlens.models import (
    SUPPORTED_ARCHITECTURES,
    check_compatible,
    load_hf,
    load_model,
    save_model,
)

TEXTS = [
    "Question : Where was Zorblax born ? Answer : Quen",
    "the capital of France is Paris .",
    "Tolo eats bread fish rice",
]
TOL = 1e-4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# name -> (model class, config factory taking the vocabulary size)
ARCHS = {
    "gpt2": (
        GPT2LMHeadModel,
        lambda V: GPT2Config(
            vocab_size=V,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=48,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gpt2-inverse-layer-scale": (
        GPT2LMHeadModel,
        lambda V: GPT2Config(
            vocab_size=V,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            scale_attn_by_inverse_layer_idx=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "pythia": (
        GPTNeoXForCausalLM,
        lambda V: GPTNeoXConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.5,
            rotary_emb_base=5000,
            use_parallel_residual=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "neox-sequential": (
        GPTNeoXForCausalLM,
        lambda V: GPTNeoXConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=1.0,
            use_parallel_residual=False,
            hidden_act="gelu_new",
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "llama-gqa": (
        LlamaForCausalLM,
        lambda V: llama_like_config(
            LlamaConfig,
            V,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
    "llama-mha-bias": (
        LlamaForCausalLM,
        lambda V: llama_like_config(LlamaConfig, V, num_key_value_heads=4, attention_bias=True),
    ),
    "llama3-rope": (
        LlamaForCausalLM,
        lambda V: llama_like_config(
            LlamaConfig,
            V,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "mistral-sliding": (
        MistralForCausalLM,
        lambda V: llama_like_config(MistralConfig, V, num_key_value_heads=2, sliding_window=3),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        lambda V: llama_like_config(
            Qwen2Config, V, num_key_value_heads=2, tie_word_embeddings=True
        ),
    ),
    "qwen3": (
        Qwen3ForCausalLM,
        lambda V: llama_like_config(Qwen3Config, V, num_key_value_heads=2, head_dim=16),
    ),
    "olmo": (OlmoForCausalLM, lambda V: llama_like_config(OlmoConfig, V, clip_qkv=0.8)),
    "gemma": (
        GemmaForCausalLM,
        lambda V: llama_like_config(GemmaConfig, V, num_key_value_heads=1, head_dim=16),
    ),
}


def make_hf(name: str, seed: int = 0, vocab_size: int | None = None):
    """A tiny seeded HF model of ``name`` with non-trivial weights, norms and biases."""
    cls, make_config = ARCHS[name]
    V = vocab_size if vocab_size is not None else len(make_word_tokenizer())
    torch.manual_seed(seed)
    model = cls(make_config(V)).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ("norm" in pname or "ln" in pname):
                p.copy_(1.0 + 0.2 * noise if name != "gemma" else 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def save_hf(model, directory, tokenizer=None):
    model.save_pretrained(str(directory))
    (tokenizer or make_word_tokenizer()).save_pretrained(str(directory))
    return directory


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def tl_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).float()


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------- load_hf


@pytest.mark.parametrize("name", list(ARCHS))
def test_directory_logits_match_hf(name, tmp_path):
    hf = make_hf(name)
    save_hf(hf, tmp_path)
    model = load_hf(tmp_path, device="cpu")
    assert model.cfg.original_architecture == type(hf).__name__
    assert model.tokenizer is not None
    tokens = model.to_tokens(TEXTS)
    # the attached tokenizer is the checkpoint's: same ids as encoding with it directly
    # (AutoTokenizer picks the class; for qwen2 it is Qwen2Tokenizer, whatever was saved)
    word_ids = AutoTokenizer.from_pretrained(str(tmp_path))(TEXTS[1], add_special_tokens=False)[
        "input_ids"
    ]
    assert model.to_tokens(TEXTS[1], prepend_bos=False)[0].tolist() == word_ids
    assert model.tokenizer.padding_side == "right"
    diff = (tl_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= TOL, f"{name}: max |logit diff| = {diff}"


@pytest.mark.parametrize("name", ["gpt2", "pythia", "llama-gqa", "qwen2", "olmo", "gemma"])
def test_in_memory_model_matches_and_is_left_unchanged(name):
    hf = make_hf(name, seed=3)
    hf.train()
    before = state_snapshot(hf)
    grads = {n: p.requires_grad for n, p in hf.named_parameters()}
    tok = make_word_tokenizer()
    model = load_hf(hf, device="cpu", tokenizer=tok)
    assert hf.training and all(m.training for m in hf.modules())
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == grads
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())
    hf.eval()
    tokens = model.to_tokens(TEXTS)
    diff = (tl_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= TOL
    # the converted model owns its weights: changing it leaves the HF model alone
    with torch.no_grad():
        model.blocks[0].mlp.W_out.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())


def test_in_memory_model_finds_tokenizer_in_its_directory(tmp_path):
    save_hf(make_hf("llama-gqa"), tmp_path)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path))
    model = load_hf(hf, device="cpu")
    assert model.tokenizer is not None
    assert (
        model.to_tokens("who is Mira")[0].tolist()
        == [1] + make_word_tokenizer()("who is Mira", add_special_tokens=False)["input_ids"]
    )


def test_in_memory_model_without_tokenizer_takes_token_ids():
    hf = make_hf("gpt2")
    model = load_hf(hf, device="cpu")
    assert model.tokenizer is None
    tokens = torch.tensor([[1, 5, 9, 12, 7]])
    assert (tl_logits(model, tokens) - hf_logits(hf, tokens)).abs().max() <= TOL


def _tokenizer_without_bos_flag() -> PreTrainedTokenizerFast:
    base = make_word_tokenizer()
    tok = Tokenizer(models.WordLevel(vocab=base.get_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path="org/not-a-local-folder",
    )


def test_in_memory_tokenizer_without_bos_is_not_reloaded_from_the_hub():
    # TransformerLens would reload this tokenizer by name ("org/...") to add a BOS token;
    # the no_network fixture fails the test if that is attempted.
    tok = _tokenizer_without_bos_flag()
    tok.padding_side = "left"
    kwargs_before = dict(tok.init_kwargs)
    model = load_hf(make_hf("llama-gqa"), device="cpu", tokenizer=tok)
    # the caller's tokenizer is left as it was; the model pads on the right
    assert tok.padding_side == "left" and tok.init_kwargs == kwargs_before
    assert model.tokenizer is not tok and model.tokenizer.padding_side == "right"
    ids = tok("who is Mira", add_special_tokens=False)["input_ids"]
    # the tokenizer adds no BOS when encoding, so neither does the model (as Hugging Face)
    assert tok("who is Mira")["input_ids"] == ids
    assert model.to_tokens("who is Mira")[0].tolist() == ids
    assert model.to_tokens("who is Mira", prepend_bos=True)[0].tolist() == [tok.bos_token_id, *ids]


def test_unprocessed_weights_are_the_checkpoint_tensors(tmp_path):
    hf = make_hf("llama-gqa")
    save_hf(hf, tmp_path)
    model = load_hf(tmp_path, device="cpu")
    for layer in range(2):
        hf_block, block = hf.model.layers[layer], model.blocks[layer]
        assert torch.equal(block.mlp.W_out, hf_block.mlp.down_proj.weight.T)
        assert torch.equal(block.mlp.W_in, hf_block.mlp.up_proj.weight.T)
        assert torch.equal(block.mlp.W_gate, hf_block.mlp.gate_proj.weight.T)
        assert torch.equal(block.ln1.w, hf_block.input_layernorm.weight)
        # W_Q[h] is rows h*d_head .. (h+1)*d_head of q_proj, transposed
        q = hf_block.self_attn.q_proj.weight
        for h in range(4):
            assert torch.equal(block.attn.W_Q[h], q[h * 8 : (h + 1) * 8].T)
        k = hf_block.self_attn.k_proj.weight
        assert torch.equal(block.attn._W_K[1], k[8:16].T)
    assert torch.equal(model.unembed.W_U, hf.lm_head.weight.T)
    assert torch.equal(model.embed.W_E, hf.model.embed_tokens.weight)
    assert model.cfg.normalization_type == "RMS"


def test_mha_llama_uses_plain_attention_keys(tmp_path):
    save_hf(make_hf("llama-mha-bias"), tmp_path)
    model = load_hf(tmp_path, device="cpu")
    assert model.cfg.n_key_value_heads is None
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.attn.W_K" in names and "blocks.0.attn._W_K" not in names


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_process_weights_keeps_log_probs(name, tmp_path):
    hf = make_hf(name)
    save_hf(hf, tmp_path)
    model = load_hf(tmp_path, device="cpu", process_weights=True)
    assert model.cfg.normalization_type in ("LNPre", "RMSPre")
    tokens = model.to_tokens(TEXTS)
    expected = torch.log_softmax(hf_logits(hf, tokens), -1)
    got = torch.log_softmax(tl_logits(model, tokens), -1)
    assert (got - expected).abs().max() <= TOL
    # centering the unembedding changes raw weights: the processed model is not one-to-one
    assert not torch.allclose(model.unembed.W_U, hf.lm_head.weight.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype, tmp_path):
    hf = make_hf("llama-gqa")
    save_hf(hf, tmp_path)
    model = load_hf(tmp_path, device="cpu", dtype=dtype)
    assert model.cfg.dtype == dtype
    assert all(p.dtype == dtype for p in model.parameters())
    tokens = model.to_tokens(TEXTS)
    logits = tl_logits(model, tokens)
    reference = hf_logits(hf, tokens)
    assert torch.isfinite(logits).all()
    # reduced precision: same predictions up to rounding
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_n_ctx_cap_and_override(tmp_path):
    save_hf(make_hf("gpt2"), tmp_path)
    assert load_hf(tmp_path, device="cpu").cfg.n_ctx == 64
    short = load_hf(tmp_path, device="cpu", n_ctx=16)
    assert short.cfg.n_ctx == 16 and short.pos_embed.W_pos.shape == (16, 32)
    with pytest.raises(ConfigError, match="n_ctx=128"):
        load_hf(tmp_path, device="cpu", n_ctx=128)


def test_n_devices_passes_to_config(tmp_path):
    save_hf(make_hf("gpt2"), tmp_path)
    assert load_hf(tmp_path, device="cpu", n_devices=1).cfg.n_devices == 1
    with pytest.raises(ConfigError, match="n_devices"):
        load_hf(tmp_path, device="cpu", n_devices=0)


def test_bad_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        load_hf(make_hf("gpt2"), device="cpu", dtype=torch.int64)


# ------------------------------------------------------------------------------------ errors


def test_offline_mode_is_on():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_hf(missing)
    assert str(missing) in str(info.value)


def test_hub_id_not_in_cache_is_a_checkpoint_error():
    with pytest.raises(CheckpointError) as info:
        load_hf("unlearnlens-test-org/no-such-model-xyz")
    message = str(info.value)
    assert "unlearnlens-test-org/no-such-model-xyz" in message
    assert "does not exist" in message and "cache" in message


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"config\.json") as info:
        load_hf(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_hf(path)


def test_unsupported_architecture_lists_supported(tmp_path):
    BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    ).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_hf(tmp_path)
    message = str(info.value)
    assert "BertLMHeadModel" in message  # a bare BERT config: its causal-LM class
    for arch in (
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "OlmoForCausalLM",
        "GemmaForCausalLM",
    ):
        assert arch in SUPPORTED_ARCHITECTURES and arch in message


def test_unsupported_in_memory_model():
    torch.manual_seed(0)
    base_only = LlamaModel(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="LlamaModel"):
        load_hf(base_only)


def test_unsupported_rope_scaling(tmp_path):
    hf = make_hf("llama-gqa")
    hf.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedArchitectureError, match="dynamic"):
        load_hf(hf, device="cpu")


def test_not_a_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        load_hf(42)


# --------------------------------------------------------------------------- save / load


def _assert_bit_exact(a: HookedTransformer, b: HookedTransformer, tokens):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_round_trip_is_bit_exact(arch, dtype, tmp_path):
    model = build_model(arch, seed=4, dtype=dtype)
    save_model(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved", device="cpu")
    tokens = model.to_tokens(TEXTS)
    _assert_bit_exact(model, loaded, tokens)
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    assert torch.equal(loaded.to_tokens(TEXTS), tokens)
    assert loaded.tokenizer.padding_side == model.tokenizer.padding_side
    assert not loaded.training


@pytest.mark.parametrize("name", ["gemma", "olmo", "pythia"])
def test_save_load_round_trip_of_converted_models(name, tmp_path):
    hf = make_hf(name)
    model = load_hf(hf, device="cpu", tokenizer=make_word_tokenizer())
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    tokens = model.to_tokens(TEXTS)
    _assert_bit_exact(model, loaded, tokens)
    assert (tl_logits(loaded, tokens) - hf_logits(hf, tokens)).abs().max() <= TOL


def test_save_load_without_tokenizer(tmp_path):
    model = build_model("llama", seed=5, tokenizer=False)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.tokenizer is None
    _assert_bit_exact(model, loaded, torch.tensor([[3, 7, 11, 2], [4, 4, 9, 1]]))


def test_save_model_leaves_the_model_unchanged(tmp_path):
    model = build_model("gpt2", seed=6)
    model.train()
    before = state_snapshot(model)
    save_model(model, tmp_path)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a model saved by"):
        load_model(tmp_path)
    save_hf(make_hf("gpt2"), tmp_path / "hf")
    (tmp_path / "hf" / "unlearnlens_config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="unlearnlens"):
        load_model(tmp_path / "hf")


def test_save_model_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="HookedTransformer"):
        save_model(make_hf("gpt2"), tmp_path)


# ------------------------------------------------------------------------- check_compatible


def _custom(**overrides) -> HookedTransformer:
    fields = dict(
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_ctx=32,
        d_vocab=50,
        d_mlp=64,
        act_fn="gelu_new",
        normalization_type="LN",
        device="cpu",
        seed=0,
    )
    fields.update(overrides)
    return HookedTransformer(HookedTransformerConfig(**fields))


def test_compatible_models_pass():
    assert check_compatible(build_model("llama", 1), build_model("llama", 2)) is None
    assert check_compatible(_custom(), _custom(seed=1)) is None


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [("d_mlp", 3072, 4096), ("n_layers", 2, 3), ("d_vocab", 50, 60)],
)
def test_incompatible_field_is_named_with_both_values(field, a, b):
    ma = _custom(**{field: a})
    mb = _custom(**{field: b})
    with pytest.raises(IncompatibleModelsError) as info:
        check_compatible(ma, mb)
    assert str(info.value) == f"models differ in {field}: {a} vs {b}"


def test_architecture_mismatch_between_converted_models():
    gpt2 = load_hf(make_hf("gpt2"), device="cpu")
    llama = load_hf(make_hf("llama-gqa"), device="cpu")
    with pytest.raises(IncompatibleModelsError, match="models differ in d_mlp: 48 vs 64"):
        check_compatible(gpt2, llama)


def test_tokenizer_presence_differs():
    with pytest.raises(IncompatibleModelsError, match="the second model has none"):
        check_compatible(build_model("gpt2", 1), build_model("gpt2", 1, tokenizer=False))


def test_tokenizer_vocabulary_differs():
    a = build_model("gpt2", 1)
    b = build_model("gpt2", 1)
    vocab = a.tokenizer.get_vocab()
    swapped = dict(vocab)
    swapped["Paris"], swapped["Rome"] = vocab["Rome"], vocab["Paris"]
    tok = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    b.set_tokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            add_bos_token=True,
            name_or_path="swapped",
        )
    )
    first = min(("Paris", "Rome"), key=vocab.get)
    with pytest.raises(IncompatibleModelsError, match=f"token '{first}' has id"):
        check_compatible(a, b)


def test_check_compatible_rejects_non_models():
    with pytest.raises(TypeError, match="HookedTransformer"):
        check_compatible(build_model("gpt2", 1), make_hf("gpt2"))


def test_config_without_architectures_list_is_judged_by_its_model_type(tmp_path):
    hf = make_hf("llama-gqa")
    save_hf(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = load_hf(tmp_path, device="cpu")
    tokens = model.to_tokens(TEXTS)
    assert (tl_logits(model, tokens) - hf_logits(hf, tokens)).abs().max() <= TOL
    raw["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedArchitectureError, match="BertLMHeadModel is not supported"):
        load_hf(tmp_path)
