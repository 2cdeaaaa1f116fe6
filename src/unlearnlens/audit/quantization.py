"""Round-to-nearest fake quantization of a model's weight matrices, on a copy.

Zhang et al. ("Catastrophic failure of LLM unlearning via quantization", ICLR 2025) show that
quantizing an unlearned model to 4 bits can bring most of the forgotten knowledge back:
utility-constrained unlearning moves the weights by less than one quantization step, so
rounding maps the unlearned weights back onto the base model's grid points.

Each weight matrix is viewed as ``[in, out]`` (TransformerLens stores ``W_Q`` as
``[head, d_model, d_head]``: input ``d_model``, output channels ``head x d_head``; ``W_O`` as
``[head, d_head, d_model]``: input ``head x d_head``; ``W_in``/``W_gate``/``W_out``/``W_U`` are
``[in, out]`` already). Every output channel, or every group of ``group_size`` consecutive
inputs of an output channel, gets its own grid of ``2**bits`` levels:

* asymmetric (min-max, the RTN baseline of GPTQ and AWQ, the default):
  ``s = (max - min) / (2**bits - 1)``, ``z = round(-min / s)``,
  ``Q(w) = (clamp(round(w / s) + z, 0, 2**bits - 1) - z) * s``;
* symmetric: ``s = max|w| / (2**(bits-1) - 1)``, ``Q(w) = clamp(round(w / s), -q-1, q) * s``.

Either way ``|Q(w) - w| <= s / 2``. Weights are dequantized back to the model's dtype
("fake" quantization): the model runs as before, on rounded weights. Biases, norms and
embeddings are left alone. :func:`fake_quantize` works on a copy, so the caller's model is
never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from unlearnlens._checks import check_bool, check_int
from unlearnlens.components import select_parameters
from unlearnlens.errors import ComponentError, ConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "QUANTIZABLE",
    "fake_quantize",
    "quantization_step",
    "quantize_matrix",
    "quantized_parameters",
]

QUANTIZABLE = ("W_Q", "W_K", "W_V", "_W_K", "_W_V", "W_O", "W_in", "W_gate", "W_out", "W_U")
"""The weight matrices fake quantization rounds (last part of the parameter name)."""

_HEAD_IN = ("W_Q", "W_K", "W_V", "_W_K", "_W_V")  # [head, in, d_head]


def _check(bits: int, group_size: int | None, symmetric: bool) -> tuple[int, int | None, bool]:
    bits = check_int(bits, "bits", minimum=2)
    if bits > 16:
        raise ConfigError(f"bits must be at most 16, got {bits}")
    if group_size is not None:
        group_size = check_int(group_size, "group_size", minimum=1)
    return bits, group_size, check_bool(symmetric, "symmetric")


def _grid(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of ``w`` (``[rows, n]``): scale, zero point and the integer range."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        scale = w.abs().amax(-1, keepdim=True) / q
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros_like(scale)
        lo, hi = torch.full_like(scale, -q - 1), torch.full_like(scale, q)
    else:
        levels = 2**bits - 1
        lo_w, hi_w = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (hi_w - lo_w) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo_w / scale)
        lo, hi = torch.zeros_like(scale), torch.full_like(scale, levels)
    return scale, zero, lo, hi


def _rows(w_io: Tensor, group_size: int | None) -> tuple[Tensor, int]:
    """``[in, out]`` -> ``[out * groups, group]`` rows (inputs padded by repeating the last)."""
    n_in, n_out = w_io.shape
    g = n_in if group_size is None else min(group_size, n_in)
    groups = -(-n_in // g)
    pad = groups * g - n_in
    w_oi = w_io.T
    if pad:
        w_oi = torch.cat([w_oi, w_oi[:, -1:].expand(n_out, pad)], dim=1)
    return w_oi.reshape(n_out * groups, g), pad


def quantize_matrix(
    w_io: Float[Tensor, "d_in d_out"],
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
) -> Float[Tensor, "d_in d_out"]:
    """Round-to-nearest fake quantization of an ``[in, out]`` matrix (computed in float32).

    Args:
        w_io: The matrix, inputs along dim 0 and output channels along dim 1.
        bits: Bits per weight (``2 ** bits`` levels per grid).
        group_size: Inputs per grid along each output channel; ``None`` for one grid per
            output channel (per-channel). The last group of a channel may be shorter.
        symmetric: A grid symmetric around 0 instead of the min-max grid.

    Returns:
        The dequantized matrix, in ``w_io``'s dtype.
    """
    bits, group_size, symmetric = _check(bits, group_size, symmetric)
    n_in, n_out = w_io.shape
    rows, _ = _rows(w_io.detach().float(), group_size)
    scale, zero, lo, hi = _grid(rows, bits, symmetric)
    q = torch.clamp(torch.round(rows / scale) + zero, lo, hi)
    deq = ((q - zero) * scale).reshape(n_out, -1)[:, :n_in]
    return deq.T.to(w_io.dtype)


def quantization_step(
    w_io: Float[Tensor, "d_in d_out"],
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
) -> Float[Tensor, "d_in d_out"]:
    """The grid step ``s`` that applies to each weight of an ``[in, out]`` matrix."""
    bits, group_size, symmetric = _check(bits, group_size, symmetric)
    n_in, n_out = w_io.shape
    rows, _ = _rows(w_io.detach().float(), group_size)
    scale = _grid(rows, bits, symmetric)[0].expand_as(rows)
    return scale.reshape(n_out, -1)[:, :n_in].T


def _as_io(name: str, p: Tensor) -> Tensor:
    kind = name.rsplit(".", 1)[-1]
    if kind in _HEAD_IN:
        h, d_in, dh = p.shape
        return p.permute(1, 0, 2).reshape(d_in, h * dh)
    if kind == "W_O":
        h, dh, d_out = p.shape
        return p.reshape(h * dh, d_out)
    return p


def _from_io(name: str, w_io: Tensor, like: Tensor) -> Tensor:
    kind = name.rsplit(".", 1)[-1]
    if kind in _HEAD_IN:
        h, d_in, dh = like.shape
        return w_io.reshape(d_in, h, dh).permute(1, 0, 2)
    return w_io.reshape(like.shape)


def quantized_parameters(
    model: HookedTransformer,
    components: str | Iterable[str] = "block",
    layers: int | Iterable[int] | None = None,
) -> list[str]:
    """Full names of the weight matrices that fake quantization rounds in ``model``.

    Raises:
        ComponentError: The selection holds no quantizable matrix.
    """
    chosen = select_parameters(model, layers, components)
    names = [n for n in chosen if n.rsplit(".", 1)[-1] in QUANTIZABLE]
    if not names:
        raise ComponentError(
            f"components {components!r} select no weight matrix to quantize; quantizable "
            f"matrices: {', '.join(QUANTIZABLE)}"
        )
    return names


def fake_quantize(
    model: HookedTransformer,
    bits: int = 4,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    components: str | Iterable[str] = "block",
    layers: int | Iterable[int] | None = None,
) -> HookedTransformer:
    """A copy of ``model`` whose weight matrices are rounded to a ``bits``-bit grid.

    Args:
        model: The model; it is not changed.
        bits: Bits per weight: 8 and 4 are the usual attacks.
        group_size: Inputs per grid (per-group quantization, e.g. 128); ``None`` for
            per-channel grids.
        symmetric: Use a grid symmetric around 0 instead of the min-max grid.
        components: Which parameters (block-relative names or groups, as
            :func:`unlearnlens.select_parameters` takes them); only the weight matrices of
            :data:`QUANTIZABLE` among them are rounded. ``"unembed"`` adds ``W_U``.
        layers: Blocks to quantize; ``None`` for all.

    Returns:
        The quantized copy (same device, dtype and train/eval modes).

    Raises:
        ConfigError: Bad ``bits`` or ``group_size``.
        ComponentError: A selection without weight matrices.
    """
    _check(bits, group_size, symmetric)
    names = quantized_parameters(model, components, layers)
    memo = {id(model.tokenizer): model.tokenizer} if model.tokenizer is not None else {}
    out = copy.deepcopy(model, memo)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name in names:
            p = params[name]
            w_io = _as_io(name, p)
            q = quantize_matrix(w_io, bits, group_size=group_size, symmetric=symmetric)
            p.copy_(_from_io(name, q, p))
    return out
