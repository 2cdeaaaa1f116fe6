"""How each supported Hugging Face causal-LM class maps onto a ``HookedTransformerConfig``.

One small function per architecture reads the checkpoint's own config (no official-name lookup)
and TransformerLens's weight converters do the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gemma_weights,
    convert_gpt2_weights,
    convert_llama_weights,
    convert_mistral_weights,
    convert_neox_weights,
    convert_olmo_weights,
    convert_qwen2_weights,
    convert_qwen3_weights,
)

from unlearnlens.errors import UnsupportedArchitectureError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MAX_CTX",
    "SUPPORTED_ARCHITECTURES",
    "architecture_name",
    "unsupported",
]

# A mask buffer of n_ctx x n_ctx booleans is allocated per layer, so a checkpoint's nominal
# context (131072 for recent LLaMA / Mistral configs) is capped unless the caller asks for more.
DEFAULT_MAX_CTX = 4096

# Hugging Face activation names -> TransformerLens activation names (same functions).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_fast": "gelu_fast",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class _Architecture:
    """How one Hugging Face causal-LM class maps onto a ``HookedTransformerConfig``.

    Attributes:
        config: Builds the TransformerLens config fields from the Hugging Face config.
        weights: Builds the TransformerLens state dict from the Hugging Face model.
    """

    config: Callable[[Any], dict[str, Any]]
    weights: Callable[[Any, HookedTransformerConfig], StateDict]


def unsupported(what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{what}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _act(hf: Any, name: str | None = None) -> str:
    name = name or hf.hidden_act
    if name not in _ACTIVATIONS:
        raise unsupported(f"activation {name!r} of {type(hf).__name__} cannot be converted")
    return _ACTIVATIONS[name]


def _head_dim(hf: Any) -> int:
    head_dim = getattr(hf, "head_dim", None)
    return int(head_dim) if head_dim else hf.hidden_size // hf.num_attention_heads


def _rope(hf: Any, d_head: int) -> dict[str, Any]:
    """Rotary fields: base, rotated dimensions, and LLaMA-3 frequency scaling."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    out: dict[str, Any] = {
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_base": theta if theta is not None else 10000.0,
        "rotary_dim": int(d_head * params.get("partial_rotary_factor", 1.0)),
    }
    if rope_type == "llama3":
        out.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=params["original_max_position_embeddings"],
            NTK_by_parts_low_freq_factor=params.get("low_freq_factor", 1.0),
            NTK_by_parts_high_freq_factor=params.get("high_freq_factor", 4.0),
            NTK_by_parts_factor=params.get("factor", 1.0),
        )
    elif rope_type != "default":
        raise unsupported(f"rope type {rope_type!r} of {type(hf).__name__} cannot be converted")
    return out


def _sliding_window(hf: Any) -> dict[str, Any]:
    """Local-attention fields for checkpoints with a sliding window (all or some layers)."""
    window = getattr(hf, "sliding_window", None)
    if not window:
        return {}
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        attn_types = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    else:
        attn_types = ["local"] * hf.num_hidden_layers
    if "local" not in attn_types:
        return {}
    return {"use_local_attn": True, "window_size": int(window), "attn_types": attn_types}


def _rotary_decoder(hf: Any, *, gqa_always: bool) -> dict[str, Any]:
    """The fields LLaMA-family decoders share (RMSNorm, gated MLP, rotary, no parallel block)."""
    d_head = _head_dim(hf)
    n_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return {
        "n_layers": hf.num_hidden_layers,
        "d_model": hf.hidden_size,
        "n_heads": hf.num_attention_heads,
        "d_head": d_head,
        # TransformerLens's LLaMA loader uses plain attention when no heads are shared; its
        # Mistral / Qwen2 / Gemma loaders always use the grouped-query module (keys `_W_K`).
        "n_key_value_heads": n_kv if gqa_always or n_kv != hf.num_attention_heads else None,
        "d_mlp": hf.intermediate_size,
        "d_vocab": hf.vocab_size,
        "n_ctx": hf.max_position_embeddings,
        "act_fn": _act(hf),
        "eps": getattr(hf, "rms_norm_eps", 1e-5),
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        **_rope(hf, d_head),
        **_sliding_window(hf),
    }


def _gpt2_config(hf: Any) -> dict[str, Any]:
    if getattr(hf, "add_cross_attention", False):
        raise unsupported("GPT2LMHeadModel with cross-attention cannot be converted")
    return {
        "n_layers": hf.n_layer,
        "d_model": hf.n_embd,
        "n_heads": hf.n_head,
        "d_head": hf.n_embd // hf.n_head,
        "d_mlp": hf.n_inner or 4 * hf.n_embd,
        "d_vocab": hf.vocab_size,
        "n_ctx": hf.n_positions,
        "act_fn": _act(hf, hf.activation_function),
        "eps": hf.layer_norm_epsilon,
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "use_attn_scale": hf.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
    }


def _neox_config(hf: Any) -> dict[str, Any]:
    if not getattr(hf, "attention_bias", True):
        raise unsupported("GPTNeoXForCausalLM without attention biases cannot be converted")
    d_head = hf.hidden_size // hf.num_attention_heads
    return {
        "n_layers": hf.num_hidden_layers,
        "d_model": hf.hidden_size,
        "n_heads": hf.num_attention_heads,
        "d_head": d_head,
        "d_mlp": hf.intermediate_size,
        "d_vocab": hf.vocab_size,
        "n_ctx": hf.max_position_embeddings,
        "act_fn": _act(hf),
        "eps": hf.layer_norm_eps,
        "normalization_type": "LN",
        "parallel_attn_mlp": hf.use_parallel_residual,
        "default_prepend_bos": False,
        **_rope(hf, d_head),
    }


def _llama_config(hf: Any) -> dict[str, Any]:
    if getattr(hf, "mlp_bias", False):
        raise unsupported("LlamaForCausalLM with mlp_bias=True (a gate bias) cannot be converted")
    return _rotary_decoder(hf, gqa_always=False)


def _mistral_config(hf: Any) -> dict[str, Any]:
    return _rotary_decoder(hf, gqa_always=True)


def _qwen2_config(hf: Any) -> dict[str, Any]:
    return {**_rotary_decoder(hf, gqa_always=True), "default_prepend_bos": False}


def _qwen3_config(hf: Any) -> dict[str, Any]:
    # per-head RMSNorm of queries and keys before the rotary embedding
    return {
        **_rotary_decoder(hf, gqa_always=False),
        "use_qk_norm": True,
        "default_prepend_bos": False,
    }


def _olmo_config(hf: Any) -> dict[str, Any]:
    n_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if n_kv != hf.num_attention_heads:
        raise unsupported("OlmoForCausalLM with grouped-query attention cannot be converted")
    cfg = _rotary_decoder(hf, gqa_always=False)
    # OLMo's LayerNorm has no weight or bias and a fixed eps: TransformerLens's LNPre is exactly
    # that, so the model has no norm parameters the checkpoint lacks.
    cfg.update(normalization_type="LNPre", final_rms=False, eps=1e-5, clip_qkv=hf.clip_qkv)
    return cfg


def _gemma_config(hf: Any) -> dict[str, Any]:
    cfg = _rotary_decoder(hf, gqa_always=True)
    act = getattr(hf, "hidden_activation", None) or hf.hidden_act
    cfg["act_fn"] = _act(hf, act)
    return cfg


def _attention_biases(hf_model: Any, cfg: HookedTransformerConfig, state: StateDict) -> StateDict:
    """Copies q/k/v/o projection biases of LLaMA-layout attention into ``state``.

    TransformerLens's LLaMA, Mistral and OLMo converters write zero biases; checkpoints trained
    with ``attention_bias=True`` need their own.
    """
    if not getattr(hf_model.config, "attention_bias", False):
        return state
    kv = "_" if cfg.n_key_value_heads is not None else ""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    for layer in range(cfg.n_layers):
        attn = hf_model.model.layers[layer].self_attn
        pre = f"blocks.{layer}.attn."
        state[pre + "b_Q"] = attn.q_proj.bias.reshape(cfg.n_heads, cfg.d_head)
        state[pre + kv + "b_K"] = attn.k_proj.bias.reshape(n_kv, cfg.d_head)
        state[pre + kv + "b_V"] = attn.v_proj.bias.reshape(n_kv, cfg.d_head)
        state[pre + "b_O"] = attn.o_proj.bias
    return state


def _llama_weights(hf_model: Any, cfg: HookedTransformerConfig) -> StateDict:
    return _attention_biases(hf_model, cfg, convert_llama_weights(hf_model, cfg))


def _mistral_weights(hf_model: Any, cfg: HookedTransformerConfig) -> StateDict:
    return _attention_biases(hf_model, cfg, convert_mistral_weights(hf_model, cfg))


def _qwen3_weights(hf_model: Any, cfg: HookedTransformerConfig) -> StateDict:
    return _attention_biases(hf_model, cfg, convert_qwen3_weights(hf_model, cfg))


def _olmo_weights(hf_model: Any, cfg: HookedTransformerConfig) -> StateDict:
    state = _attention_biases(hf_model, cfg, convert_olmo_weights(hf_model, cfg))
    for layer in range(cfg.n_layers):  # the converter leaves out the (absent) q/k/v biases
        for key in ("b_Q", "b_K", "b_V"):
            state.setdefault(f"blocks.{layer}.attn.{key}", torch.zeros(cfg.n_heads, cfg.d_head))
    # the converter writes identity LayerNorm weights; LNPre has none
    return {k: v for k, v in state.items() if not re.search(r"(^|\.)ln(1|2|_final)\.[wb]$", k)}


ARCHITECTURES: dict[str, _Architecture] = {
    "GPT2LMHeadModel": _Architecture(_gpt2_config, convert_gpt2_weights),
    "GPTNeoXForCausalLM": _Architecture(_neox_config, convert_neox_weights),
    "LlamaForCausalLM": _Architecture(_llama_config, _llama_weights),
    "MistralForCausalLM": _Architecture(_mistral_config, _mistral_weights),
    "Qwen2ForCausalLM": _Architecture(_qwen2_config, convert_qwen2_weights),
    "Qwen3ForCausalLM": _Architecture(_qwen3_config, _qwen3_weights),
    "OlmoForCausalLM": _Architecture(_olmo_config, _olmo_weights),
    "GemmaForCausalLM": _Architecture(_gemma_config, convert_gemma_weights),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)
"""The Hugging Face model classes :func:`load_hf` converts."""


def architecture_name(hf_config: Any) -> str:
    names = list(getattr(hf_config, "architectures", None) or [])
    supported = [n for n in names if n in ARCHITECTURES]
    if supported:
        return supported[0]
    what = names[0] if names else f"model_type {getattr(hf_config, 'model_type', None)!r}"
    raise unsupported(f"architecture {what} is not supported")
