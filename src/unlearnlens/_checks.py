"""Argument checks shared by the public functions: numbers, layers, windows, hook names.

Arguments are checked, never coerced: an integer argument takes Python or numpy integers (not
``bool``), a real one finite numbers, and anything else is refused with a message that names
the argument and the value given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from unlearnlens.errors import ComponentError, ConfigError, HookError, LayerError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "BLOCK_HOOKS",
    "check_batch_size",
    "check_bool",
    "check_device",
    "check_fields",
    "check_float",
    "check_has_mlp",
    "check_int",
    "check_layers",
    "check_model",
    "check_window",
    "is_integer",
    "resolve_hooks",
    "window_layers",
]

BLOCK_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "attn.hook_z",
    "attn.hook_result",
    "ln1.hook_normalized",
    "ln2.hook_normalized",
)
"""Block-relative hook names that patching accepts, when the model has them."""

_ALIASES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_post": "mlp.hook_post",
    "post": "mlp.hook_post",
    "z": "attn.hook_z",
}


def is_integer(value: object) -> bool:
    """Python, numpy or 0-d numpy/torch integers; never ``bool`` (nor a numpy or torch bool)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == 0
        and not value.dtype.is_floating_point
        and not value.dtype.is_complex
        and value.dtype != torch.bool
    )


def check_layers(model: HookedTransformer, layers: object, *, what: str = "layer") -> list[int]:
    """Validates layer indices (negative ones count from the end); ``None`` means all layers.

    A layer is a Python, numpy or 0-d torch integer; ``layers`` is one such integer or a
    sequence (list, tuple, range, integer array) of them. Nothing is converted: ``1.7``,
    ``"13"`` and ``True`` are refused rather than read as layers 1, 1 and 3, and 1.

    Raises:
        LayerError: A layer out of range, a non-integer layer, or an empty list.
    """
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    if is_integer(layers):
        items: list[object] = [layers]
    elif isinstance(layers, (str, bytes, Mapping, set, frozenset)) or not isinstance(
        layers, Iterable
    ):
        raise LayerError(
            f"{what}s must be an integer or a sequence of integers, got {layers!r} "
            f"({type(layers).__name__})"
        )
    else:
        try:
            items = list(layers)
        except TypeError:  # a 0-d array
            raise LayerError(
                f"{what}s must be an integer or a sequence of integers, got {layers!r}"
            ) from None
    out: list[int] = []
    for layer in items:
        if not is_integer(layer):
            raise LayerError(f"{what} {layer!r} is not an integer ({type(layer).__name__})")
        index = int(layer)  # type: ignore[call-overload]
        if not -n <= index < n:
            raise LayerError(
                f"{what} {index} is out of range for a model with {n} layers (valid: 0..{n - 1})"
            )
        out.append(index % n)
    if not out:
        raise LayerError(f"no {what}s given")
    return out


def check_window(window: object) -> int:
    """A window must be a positive odd number of layers (a Python or numpy integer)."""
    if not is_integer(window) or int(window) < 1 or int(window) % 2 == 0:  # type: ignore[call-overload]
        raise LayerError(
            f"window must be a positive odd number of layers (1, 3, 5, ...), got {window!r}"
        )
    return int(window)  # type: ignore[call-overload]


def check_batch_size(batch_size: object, name: str = "batch_size") -> int | None:
    """``None`` (the default size) or a positive integer; ``0``, floats and bools are refused."""
    if batch_size is None:
        return None
    return check_int(batch_size, name, minimum=1)


def window_layers(center: int, window: int, n_layers: int) -> list[int]:
    """Layers ``center-(w-1)/2 .. center+(w-1)/2``, clipped to ``0 .. n_layers-1``."""
    half = (window - 1) // 2
    return list(range(max(0, center - half), min(n_layers, center + half + 1)))


def resolve_hooks(
    model: HookedTransformer, hooks: str | Iterable[str], *, what: str = "this model"
) -> list[str]:
    """Block-relative hook names, checked against the model (short aliases accepted).

    ``"resid_pre"``, ``"hook_resid_pre"`` and ``"blocks.{l}.hook_resid_pre"``-style relative
    names all resolve to ``"hook_resid_pre"``.

    Raises:
        HookError: An unknown hook, or one the model lacks; the message lists the valid ones.
    """
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise HookError("no hooks given")
    available = set(model.hook_dict)
    valid = [
        h for h in BLOCK_HOOKS if f"blocks.0.{h}" in available and _silent(model.cfg, h) is None
    ]
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise HookError(f"hook names must be strings, got {name!r}")
        rel = _ALIASES.get(name, name)
        if f"blocks.0.{rel}" not in available or rel not in BLOCK_HOOKS:
            raise HookError(
                f"unknown hook {name!r} for this model; valid hooks: {', '.join(valid)} "
                f"(aliases: {', '.join(sorted(_ALIASES))})"
            )
        reason = _silent(model.cfg, rel)
        if reason is not None:
            raise HookError(
                f"hook {name!r} exists on {what} but never fires: {reason}; hooks that "
                f"fire: {', '.join(valid)}"
            )
        if rel not in out:
            out.append(rel)
    return out


def _silent(cfg: object, rel: str) -> str | None:
    """Why the block hook ``rel`` never runs under this config, or ``None`` if it runs.

    TransformerLens creates some hook points on every block but calls them only when a config
    switch is on; patching or reading such a hook would silently do nothing.
    """
    if rel == "attn.hook_result" and not getattr(cfg, "use_attn_result", False):
        return (
            "TransformerLens computes per-head results only with cfg.use_attn_result=True "
            "(call model.set_use_attn_result(True) first)"
        )
    if getattr(cfg, "attn_only", False) and (
        rel in ("hook_mlp_out", "ln2.hook_normalized") or rel.startswith("mlp.")
    ):
        return "this model is attention-only (cfg.attn_only=True): its blocks have no MLP"
    if rel == "hook_resid_mid" and (
        getattr(cfg, "attn_only", False) or getattr(cfg, "parallel_attn_mlp", False)
    ):
        return (
            "the blocks of this model have no mid-block residual stream (attention-only or "
            "parallel attention and MLP)"
        )
    return None


def check_int(
    value: object,
    name: str,
    *,
    minimum: int | None = None,
    error: type[Exception] = ConfigError,
) -> int:
    """An integer argument: Python or numpy integers, never ``bool``, floats or strings.

    Args:
        value: The value given.
        name: The argument's name, for the message.
        minimum: The smallest value allowed, if any.
        error: The exception class to raise.

    Returns:
        ``value`` as a Python ``int``.
    """
    if not is_integer(value):
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    out = int(value)  # type: ignore[call-overload]
    if minimum is not None and out < minimum:
        raise error(f"{name} must be >= {minimum}, got {out}")
    return out


def check_float(
    value: object,
    name: str,
    *,
    positive: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    error: type[Exception] = ConfigError,
) -> float:
    """A finite real argument (Python/numpy ints and floats, never ``bool`` or strings).

    Args:
        value: The value given.
        name: The argument's name, for the message.
        positive: Require ``value > 0``.
        minimum: The smallest value allowed (inclusive), if any.
        maximum: The largest value allowed (inclusive), if any.
        error: The exception class to raise.

    Returns:
        ``value`` as a Python ``float``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise error(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise error(f"{name} must be finite, got {out}")
    if positive and out <= 0:
        raise error(f"{name} must be a positive number, got {out}")
    if minimum is not None and out < minimum:
        raise error(f"{name} must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise error(f"{name} must be <= {maximum}, got {out}")
    return out


def check_fields(cls: type, values: Mapping[str, object], *, owner: str) -> None:
    """Checks values for a config dataclass against its field types, before it is built.

    A field annotated ``float`` takes a finite number, ``int`` an integer, ``bool`` a bool
    (each optionally ``| None``); fields of other types are left to the class itself. This
    is what keeps ``beta=float("nan")`` or ``alpha="3"`` out of every method's config,
    including configs of methods users register.

    Raises:
        ConfigError: A value of the wrong type or a non-finite number; names the field.
    """
    import dataclasses
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved: not ours to judge
        return
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name, value in values.items():
        if name not in names or name not in hints:
            continue
        hint = hints[name]
        args = set(typing.get_args(hint))
        optional = type(None) in args
        base = {a for a in args if a is not type(None)} if args else {hint}
        if value is None and optional:
            continue
        label = f"{owner} option {name}"
        if base == {float}:
            check_float(value, label)
        elif base == {int}:
            check_int(value, label)
        elif base == {bool}:
            check_bool(value, label)


def check_has_mlp(model: HookedTransformer, what: str) -> None:
    """Refuses an attention-only model for an analysis of MLP neurons.

    Args:
        model: The model.
        what: The analysis, for the message (``"compare_coefficients"``).

    Raises:
        ComponentError: ``model.cfg.attn_only`` is set: its blocks have no MLP, so no MLP
            coefficients, value vectors or neurons.
    """
    if getattr(model.cfg, "attn_only", False):
        raise ComponentError(
            f"{what} needs MLP neurons, and this model is attention-only (cfg.attn_only=True): "
            "its blocks have no MLP; use the attention or residual analyses instead"
        )


def check_model(model: object, name: str = "model") -> None:
    """The argument is a ``HookedTransformer`` (not ``None``, a path or a Hugging Face model).

    Raises:
        ConfigError: Names the argument and what was given instead.
    """
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        hint = (
            "; convert a Hugging Face model or checkpoint with unlearnlens.load_hf"
            if model is not None
            else ""
        )
        raise ConfigError(
            f"{name} must be a transformer_lens HookedTransformer, got {type(model).__name__}{hint}"
        )


def check_device(device: object, name: str = "device") -> torch.device | None:
    """``None`` or a device that exists here: ``"cuda"`` needs CUDA, ``"cuda:3"`` a fourth GPU.

    Raises:
        ConfigError: Not a device name, or a device this machine lacks; names the argument.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{name} must be a device name such as 'cpu' or 'cuda', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"{name} {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} {str(device)!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{name} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{name} {str(device)!r}: MPS is not available on this machine")
    return dev


def check_bool(value: object, name: str, *, error: type[Exception] = ConfigError) -> bool:
    """A ``bool`` argument (``True``/``False`` or a numpy bool), nothing coerced."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)
