"""Load, save and compare the TransformerLens models every other module works on.

:func:`load_hf` turns a local Hugging Face checkpoint (or an in-memory ``PreTrainedModel``) into
a :class:`~transformer_lens.HookedTransformer` without looking up an official model name and
without processing the weights, so each TransformerLens parameter is the checkpoint's own tensor
and raw logits match the checkpoint's. :func:`save_model` / :func:`load_model` store a
``HookedTransformer`` bit-exactly (safetensors weights, a JSON config, the tokenizer), and
:func:`check_compatible` says whether two models can be patched or restored into each other.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

from unlearnlens._architectures import (
    ARCHITECTURES,
    DEFAULT_MAX_CTX,
    SUPPORTED_ARCHITECTURES,
    architecture_name,
    unsupported,
)
from unlearnlens._checks import check_bool, check_device, check_int
from unlearnlens._storage import (
    atomic_directory,
    check_writable,
    read_json,
    read_safetensors,
    write_safetensors,
    write_text,
)
from unlearnlens.errors import (
    CheckpointError,
    ConfigError,
    FileFormatError,
    IncompatibleModelsError,
    UnsupportedArchitectureError,
)

__all__ = [
    "COMPATIBILITY_FIELDS",
    "SUPPORTED_ARCHITECTURES",
    "check_compatible",
    "check_distinct",
    "hub_id",
    "load_hf",
    "load_model",
    "save_model",
    "tokenizer_adds_bos",
]

_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "unlearnlens_config.json"
_TOKENIZER_DIR = "tokenizer"
_FORMAT = "unlearnlens.HookedTransformer"
_FORMAT_VERSION = 1

# Fields that drive side effects when a config is constructed (a tokenizer download, weight
# initialisation, reseeding the global RNGs); they are set to inert values for construction and
# put back on the config afterwards.
_CONSTRUCTION_OVERRIDES: dict[str, Any] = {
    "tokenizer_name": None,
    "init_weights": False,
    "seed": None,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"saved model config names an unknown dtype {name!r}")
    return dtype


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype):
            value = {"__dtype__": _dtype_name(value)}
        elif isinstance(value, torch.device):
            value = str(value)
        elif hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        out[key] = value
    return out


def _config_from_json(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and set(value) == {"__dtype__"}:
            value = _dtype_from_name(value["__dtype__"])
        out[key] = value
    return out


def _resolve_device(saved: str | None, device: str | torch.device | None) -> str:
    if device is not None:
        return str(device)
    if saved is None or (str(saved).startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    if str(saved).startswith("mps") and not torch.backends.mps.is_available():
        return "cpu"
    return str(saved)


def save_model(model: HookedTransformer, directory: str | Path) -> Path:
    """Saves a ``HookedTransformer`` so that :func:`load_model` gives it back bit for bit.

    The directory gets the weights as safetensors (``model.safetensors``, in the model's own
    dtype), the full ``HookedTransformerConfig`` as JSON (``unlearnlens_config.json``; the dtype
    is stored by name) and, when the model has one, the tokenizer (``tokenizer/``, via
    ``save_pretrained``). The model itself is not changed.

    Args:
        model: The model to save.
        directory: Where to save it; created if missing. Everything is written to a
            temporary folder and swapped in once complete, so a failed save leaves an earlier
            save there as it was; other files in the folder are kept.

    Returns:
        The directory, as a ``Path``.

    Raises:
        TypeError: ``model`` is not a ``HookedTransformer``.
    """
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"save_model expects a HookedTransformer, got {type(model).__name__}")
    directory = check_writable(directory, what="model folder")
    # contiguous CPU copies: safetensors refuses shared or non-contiguous storage
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in model.state_dict().items()
    }
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "config": _config_to_json(model.cfg),
        "has_tokenizer": model.tokenizer is not None,
        "padding_side": getattr(model.tokenizer, "padding_side", None),
    }
    with atomic_directory(directory, keep_others=True) as tmp:
        write_safetensors(tmp / _WEIGHTS_FILE, tensors, metadata={"format": _FORMAT})
        write_text(tmp / _CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp / _TOKENIZER_DIR))
    return directory


def load_model(
    directory: str | Path, *, device: str | torch.device | None = None
) -> HookedTransformer:
    """Loads a model written by :func:`save_model`, bit-exactly.

    Every parameter and buffer comes back with the saved values and dtype, so logits equal the
    saved model's exactly. The tokenizer is reloaded from the local folder (nothing is
    downloaded), with the saved padding side.

    Args:
        directory: A directory written by :func:`save_model`.
        device: Where to put the model. ``None`` uses the device it was saved from when that is
            available here, else the CPU.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: The directory does not exist or does not hold a saved model.
    """
    check_device(device)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no saved model at {str(directory)!r}: the directory does not exist")
    config_path, weights_path = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{str(directory)!r} is not a model saved by unlearnlens.save_model: "
            f"missing {', '.join(missing)}"
        )
    try:
        payload = read_json(config_path, what="saved model config")
    except FileFormatError as exc:
        raise CheckpointError(str(exc)) from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _FORMAT
        or not isinstance(payload.get("config"), dict)
    ):
        raise CheckpointError(
            f"{str(config_path)!r} is not a model config written by unlearnlens.save_model"
        )
    cfg_dict = _config_from_json(payload["config"])
    restore = {k: cfg_dict.get(k) for k in _CONSTRUCTION_OVERRIDES}
    cfg_dict.update(_CONSTRUCTION_OVERRIDES)
    cfg_dict["device"] = _resolve_device(cfg_dict.get("device"), device)
    if not str(cfg_dict["device"]).startswith("cuda"):
        cfg_dict["n_devices"] = 1
    # n_params is derived in __post_init__; passing it back is harmless but not needed
    cfg_dict.pop("n_params", None)
    try:
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise CheckpointError(
            f"{str(config_path)!r} does not hold a valid model config: {type(exc).__name__}: {exc}"
        ) from None

    tokenizer = None
    if payload.get("has_tokenizer"):
        from transformers import AutoTokenizer

        tok_dir = directory / _TOKENIZER_DIR
        if not tok_dir.is_dir():
            raise CheckpointError(f"saved model at {str(directory)!r} lacks its tokenizer folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot read the tokenizer in {str(tok_dir)!r} (truncated or corrupt?): {exc}"
            ) from None
    padding_side = payload.get("padding_side") or "right"
    try:
        model = HookedTransformer(
            cfg, tokenizer=tokenizer, default_padding_side=padding_side if tokenizer else None
        )
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(
            f"{str(config_path)!r} does not hold a valid model config: {type(exc).__name__}: {exc}"
        ) from None
    for key, value in restore.items():
        setattr(model.cfg, key, value)
    try:
        state = read_safetensors(weights_path, what="saved model weights")
    except FileFormatError as exc:
        raise CheckpointError(str(exc)) from None
    expected = set(model.state_dict())
    if set(state) != expected:
        extra, lacking = sorted(set(state) - expected), sorted(expected - set(state))
        raise CheckpointError(
            f"weights in {str(weights_path)!r} do not fit the saved config: "
            f"unexpected {extra[:5]}, missing {lacking[:5]}"
        )
    # assign: buffers keep the saved dtype too (a model cast with .to(dtype) has bfloat16 masks)
    current = model.state_dict()
    for key, value in state.items():
        if value.shape != current[key].shape:
            raise CheckpointError(
                f"weights in {str(weights_path)!r} do not fit the saved config: {key} has "
                f"shape {tuple(value.shape)}, the config needs {tuple(current[key].shape)}"
            )
    model.load_state_dict({k: v.to(current[k].device) for k, v in state.items()}, assign=True)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Hugging Face -> HookedTransformer
# --------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# TransformerLens leaves these tokenizers as they are (their checkpoints use no BOS token).
_NO_BOS_RELOAD = ("OlmoForCausalLM", "OlmoeForCausalLM", "Olmo2ForCausalLM")


def hub_id(source: object) -> str | None:
    """``source`` as a Hugging Face hub id, or ``None`` when it must be read as a local path.

    A string is a hub id only when all of these hold, so that a mistyped local path never
    reaches the network:

    * it is a ``str`` (a ``pathlib.Path`` is always local);
    * it is ``org/name``: exactly one ``/``, no backslash, no whitespace, both parts made of
      letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit and not
      ending with ``.`` (so nothing that starts with ``/``, ``.`` or ``~``, and no ``..``);
    * nothing of it exists here: neither the path itself nor its first part ``org`` (a
      folder ``org`` beside the working directory means ``org/name`` is a local path with a
      typo).

    A bare ``name`` (no ``/``) is local too: hub models are named by organisation.
    """
    if not isinstance(source, str) or not _HUB_ID.match(source):
        return None
    org, name = source.split("/")
    if org.endswith(".") or name.endswith(".") or ".." in source:
        return None
    if Path(source).exists() or Path(org).exists():
        return None
    return source


def _nearest_existing(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent != Path(".") and parent.exists():
            return parent
    return None


def _missing_local(path: Path, given: str) -> CheckpointError:
    near = _nearest_existing(path)
    where = f"; the nearest part that exists is {str(near)!r}" if near is not None else ""
    hint = ""
    if isinstance(given, str) and _HUB_ID.match(given) and near is not None:
        hint = " (read as a local path, not a hub id, because that part exists here)"
    return CheckpointError(f"checkpoint path {given!r} does not exist{where}{hint}")


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(source: str, where: str) -> Any:
    """``AutoTokenizer.from_pretrained(source)``; its failures become a CheckpointError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # tokenizers raise many types for a truncated or corrupt file
        raise CheckpointError(
            f"cannot read the tokenizer of {where} (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _with_bos(tokenizer: Any, architecture: str, *, hub: str | None = None) -> Any:
    """The tokenizer TransformerLens would use, without reaching the network uninvited.

    ``HookedTransformer.set_tokenizer`` reloads a tokenizer by its ``name_or_path`` with
    ``add_bos_token=True``. That is done here for a tokenizer read from a local folder, or
    from the hub id the caller asked for (``hub``); any other tokenizer (built in memory, or
    named like a hub id without being one the caller gave) is marked as final instead, and
    TransformerLens prepends BOS itself (it checks whether the tokenizer does).
    """
    if architecture in _NO_BOS_RELOAD or tokenizer.bos_token is None:
        return tokenizer
    source = str(tokenizer.init_kwargs.get("name_or_path") or "")
    if source and (Path(source).is_dir() or (hub is not None and source == hub)):
        try:
            return get_tokenizer_with_bos(tokenizer)
        except (OSError, TypeError, KeyError, ValueError):
            pass
    tokenizer.init_kwargs["add_bos_token"] = True  # our own copy: see load_hf
    return tokenizer


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with ``tokenizer`` puts its BOS token first, as Hugging Face encodes.

    This is the checkpoint's own convention (a ``LlamaTokenizer`` with ``add_bos_token``, a
    post-processor that writes ``<bos> $A``, ...), read by encoding a probe text with and
    without special tokens, so it holds whatever mechanism the tokenizer uses.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = "a b"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    return len(with_special) > len(plain) and with_special[:1] == [bos] and plain[:1] != [bos]


def _converted_config(
    fields: dict[str, Any], tokenizer: Any, **values: Any
) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of an architecture's converted config ``fields``.

    ``values`` are set on top; nothing is downloaded or initialised (the weights come from the
    checkpoint), and with a tokenizer, prompts start with BOS exactly when it adds one (the
    checkpoint's tokenizer decides, not the architecture). :func:`load_hf` builds its models'
    configs with it, and :func:`unlearnlens.save_hf` the config it checks a checkpoint against.
    """
    fields = {**fields, **values, "tokenizer_name": None, "init_weights": False}
    if tokenizer is not None:
        fields["default_prepend_bos"] = tokenizer_adds_bos(tokenizer)
    return HookedTransformerConfig.from_dict(fields)


def _resolve_source(
    path_or_model: Any, dtype: torch.dtype, tokenizer: Any
) -> tuple[Any, Any, str, str | None]:
    """(Hugging Face model, tokenizer or None, model name, hub id or None) for any source."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    if isinstance(path_or_model, PreTrainedModel):
        architecture_name(_config_with_class(path_or_model))
        if tokenizer is None:
            source = getattr(path_or_model, "name_or_path", "") or ""
            if source and Path(source).is_dir() and _has_tokenizer_files(Path(source)):
                tokenizer = _load_tokenizer(source, repr(source))
        name = Path(getattr(path_or_model, "name_or_path", "") or "hf-model").name or "hf-model"
        return path_or_model, tokenizer, name, None
    if not isinstance(path_or_model, (str, Path)):
        raise TypeError(
            "load_hf expects a checkpoint directory, a hub id or a transformers.PreTrainedModel, "
            f"got {type(path_or_model).__name__}"
        )
    if not str(path_or_model).strip():
        raise CheckpointError(f"checkpoint path {str(path_or_model)!r} is empty")
    hub = hub_id(path_or_model)
    if hub is not None:
        try:
            hf_config = AutoConfig.from_pretrained(hub)
            architecture_name(hf_config)
            model = AutoModelForCausalLM.from_pretrained(hub, dtype=dtype)
        except UnsupportedArchitectureError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint path {hub!r} does not exist, and {hub!r} could not be loaded as a "
                f"Hugging Face hub model (it is not in the local cache, or the hub is "
                f"unreachable): {exc}"
            ) from exc
        if tokenizer is None:
            try:
                tokenizer = _load_tokenizer(hub, repr(hub))
            except CheckpointError:
                tokenizer = None
        return model, tokenizer, hub.split("/")[-1], hub
    path = Path(path_or_model).expanduser()
    if not path.exists():
        raise _missing_local(path, str(path_or_model))
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint path {str(path)!r} is a file, not a checkpoint directory"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} has no config.json, so it is not a Hugging Face "
            "checkpoint"
        )
    try:
        raw = read_json(config_path, what="checkpoint config")
    except FileFormatError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{str(config_path)!r} holds a JSON {type(raw).__name__}, not a model config object"
        )
    # decide support from the raw JSON first: no weights are read for an unsupported model
    # (a config without an "architectures" list is judged by its model_type)
    architecture_name(_RawConfig(raw))
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers validates fields with many exception types
        raise CheckpointError(
            f"{str(config_path)!r} is not a valid model config: {type(exc).__name__}: {exc}"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=hf_config, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):  # no causal-LM class for it
            raise unsupported(f"{str(path)!r} cannot be loaded as a causal LM ({exc})") from exc
        raise CheckpointError(f"could not load the weights in {str(path)!r}: {exc}") from None
    except Exception as exc:  # safetensors, torch and OS errors for missing or corrupt weights
        raise CheckpointError(
            f"could not load the weights in {str(path)!r} (missing, truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if tokenizer is None and _has_tokenizer_files(path):
        tokenizer = _load_tokenizer(str(path), repr(str(path)))
    return model, tokenizer, path.resolve().name, None


@dataclass(frozen=True)
class _RawConfig:
    """The two fields of a raw ``config.json`` that name its architecture."""

    raw: dict[str, Any]

    @property
    def architectures(self) -> list[str]:
        names = list(self.raw.get("architectures") or [])
        if not names:  # a bare config: the causal-LM class transformers maps its model_type to
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(self.raw.get("model_type") or "")
            names = [cls] if isinstance(cls, str) else []
        return names

    @property
    def model_type(self) -> str | None:
        return self.raw.get("model_type")


def _config_with_class(model: Any) -> _RawConfig:
    """An in-memory model's architecture is its class, whatever its config's list says."""
    return _RawConfig(
        {
            "architectures": [type(model).__name__],
            "model_type": getattr(model.config, "model_type", None),
        }
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype(dtype: object) -> torch.dtype:
    """A supported parameter dtype, given as a ``torch.dtype`` or its name."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(
                f"dtype {dtype!r} is not supported; use one of {', '.join(map(repr, _DTYPES))} "
                "(or the torch dtype)"
            )
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def load_hf(
    path_or_model: str | Path | Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    n_devices: int = 1,
    tokenizer: Any = None,
    process_weights: bool = False,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Converts a Hugging Face causal LM into a ``HookedTransformer``, offline.

    The source is a local checkpoint directory (``config.json`` + weights, as written by
    ``save_pretrained``), an in-memory ``transformers.PreTrainedModel``, or a hub id
    (``"org/name"``) that ``transformers`` can load from its local cache (or, for users online,
    from the hub). Only a string that is clearly a hub id goes to ``transformers`` as one (see
    :func:`hub_id`: ``org/name`` with nothing of it present locally); anything that looks like
    a path (``./x``, ``~/x``, ``a/b/c``, a backslash, or an ``org/`` folder that exists here)
    fails locally with a :class:`CheckpointError`, without a network look-up.
    No official-model-name table is consulted: the configuration is built from
    the checkpoint's own config, per architecture (see :data:`SUPPORTED_ARCHITECTURES`), and the
    weights go through TransformerLens's own converters.

    **The weights are not processed by default**: no LayerNorm folding, no centering of the
    weights that write to the residual stream or of the unembedding, no value-bias folding.
    Each TransformerLens parameter is then the checkpoint's tensor, reshaped (``mlp.W_out`` of
    a LLaMA block is ``down_proj.weight`` transposed, ``attn.W_Q`` is ``q_proj.weight`` split
    per head), so restoring a parameter restores exactly that checkpoint tensor, and raw logits
    match the checkpoint's. Two exceptions follow from TransformerLens's Gemma conventions:
    Gemma's ``embed.W_E`` holds the embedding multiplied by ``sqrt(d_model)`` and its norm
    weights hold ``1 + w``. ``process_weights=True`` applies TransformerLens's standard
    processing instead (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
    ``fold_value_biases``), which keeps log-probabilities but not raw logits.

    The tokenizer found in the directory (or given as ``tokenizer``, or found in the in-memory
    model's ``name_or_path`` folder) is attached, padding on the right. Without one the model
    takes token ids only. Whether prompts start with a BOS token follows that tokenizer, as
    Hugging Face does: ``model.to_tokens(text)`` and :meth:`PromptSet.from_pairs` prepend BOS
    exactly when ``tokenizer(text)`` does (``cfg.default_prepend_bos``; see
    :func:`tokenizer_adds_bos`), whatever the architecture.

    Args:
        path_or_model: A checkpoint directory, a hub id, or a ``PreTrainedModel`` (left
            unchanged).
        device: Where the model goes; ``None`` is TransformerLens's default (CUDA when
            available).
        dtype: Parameter dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``, or
            its name (``"float32"``, ``"bfloat16"``, ``"float16"``).
        n_devices: Number of GPUs to split the layers over (passed to the TransformerLens
            config).
        tokenizer: A tokenizer to attach instead of the one found with the checkpoint.
        process_weights: Apply TransformerLens's weight processing (see above).
        n_ctx: Longest sequence the model accepts. ``None`` is the checkpoint's maximum,
            capped at 4096 (TransformerLens keeps an ``n_ctx x n_ctx`` mask per layer).

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: The path does not exist (and is no loadable hub id), is not a
            directory, lacks ``config.json``, or holds a config, weights or tokenizer that are
            truncated or corrupt; the message names the file or folder.
        UnsupportedArchitectureError: The architecture (or one of its options, such as a rope
            scaling type) cannot be converted; the message lists the supported ones.
        ConfigError: ``dtype``, ``n_devices`` or ``n_ctx`` is out of range.
    """
    dtype = _check_dtype(dtype)
    check_device(device)
    n_devices = check_int(n_devices, "n_devices", minimum=1)
    if n_ctx is not None:
        n_ctx = check_int(n_ctx, "n_ctx", minimum=1)
    process_weights = check_bool(process_weights, "process_weights")

    if tokenizer is not None:  # the model gets its own: set_tokenizer changes padding_side
        tokenizer = copy.deepcopy(tokenizer)
    hf_model, tok, name, hub = _resolve_source(path_or_model, dtype, tokenizer)
    architecture = architecture_name(_config_with_class(hf_model))
    spec = ARCHITECTURES[architecture]
    fields = spec.config(hf_model.config)
    max_ctx = fields["n_ctx"]
    if n_ctx is not None and fields["positional_embedding_type"] == "standard" and n_ctx > max_ctx:
        raise ConfigError(f"n_ctx={n_ctx} exceeds the {max_ctx} learned positions of {name!r}")
    fields["n_ctx"] = n_ctx if n_ctx is not None else min(max_ctx, DEFAULT_MAX_CTX)
    cfg = _converted_config(
        fields,
        tok,
        model_name=name,
        original_architecture=architecture,
        dtype=dtype,
        device=str(device) if device is not None else None,
        n_devices=n_devices,
    )
    if tok is not None:
        tok = _with_bos(tok, architecture, hub=hub)

    with torch.no_grad():
        state = spec.weights(hf_model, cfg)
        state = {k: v.detach().to(dtype) for k, v in state.items()}
        # GPT-2's unembedding has no bias; TransformerLens's Unembed always has one
        state.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=dtype))
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right" if tok else None)
    params = {n for n, _ in model.named_parameters()}
    if process_weights:
        model.load_and_process_state_dict(
            state,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    else:
        missing, extra = sorted(params - set(state)), sorted(set(state) - params)
        if missing or extra:
            raise UnsupportedArchitectureError(
                f"converting {architecture} gave a state dict that does not fit the model: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        model.load_state_dict(state, strict=False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------

COMPATIBILITY_FIELDS: tuple[str, ...] = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "d_vocab_out",
    "n_key_value_heads",
    "n_ctx",
    "act_fn",
    "normalization_type",
    "final_rms",
    "positional_embedding_type",
    "rotary_dim",
    "rotary_adjacent_pairs",
    "gated_mlp",
    "attn_only",
    "parallel_attn_mlp",
    "use_local_attn",
    "window_size",
    "attn_types",
    "use_normalization_before_and_after",
    "use_qk_norm",
    "num_experts",
    "default_prepend_bos",
)
"""The ``HookedTransformerConfig`` fields two models must share for patching or restoration
between them to mean anything (same shapes, same hook semantics, same token positions)."""


def check_compatible(a: HookedTransformer, b: HookedTransformer) -> None:
    """Checks that activations and weights of one model can be put into the other.

    Patching and restoration swap tensors between two models position by position and
    parameter by parameter; that only means something when both have the same architecture and
    read the same tokens. The fields compared are :data:`COMPATIBILITY_FIELDS`, in that order,
    then the tokenizers (both or neither present, same vocabulary, same BOS token). dtype and
    device may differ.

    Args:
        a: One model (in a study, the source / base model).
        b: The other (the target / unlearned model).

    Raises:
        IncompatibleModelsError: Names the first field that differs with both values, e.g.
            ``"models differ in d_mlp: 3072 vs 4096"``, or the tokenizer difference (one model
            lacks a tokenizer, or a token whose id differs).
        TypeError: Either argument is not a ``HookedTransformer``.
    """
    for label, model in (("first", a), ("second", b)):
        if not isinstance(model, HookedTransformer):
            raise TypeError(
                f"check_compatible expects HookedTransformer models; the {label} is a "
                f"{type(model).__name__}"
            )
    for field in COMPATIBILITY_FIELDS:
        va, vb = getattr(a.cfg, field, None), getattr(b.cfg, field, None)
        if va != vb:
            raise IncompatibleModelsError(f"models differ in {field}: {va!r} vs {vb!r}")
    _check_tokenizers(a.tokenizer, b.tokenizer)


def check_distinct(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    *,
    what: str = "unlearned model",
    base_what: str = "base model",
    why: str = "there is nothing to compare",
) -> None:
    """Checks that two models differ, before a comparison that needs them to.

    The study's scores compare the unlearned model with the base model: KRS divides by their
    difference and ``recovery`` by the difference of their scores, so with the same model twice
    every score is undefined, which would otherwise surface only after all the forward passes.
    The check is one pass over the parameters that stops at the first that differs (for an
    unlearned model, usually the first one or two).

    Raises:
        IncompatibleModelsError: ``unlearned`` is ``base`` itself or has exactly its weights.
    """
    if base is unlearned:
        raise IncompatibleModelsError(f"the {what} is the {base_what} itself: {why}")
    pa, pb = dict(base.named_parameters()), dict(unlearned.named_parameters())
    if pa.keys() != pb.keys():
        return
    with torch.no_grad():
        for name, a in pa.items():
            b = pb[name]
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b.to(a.device)):
                return
    raise IncompatibleModelsError(
        f"the {what} has exactly the {base_what}'s weights: {why} (was it saved before "
        "training, or loaded from the base model's folder?)"
    )


def _check_tokenizers(ta: Any, tb: Any) -> None:
    if (ta is None) != (tb is None):
        which = "first" if ta is None else "second"
        raise IncompatibleModelsError(
            f"models differ in tokenizer: the {which} model has none and the other has one"
        )
    if ta is None or ta is tb:
        return
    va, vb = ta.get_vocab(), tb.get_vocab()
    if va != vb:
        if len(va) != len(vb):
            detail = f"{len(va)} vs {len(vb)} tokens"
        else:
            detail = ""
        for token in sorted(
            set(va) | set(vb), key=lambda t: (min(va.get(t, 1 << 62), vb.get(t, 1 << 62)), t)
        ):
            if va.get(token) != vb.get(token):
                token_info = f"token {token!r} has id {va.get(token)} vs {vb.get(token)}"
                detail = f"{detail}; {token_info}" if detail else token_info
                break
        raise IncompatibleModelsError(f"models differ in tokenizer vocabulary: {detail}")
    if ta.bos_token != tb.bos_token:
        raise IncompatibleModelsError(
            f"models differ in tokenizer bos_token: {ta.bos_token!r} vs {tb.bos_token!r}"
        )
