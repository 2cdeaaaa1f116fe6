"""Run a model block by block on another device, with one block's weights there at a time.

A study holds two models of one architecture; two bf16 7B models do not fit a 24 GB GPU
together. With the source (base) model on the CPU and the target (unlearned) model on the GPU,
the engine still runs the source's clean passes on the GPU: the token embedding is looked up
where the source lives, and each block then runs on the target's device with its parameters and
buffers copied there for the length of its pass. The final norm follows the same way, and the
unembedding streams ``W_U`` a slice of the vocabulary at a time, so the target's device never
holds more of the source than its largest block. Restoration needs none of this: it copies only
the restored tensors (see :class:`unlearnlens.restoration.Restoration`).

The source model is never written: for the length of a block's pass each of its submodules
reads its parameters and buffers from a new dict of copies, and the original dicts (the same
objects, with the same ``nn.Parameter`` objects in them) are put back on exit, also after an
exception or a KeyboardInterrupt. The hooks on its hook points run as in a normal forward pass.

The path is taken whenever some of the source's tensors live elsewhere than the target's
device; :func:`forced` takes it on one device too (the copies are then made on that device),
so that it can be checked and measured on a machine with a single device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from unlearnlens.errors import ConfigError

__all__ = [
    "check_device",
    "device_of",
    "devices_of",
    "final_norm",
    "forced",
    "is_forced",
    "logits",
    "moved",
    "offload_device",
    "pair_offload",
    "run_blocks",
]

_FORCED: ContextVar[bool] = ContextVar("unlearnlens_offload_forced", default=False)


@contextmanager
def forced() -> Iterator[None]:
    """Takes the block-by-block path even where the model already lives on the run's device.

    Every block's weights are then copied for the length of its pass, as they are between two
    devices, so the path can be tested, and its memory counted, on a single device.
    """
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)


def is_forced() -> bool:
    """Whether the caller is inside :func:`forced`."""
    return _FORCED.get()


def device_of(model: HookedTransformer) -> torch.device:
    """The device a model's forward pass starts on (where its token embedding lives)."""
    return model.embed.W_E.device


def check_device(device: object, name: str = "device") -> torch.device | None:
    """``device`` as a :class:`torch.device` (None stays None).

    Raises:
        ConfigError: Not a device, or a string torch does not read as one.
    """
    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ConfigError(f"{name} must be a torch.device, a string or None, got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"{name}={device!r} is not a device: {e}") from e


def devices_of(model: nn.Module) -> set[torch.device]:
    """Every device one of the model's parameters or buffers lives on."""
    return {t.device for t in itertools.chain(model.parameters(), model.buffers())}


def offload_device(
    model: HookedTransformer, device: torch.device, allowed: set[torch.device] | None = None
) -> torch.device | None:
    """Where to run ``model`` block by block, or None to run it where it is.

    ``device`` when some parameter or buffer of the model lives outside ``allowed`` (by
    default ``{device}``; for a pair, the devices the target itself spans, so that two models
    split alike over several GPUs still run where they are), or inside :func:`forced`.
    """
    if _FORCED.get():
        return device
    allowed = {device} if allowed is None else allowed
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device not in allowed:
            return device
    return None


def pair_offload(source: HookedTransformer, target: HookedTransformer) -> torch.device | None:
    """Where to run the source of a pair block by block (the target's device), or None."""
    return offload_device(source, device_of(target), devices_of(target))


def _put_back(originals: list[tuple[nn.Module, dict, dict]]) -> None:
    """Gives each module its own parameter and buffer dicts again; an interrupt is held back."""
    error: BaseException | None = None
    for module, params, buffers in originals:
        while True:
            try:
                module.__dict__["_parameters"] = params
                module.__dict__["_buffers"] = buffers
                break
            except KeyboardInterrupt as exc:  # put this one back, then the rest, then raise
                error = error or exc
    if error is not None:
        raise error


@contextmanager
def moved(device: torch.device | None, *modules: nn.Module) -> Iterator[None]:
    """The modules' parameters and buffers copied to ``device`` for the length of a block.

    Each submodule reads its tensors from new dicts of detached copies (tied tensors stay tied,
    dtypes are kept); on exit the original dicts are put back, so the modules come back as
    they came: the same parameter objects, values, devices and ``requires_grad``. Meant for
    no-grad passes. ``device=None`` changes nothing.
    """
    if device is None:
        yield
        return
    copies: dict[int, Tensor] = {}

    def copy(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if id(t) not in copies:
            copies[id(t)] = t.detach().to(device, copy=True)
        return copies[id(t)]

    subs = list(dict.fromkeys(m for module in modules for m in module.modules()))
    originals = [(m, m.__dict__["_parameters"], m.__dict__["_buffers"]) for m in subs]
    swapped = [
        (
            {k: copy(v) for k, v in params.items()},
            {k: copy(v) for k, v in buffers.items()},
        )
        for _, params, buffers in originals
    ]
    try:
        for (m, _, _), (params, buffers) in zip(originals, swapped):
            m.__dict__["_parameters"] = params
            m.__dict__["_buffers"] = buffers
        yield
    finally:
        _put_back(originals)


def final_norm(model: HookedTransformer) -> list[nn.Module]:
    """The model's final norm as a list (empty for a model without one), for :func:`moved`."""
    if model.cfg.normalization_type is None or not hasattr(model, "ln_final"):
        return []
    return [model.ln_final]


def _block_bytes(model: HookedTransformer) -> int:
    block = model.blocks[0]
    tensors = itertools.chain(block.parameters(), block.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def logits(
    model: HookedTransformer,
    x: Float[Tensor, "batch pos d_model"],
    device: torch.device,
) -> Float[Tensor, "batch pos d_vocab"]:
    """``model.unembed(x)`` on ``device``, with ``W_U`` copied there a slice at a time.

    Each slice of the vocabulary holds no more bytes than one block of the model, so the
    unembedding adds no more to the device's peak than a block's pass does. The unembedding's
    hook points see the whole input and output, as in a normal pass.

    Args:
        model: The model whose unembedding to apply.
        x: The final norm's output, on ``device``.
        device: Where to compute.
    """
    u = model.unembed
    x = u.hook_in(x.to(device))
    w_u, b_u = u.W_U, u.b_U
    d_model, d_vocab = w_u.shape
    width = max(1, min(d_vocab, _block_bytes(model) // max(1, d_model * w_u.element_size())))
    parts = []
    for lo in range(0, d_vocab, width):
        w = w_u[:, lo : lo + width].to(device, copy=True)
        b = b_u[lo : lo + width].to(device, copy=True)
        parts.append(torch.nn.functional.linear(x, w.T, b))
        del w, b
    return u.hook_out(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])


def run_blocks(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    *,
    device: torch.device,
    stop_at_layer: int,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream before block ``stop_at_layer``, computed block by block on ``device``.

    The same numbers as ``model(tokens, attention_mask=attention_mask,
    stop_at_layer=stop_at_layer)``: the embedding is looked up where the model lives, then
    each block runs on ``device`` with its weights copied there for its pass (see
    :func:`moved`). Runs under the caller's grad mode and hooks; the caller guards the model.
    """
    home = device_of(model)
    resid, _, shortformer, mask = model.input_to_embed(
        tokens.to(home), attention_mask=attention_mask.to(home)
    )
    resid = resid.to(device)
    for i in range(stop_at_layer):
        with moved(device, model.blocks[i]):
            resid = model.blocks[i](
                resid.to(device),
                past_kv_cache_entry=None,
                shortformer_pos_embed=None if shortformer is None else shortformer.to(device),
                attention_mask=None if mask is None else mask.to(device),
            )
    return resid
