"""Write a ``HookedTransformer`` back out as a Hugging Face checkpoint: :func:`save_hf`.

An unlearned model should be usable outside unlearnlens (lm-eval, open-unlearning, vLLM), and
those tools read Hugging Face checkpoints. :func:`save_hf` inverts the conversion
:func:`unlearnlens.load_hf` applies, architecture by architecture, and refuses (rather than
approximates) a model the target class cannot represent exactly: before anything is written,
the checkpoint it would write is converted back with the same code :func:`load_hf` uses and
compared, tensor for tensor and config field for config field, with the model.

A model built in code (the toy model, a test fixture) has no Hugging Face class of its own; it
is written as the class its configuration fits: ``LlamaForCausalLM`` for RMSNorm + rotary +
gated MLP, ``GPT2LMHeadModel`` for LayerNorm + learned positions, ``GPTNeoXForCausalLM`` for
LayerNorm + rotary. Parameters that class has no place for (the toy model's MLP and unembedding
biases under LLaMA) must be zero, else :class:`~unlearnlens.UnsupportedArchitectureError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from unlearnlens._architectures import ARCHITECTURES, unsupported
from unlearnlens._storage import atomic_directory, write_safetensors, write_text
from unlearnlens.errors import UnsupportedArchitectureError
from unlearnlens.models import _converted_config

__all__ = ["save_hf"]

StateDict = dict[str, Tensor]

# TransformerLens activation names -> Hugging Face names (the same functions)
_HF_ACT = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_fast": "gelu_fast",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "relu": "relu",
}

# Config fields that decide what the model computes, beyond the patching-compatibility ones.
_BEHAVIOUR_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "d_vocab_out",
    "n_key_value_heads",
    "act_fn",
    "eps",
    "normalization_type",
    "final_rms",
    "positional_embedding_type",
    "rotary_dim",
    "rotary_base",
    "rotary_adjacent_pairs",
    "use_NTK_by_parts_rope",
    "NTK_original_ctx_len",
    "NTK_by_parts_low_freq_factor",
    "NTK_by_parts_high_freq_factor",
    "NTK_by_parts_factor",
    "gated_mlp",
    "attn_only",
    "parallel_attn_mlp",
    "use_attn_scale",
    "attn_scale",
    "scale_attn_by_inverse_layer_idx",
    "use_local_attn",
    "window_size",
    "attn_types",
    "use_normalization_before_and_after",
    "use_qk_norm",
    "clip_qkv",
    "num_experts",
    "default_prepend_bos",
)


def _guess_architecture(cfg: HookedTransformerConfig) -> str:
    """The Hugging Face class whose layout a model built in code follows."""
    if cfg.original_architecture in ARCHITECTURES:
        return cfg.original_architecture
    pos = cfg.positional_embedding_type
    if cfg.normalization_type == "RMS" and pos == "rotary" and cfg.gated_mlp:
        return "LlamaForCausalLM"
    if cfg.normalization_type == "LN" and pos == "standard" and not cfg.gated_mlp:
        return "GPT2LMHeadModel"
    if cfg.normalization_type == "LN" and pos == "rotary" and not cfg.gated_mlp:
        return "GPTNeoXForCausalLM"
    raise unsupported(
        f"save_hf: model {cfg.model_name!r} (normalization {cfg.normalization_type!r}, "
        f"positions {pos!r}, gated_mlp={cfg.gated_mlp}) fits no Hugging Face class"
    )


# ------------------------------------------------------------------------------ configs


def _hf_act(cfg: HookedTransformerConfig) -> str:
    if cfg.act_fn not in _HF_ACT:
        raise unsupported(f"save_hf: activation {cfg.act_fn!r} has no Hugging Face name")
    return _HF_ACT[cfg.act_fn]


def _rope_parameters(cfg: HookedTransformerConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(cfg.rotary_base),
        # always written: GPT-NeoX's default is 0.25
        "partial_rotary_factor": cfg.rotary_dim / cfg.d_head,
    }
    if cfg.use_NTK_by_parts_rope:
        params.update(
            rope_type="llama3",
            factor=float(cfg.NTK_by_parts_factor),
            low_freq_factor=float(cfg.NTK_by_parts_low_freq_factor),
            high_freq_factor=float(cfg.NTK_by_parts_high_freq_factor),
            original_max_position_embeddings=int(cfg.NTK_original_ctx_len),
        )
    return params


def _token_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _rotary_config_fields(cfg: HookedTransformerConfig, tied: bool) -> dict[str, Any]:
    """The config fields GPT-NeoX and the LLaMA family name alike."""
    return {
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_act": _hf_act(cfg),
        "max_position_embeddings": cfg.n_ctx,
        "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": tied,
    }


def _llama_family_config(cfg: HookedTransformerConfig, architecture: str, tied: bool) -> Any:
    import transformers

    common = _rotary_config_fields(cfg, tied)
    common.update(num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads, head_dim=cfg.d_head)
    window: dict[str, Any] = {}
    if cfg.use_local_attn:
        types = list(cfg.attn_types or ["local"] * cfg.n_layers)
        if architecture == "MistralForCausalLM" and all(t == "local" for t in types):
            window = {"sliding_window": cfg.window_size}
        elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            window = {
                "use_sliding_window": True,
                "sliding_window": cfg.window_size,
                "layer_types": [
                    "sliding_attention" if t == "local" else "full_attention" for t in types
                ],
            }
        else:
            raise unsupported(f"save_hf: {architecture} has no sliding-window layout like this")
    if architecture == "OlmoForCausalLM":
        if cfg.normalization_type != "LNPre":
            raise unsupported("save_hf: OlmoForCausalLM needs weightless LayerNorm (LNPre)")
        return transformers.OlmoConfig(
            **common, clip_qkv=cfg.clip_qkv, attention_bias=False, architectures=[architecture]
        )
    if cfg.normalization_type != "RMS":
        raise unsupported(
            f"save_hf: {architecture} needs RMSNorm, the model has {cfg.normalization_type!r}"
        )
    extra: dict[str, Any] = {"rms_norm_eps": cfg.eps}
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "GemmaForCausalLM": transformers.GemmaConfig,
    }[architecture]
    if architecture == "GemmaForCausalLM":
        extra["hidden_activation"] = common.pop("hidden_act")
    return config_class(**common, **extra, **window, architectures=[architecture])


def _hf_config(
    cfg: HookedTransformerConfig, architecture: str, tokenizer: Any, tied: bool, bias: bool
) -> Any:
    import transformers

    if architecture == "GPT2LMHeadModel":
        config = transformers.GPT2Config(
            vocab_size=cfg.d_vocab,
            n_positions=cfg.n_ctx,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_mlp,
            activation_function=_hf_act(cfg),
            layer_norm_epsilon=cfg.eps,
            scale_attn_weights=cfg.use_attn_scale,
            scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=tied,
            architectures=[architecture],
        )
    elif architecture == "GPTNeoXForCausalLM":
        config = transformers.GPTNeoXConfig(
            **_rotary_config_fields(cfg, tied),
            layer_norm_eps=cfg.eps,
            use_parallel_residual=cfg.parallel_attn_mlp,
            attention_bias=True,
            architectures=[architecture],
        )
    else:
        config = _llama_family_config(cfg, architecture, tied)
        if bias:
            config.attention_bias = True
    for key, value in _token_ids(tokenizer).items():
        setattr(config, key, value)
    config.dtype = str(cfg.dtype).removeprefix("torch.")
    return config


# ------------------------------------------------------------------------------ weights


def _heads_in(w: Tensor) -> Tensor:
    """TransformerLens ``[head, d_model, d_head]`` -> a Linear weight ``[head*d_head, d_model]``."""
    return einops.rearrange(w, "n m h -> (n h) m")


def _heads_out(w: Tensor) -> Tensor:
    """TransformerLens ``W_O`` ``[head, d_head, d_model]`` -> ``[d_model, head*d_head]``."""
    return einops.rearrange(w, "n h m -> m (n h)")


def _gpt2_state(sd: StateDict, cfg: HookedTransformerConfig) -> StateDict:
    out = {
        "transformer.wte.weight": sd["embed.W_E"],
        "transformer.wpe.weight": sd["pos_embed.W_pos"],
    }
    for layer in range(cfg.n_layers):
        b, h = f"blocks.{layer}.", f"transformer.h.{layer}."
        qkv = [einops.rearrange(sd[b + f"attn.W_{x}"], "i m h -> m (i h)") for x in "QKV"]
        out.update(
            {
                h + "ln_1.weight": sd[b + "ln1.w"],
                h + "ln_1.bias": sd[b + "ln1.b"],
                h + "attn.c_attn.weight": torch.cat(qkv, dim=1),
                h + "attn.c_attn.bias": torch.cat([sd[b + f"attn.b_{x}"].flatten() for x in "QKV"]),
                h + "attn.c_proj.weight": einops.rearrange(sd[b + "attn.W_O"], "i h m -> (i h) m"),
                h + "attn.c_proj.bias": sd[b + "attn.b_O"],
                h + "ln_2.weight": sd[b + "ln2.w"],
                h + "ln_2.bias": sd[b + "ln2.b"],
                h + "mlp.c_fc.weight": sd[b + "mlp.W_in"],
                h + "mlp.c_fc.bias": sd[b + "mlp.b_in"],
                h + "mlp.c_proj.weight": sd[b + "mlp.W_out"],
                h + "mlp.c_proj.bias": sd[b + "mlp.b_out"],
            }
        )
    out["transformer.ln_f.weight"] = sd["ln_final.w"]
    out["transformer.ln_f.bias"] = sd["ln_final.b"]
    out["lm_head.weight"] = sd["unembed.W_U"].T
    return out


def _neox_state(sd: StateDict, cfg: HookedTransformerConfig) -> StateDict:
    out = {"gpt_neox.embed_in.weight": sd["embed.W_E"]}
    for layer in range(cfg.n_layers):
        b, h = f"blocks.{layer}.", f"gpt_neox.layers.{layer}."
        w = torch.stack([sd[b + f"attn.W_{x}"] for x in "QKV"])
        bias = torch.stack([sd[b + f"attn.b_{x}"] for x in "QKV"])
        out.update(
            {
                h + "input_layernorm.weight": sd[b + "ln1.w"],
                h + "input_layernorm.bias": sd[b + "ln1.b"],
                h + "attention.query_key_value.weight": einops.rearrange(
                    w, "qkv i m h -> (i qkv h) m"
                ),
                h + "attention.query_key_value.bias": einops.rearrange(
                    bias, "qkv i h -> (i qkv h)"
                ),
                h + "attention.dense.weight": _heads_out(sd[b + "attn.W_O"]),
                h + "attention.dense.bias": sd[b + "attn.b_O"],
                h + "post_attention_layernorm.weight": sd[b + "ln2.w"],
                h + "post_attention_layernorm.bias": sd[b + "ln2.b"],
                h + "mlp.dense_h_to_4h.weight": sd[b + "mlp.W_in"].T,
                h + "mlp.dense_h_to_4h.bias": sd[b + "mlp.b_in"],
                h + "mlp.dense_4h_to_h.weight": sd[b + "mlp.W_out"].T,
                h + "mlp.dense_4h_to_h.bias": sd[b + "mlp.b_out"],
            }
        )
    out["gpt_neox.final_layer_norm.weight"] = sd["ln_final.w"]
    out["gpt_neox.final_layer_norm.bias"] = sd["ln_final.b"]
    out["embed_out.weight"] = sd["unembed.W_U"].T
    return out


def _unscale(scaled: Tensor, scale: float) -> Tensor:
    """``x`` with ``x * scale == scaled`` exactly in ``scaled``'s dtype (Gemma's embedding).

    Division alone can land one or two units in the last place off; the neighbours are tried
    until the product matches.
    """
    s = torch.tensor(scale, dtype=scaled.dtype)
    x = scaled / s
    for _ in range(4):
        off = x * s != scaled
        if not off.any():
            break
        step = torch.where(
            x * s < scaled, torch.full_like(x, math.inf), -torch.full_like(x, math.inf)
        )
        x = torch.where(off, torch.nextafter(x, step), x)
    return x


def _llama_family_state(
    sd: StateDict, cfg: HookedTransformerConfig, architecture: str, bias: bool
) -> StateDict:
    gemma = architecture == "GemmaForCausalLM"
    kv = "_" if cfg.n_key_value_heads is not None else ""

    def norm(w: Tensor) -> Tensor:  # Gemma stores 1 + w in TransformerLens
        return (w.float() - 1).to(w.dtype) if gemma else w

    embed = _unscale(sd["embed.W_E"], cfg.d_model**0.5) if gemma else sd["embed.W_E"]
    out = {"model.embed_tokens.weight": embed}
    for layer in range(cfg.n_layers):
        b, h = f"blocks.{layer}.", f"model.layers.{layer}."
        out.update(
            {
                h + "self_attn.q_proj.weight": _heads_in(sd[b + "attn.W_Q"]),
                h + "self_attn.k_proj.weight": _heads_in(sd[b + f"attn.{kv}W_K"]),
                h + "self_attn.v_proj.weight": _heads_in(sd[b + f"attn.{kv}W_V"]),
                h + "self_attn.o_proj.weight": _heads_out(sd[b + "attn.W_O"]),
                h + "mlp.up_proj.weight": sd[b + "mlp.W_in"].T,
                h + "mlp.gate_proj.weight": sd[b + "mlp.W_gate"].T,
                h + "mlp.down_proj.weight": sd[b + "mlp.W_out"].T,
            }
        )
        if architecture != "OlmoForCausalLM":
            out[h + "input_layernorm.weight"] = norm(sd[b + "ln1.w"])
            out[h + "post_attention_layernorm.weight"] = norm(sd[b + "ln2.w"])
        if architecture == "Qwen3ForCausalLM":
            out[h + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.w"]
            out[h + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.w"]
        if bias or architecture == "Qwen2ForCausalLM":
            out[h + "self_attn.q_proj.bias"] = sd[b + "attn.b_Q"].flatten()
            out[h + "self_attn.k_proj.bias"] = sd[b + f"attn.{kv}b_K"].flatten()
            out[h + "self_attn.v_proj.bias"] = sd[b + f"attn.{kv}b_V"].flatten()
        if bias:
            out[h + "self_attn.o_proj.bias"] = sd[b + "attn.b_O"]
    if architecture != "OlmoForCausalLM":
        out["model.norm.weight"] = norm(sd["ln_final.w"])
    out["lm_head.weight"] = sd["unembed.W_U"].T
    return out


def _hf_state(
    sd: StateDict, cfg: HookedTransformerConfig, architecture: str, bias: bool
) -> StateDict:
    if architecture == "GPT2LMHeadModel":
        return _gpt2_state(sd, cfg)
    if architecture == "GPTNeoXForCausalLM":
        return _neox_state(sd, cfg)
    return _llama_family_state(sd, cfg, architecture, bias)


def _has_attention_bias(sd: StateDict, cfg: HookedTransformerConfig) -> bool:
    """Whether a LLaMA-layout model needs ``attention_bias=True`` (any non-zero q/k/v/o bias)."""
    keys = [
        k
        for k in sd
        if k.startswith("blocks.")
        and k.split(".")[-1] in ("b_Q", "b_K", "b_V", "b_O", "_b_K", "_b_V")
    ]
    return any(bool(sd[k].any()) for k in keys)


# ------------------------------------------------------------------------------ checks


def _meta_model(config: Any, state: StateDict) -> Any:
    """A Hugging Face model object holding ``state`` (no memory of its own: built on meta)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    expected = set(hf.state_dict())
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(expected - set(state) - {"lm_head.weight"})
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise unsupported(
            f"save_hf: the {type(hf).__name__} state dict does not fit: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    hf.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def _check_round_trip(
    model: HookedTransformer, own: StateDict, config: Any, state: StateDict, architecture: str
) -> None:
    """Converts the checkpoint back as :func:`load_hf` does; any difference is an error.

    ``own`` is the model's state dict on the CPU, ``state`` the checkpoint's.
    """
    spec = ARCHITECTURES[architecture]
    fields = spec.config(config)
    if fields["n_ctx"] < model.cfg.n_ctx:
        raise unsupported(f"save_hf: {architecture} would hold fewer positions than n_ctx")
    fields["n_ctx"] = model.cfg.n_ctx
    rebuilt = _converted_config(fields, model.tokenizer, dtype=model.cfg.dtype, device="cpu")
    for name in _BEHAVIOUR_FIELDS:
        a, b = getattr(model.cfg, name, None), getattr(rebuilt, name, None)
        if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b)):
            raise unsupported(
                f"save_hf: as {architecture}, the model's {name} would change from {a!r} to {b!r}"
            )
    hf = _meta_model(config, state)
    with torch.no_grad():
        converted = spec.weights(hf, rebuilt)
    for name, param in model.named_parameters():
        back = converted.get(name)
        if back is None:
            if name == "unembed.b_U" and not param.any():
                continue
            raise unsupported(
                f"save_hf: {architecture} has no place for {name}"
                + (" (it is non-zero)" if param.any() else "")
            )
        back = back.to(param.dtype)
        if back.shape != param.shape or not torch.equal(back.cpu(), own[name]):
            raise unsupported(
                f"save_hf: {architecture} cannot hold {name} exactly"
                + (" (it is non-zero, and the class has no such parameter)" if param.any() else "")
            )


# ------------------------------------------------------------------------------ public


def _prepare(model: HookedTransformer, architecture: str | None) -> tuple[Any, StateDict]:
    """The Hugging Face config and state dict of ``model``, checked to convert back exactly."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"save_hf expects a HookedTransformer, got {type(model).__name__}")
    if architecture is None:
        architecture = _guess_architecture(model.cfg)
    elif architecture not in ARCHITECTURES:
        raise unsupported(f"save_hf: architecture={architecture!r} is not supported")
    if model.cfg.n_devices != 1:
        raise unsupported("save_hf: a model split over several devices; move it to one first")
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    llama_layout = architecture not in ("GPT2LMHeadModel", "GPTNeoXForCausalLM")
    bias = (
        llama_layout and architecture != "Qwen2ForCausalLM" and _has_attention_bias(sd, model.cfg)
    )
    state = _hf_state(sd, model.cfg, architecture, bias)
    embed_key = next(
        k for k in state if k.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight"))
    )
    tied = torch.equal(
        state["lm_head.weight" if "lm_head.weight" in state else "embed_out.weight"],
        state[embed_key],
    )
    if architecture == "GPTNeoXForCausalLM":
        state["lm_head.weight"] = state.pop("embed_out.weight")
    config = _hf_config(model.cfg, architecture, model.tokenizer, tied, bias)
    _check_round_trip(model, sd, config, state, architecture)
    if tied:
        state.pop("lm_head.weight")
    return config, state


def save_hf(
    model: HookedTransformer, directory: str | Path, *, architecture: str | None = None
) -> Path:
    """Writes ``model`` as a Hugging Face checkpoint: ``config.json``, safetensors, tokenizer.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` then computes the
    model's logits (up to float rounding), and :func:`unlearnlens.load_hf` gives the model
    back exactly, parameter for parameter. The folder is written atomically: a failed save
    leaves an earlier one in place. The model itself is not changed.

    Args:
        model: A model with unprocessed weights (as :func:`load_hf` gives by default, or built
            in code). Folded LayerNorms and centred weights have no Hugging Face equivalent.
        directory: The checkpoint folder; replaced as a whole if it exists.
        architecture: The Hugging Face class to write, one of
            :data:`~unlearnlens.SUPPORTED_ARCHITECTURES`. Default: the class the model was
            loaded from, else the one its configuration fits (see the module docstring).

    Returns:
        The directory, as a ``Path``.

    Raises:
        TypeError: ``model`` is not a ``HookedTransformer``.
        UnsupportedArchitectureError: The model does not fit the class exactly (a non-zero
            parameter the class lacks, a config option it cannot express, processed weights);
            the message names the parameter or field.
    """
    config, state = _prepare(model, architecture)
    tensors = {k: v.contiguous().clone() for k, v in state.items()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        write_text(tmp / "config.json", config.to_json_string())
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
    return directory


def hf_trainable(
    model: HookedTransformer, architecture: str | None = None, *, required: bool = False
) -> list[str] | None:
    """The parameters training may change so that :func:`save_hf` can still write the model.

    TransformerLens gives every block biases (and the unembedding one) that some Hugging Face
    classes lack; :func:`load_hf` fills them with zeros. Training them makes the model
    unexportable, so a trainer that should keep the model exportable trains only these.

    Args:
        model: The model to train.
        architecture: The class :func:`save_hf` will write (default: as there).
        required: Raise, rather than return None, when the model does not fit.

    Returns:
        The parameter names, or None when the model does not fit a Hugging Face class now.

    Raises:
        UnsupportedArchitectureError: With ``required``, the model does not fit; names what.
    """
    try:
        config, state = _prepare(model, architecture)
    except UnsupportedArchitectureError:
        if required:
            raise
        return None
    arch = config.architectures[0]
    bias = "model.layers.0.self_attn.o_proj.bias" in state
    lacking: tuple[str, ...] = ("unembed.b_U",)
    if arch not in ("GPT2LMHeadModel", "GPTNeoXForCausalLM"):
        lacking += ("mlp.b_in", "mlp.b_out")
        if not bias:
            lacking += ("attn.b_O",)
            if arch != "Qwen2ForCausalLM":
                lacking += ("attn.b_Q", "attn.b_K", "attn.b_V", "attn._b_K", "attn._b_V")
    return [n for n, _ in model.named_parameters() if not n.endswith(lacking)]
