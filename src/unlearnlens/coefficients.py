"""MLP coefficients: read them at chosen positions, and reduce them over many prompts.

In a transformer MLP, ``out = sum_n c_n * W_out[n] (+ b_out)``: neuron ``n`` writes its value
vector ``W_out[n]`` (a row of ``blocks[l].mlp.W_out``, shape ``[d_mlp, d_model]``) into the
residual stream, weighted by its *coefficient* ``c_n``. TransformerLens exposes the
coefficients at ``blocks.{l}.mlp.hook_post`` (for gated MLPs ``act(gate(x)) * up(x)``, exactly
the input of LLaMA's ``down_proj``).

The reference study finds that fine-tuning unlearning changes the coefficients of the last
layers far more than the value vectors.
:func:`unlearnlens.comparison.compare_coefficients` makes that
checkable neuron by neuron.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from unlearnlens import _offload
from unlearnlens._checks import check_batch_size, check_has_mlp, check_layers
from unlearnlens._finite import check_finite
from unlearnlens._guard import preserved
from unlearnlens._progress import bar
from unlearnlens.errors import PromptError
from unlearnlens.prompts import Prompts, PromptSet, as_promptset

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "CoefficientPositions",
    "CoefficientStats",
    "PositionSelection",
    "coefficient_positions",
    "mlp_coefficient_stats",
    "mlp_coefficients",
]

CoefficientPositions = Literal["answer", "prompt", "all", "last"]
_KINDS = ("answer", "prompt", "all", "last")


# ------------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class PositionSelection:
    """Which positions of each sequence a coefficient read-out holds.

    Attributes:
        positions: Absolute position of each slot of the ``pos`` axis (0 in unused slots).
        mask: True where the slot holds a real selected position, False for padding.
        kind: The selection: ``"answer"``, ``"prompt"``, ``"all"`` or ``"last"``.
    """

    positions: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    kind: str

    def __getitem__(self, rows: slice) -> PositionSelection:
        return PositionSelection(self.positions[rows], self.mask[rows], self.kind)


def _select(prompts: PromptSet, kind: str) -> PositionSelection:
    if kind not in _KINDS:
        raise PromptError(
            f"positions must be one of {', '.join(repr(k) for k in _KINDS)}; got {kind!r}"
        )
    if kind == "answer":
        mask = prompts.answer_mask
        pos = torch.where(mask, prompts.target_positions, 0)
    elif kind == "last":
        pos = (prompts.prompt_lengths - 1)[:, None]
        mask = torch.ones_like(pos, dtype=torch.bool)
    else:
        width = int(prompts.prompt_lengths.max()) if kind == "prompt" else prompts.seq_len
        limit = prompts.prompt_lengths if kind == "prompt" else prompts.seq_lengths
        j = torch.arange(width, device=prompts.device)[None, :].expand(len(prompts), -1)
        mask = j < limit[:, None]
        pos = torch.where(mask, j, 0)
    return PositionSelection(pos.contiguous(), mask.contiguous(), kind)


def coefficient_positions(
    model: HookedTransformer, prompts: Prompts, positions: CoefficientPositions | str = "answer"
) -> PositionSelection:
    """The positions (and their mask) that :func:`mlp_coefficients` reads.

    ``mlp_coefficients`` returns a plain tensor whose padded slots are zero; this gives the
    matching ``[batch, pos]`` mask and absolute positions without running the model.

    Args:
        model: The model the prompts are for (used to tokenize string pairs).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        positions: ``"answer"`` (default): the *target positions* ``n-1 .. n+m-2`` of a prompt
            of ``n`` tokens with an answer of ``m`` tokens, the positions whose outputs predict
            the answer tokens (the ``pos`` axis is the answer axis). Note that this is one
            position earlier than the answer tokens themselves, which is what ``patch(...,
            positions="answer")`` patches: here the coefficients that *produce* the answer
            are read. ``"prompt"``: the prompt tokens ``0 .. n-1``. ``"all"``: every real
            token ``0 .. n+m-1``. ``"last"``: the prompt's last token ``n-1`` (one slot).

    Raises:
        PromptError: Bad prompts, or ``positions`` not among the values above.
    """
    if positions not in _KINDS:
        raise PromptError(
            f"positions must be one of {', '.join(repr(k) for k in _KINDS)}; got {positions!r}"
        )
    return _select(as_promptset(model, prompts), positions)


# ------------------------------------------------------------------------------- capture


def _take(act: Tensor, positions: Tensor) -> Tensor:
    """``act[b, positions[b, p], ...]`` for a ``[batch, seq, ...]`` activation."""
    idx = positions.to(act.device)
    idx = idx.reshape(*idx.shape, *([1] * (act.ndim - 2))).expand(-1, -1, *act.shape[2:])
    return act.gather(1, idx)


def capture(
    model: HookedTransformer,
    chunk: PromptSet,
    names: Sequence[str],
    positions: Tensor,
    *,
    stop_at_layer: int,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """One forward pass; the named activations at ``positions`` (``[batch, pos]``) only.

    Each hook gathers its positions as the pass goes, so no full ``[batch, seq, ...]``
    activation is kept. With ``device``, the blocks run there one at a time, with their weights
    copied for the pass (:func:`unlearnlens._offload.run_blocks`). Runs under the caller's grad
    mode; the caller guards the model.
    """
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: object) -> None:
        store[hook.name] = _take(act, positions)  # type: ignore[attr-defined]

    n = int(positions.max()) + 1
    tokens, mask = chunk.tokens[:, :n], chunk.attention_mask[:, :n]
    with model.hooks(fwd_hooks=[(name, keep) for name in names]):
        if device is None:
            dev = model.cfg.device
            model(tokens.to(dev), attention_mask=mask.to(dev), stop_at_layer=stop_at_layer)
        else:
            _offload.run_blocks(model, tokens, mask, device=device, stop_at_layer=stop_at_layer)
    return store


def prompt_batches(
    prompts: PromptSet, batch_size: int | None, progress: bool | None, desc: str
) -> Iterator[tuple[slice, PromptSet]]:
    batch_size = check_batch_size(batch_size)
    size = len(prompts) if batch_size is None else batch_size
    chunks = list(prompts.batches(size))
    yield from bar(chunks, progress=False if len(chunks) < 2 else progress, desc=desc)


def hook_post_name(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def _check_positions(positions: object) -> None:
    if positions not in _KINDS:
        raise PromptError(
            f"positions must be one of {', '.join(repr(k) for k in _KINDS)}; got {positions!r}"
        )


def _prepare(
    model: HookedTransformer, prompts: Prompts, layers: int | Sequence[int] | None, positions: str
) -> tuple[list[int], PromptSet, PositionSelection, list[str]]:
    """Checks the arguments; returns layers, prompts, positions and hook names to read."""
    _check_positions(positions)
    check_has_mlp(model, "reading MLP coefficients")
    layer_list = check_layers(model, layers)
    ps = as_promptset(model, prompts)
    check_finite(model)
    return layer_list, ps, _select(ps, positions), [hook_post_name(layer) for layer in layer_list]


def _run_device(model: HookedTransformer, device: object) -> torch.device | None:
    """Where to run ``model`` block by block for a read-out on ``device`` (None: as it is)."""
    wanted = _offload.check_device(device)
    if wanted is None:
        return _offload.device_of(model) if _offload.is_forced() else None
    return _offload.offload_device(model, wanted)


def _read_batches(
    model: HookedTransformer,
    ps: PromptSet,
    sel: PositionSelection,
    names: list[str],
    stop: int,
    batch_size: int | None,
    progress: bool | None,
    run_on: torch.device | None,
    desc: str,
) -> Iterator[tuple[dict[str, Tensor], Bool[Tensor, "batch pos"]]]:
    """Per batch, the hooks ``names`` at the selected positions and the mask of real slots.

    Each forward pass stops at layer ``stop`` (one past the last hooked layer), so no
    unembedding is computed.
    """
    for rows, chunk in prompt_batches(ps, batch_size, progress, desc):
        part = sel[rows]
        acts = capture(model, chunk, names, part.positions, stop_at_layer=stop, device=run_on)
        yield acts, part.mask


# ------------------------------------------------------------------------------- read-out


def mlp_coefficients(
    model: HookedTransformer,
    prompts: Prompts,
    *,
    layers: int | Sequence[int] | None = None,
    positions: CoefficientPositions | str = "answer",
    batch_size: int | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> Float[Tensor, "layer batch pos d_mlp"]:
    """The MLP coefficients (``blocks.{l}.mlp.hook_post``) at the chosen positions.

    One forward pass per batch, stopped after the last requested layer (no unembedding), with
    hooks that keep only the selected positions.

    Args:
        model: The model to read.
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        layers: Layers to read (negative counts from the end); all by default. The ``layer``
            axis follows this order.
        positions: ``"answer"`` (target positions, the default), ``"prompt"``, ``"all"`` or
            ``"last"``; see :func:`coefficient_positions`, which also returns the
            ``[batch, pos]`` mask of real slots.
        batch_size: Prompts per forward pass; all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).
        device: Where to run the model; its own device by default. A model that lives
            elsewhere (a base model kept on the CPU) runs there block by block, one block's
            weights copied at a time, and gives the same numbers.

    Returns:
        ``[layer, batch, pos, d_mlp]`` coefficients in the model's dtype, on its device (on
        ``device`` when given); slots beyond a sequence's selected positions are zero. For a
        reduction over many prompts that does not hold them all, use
        :func:`mlp_coefficient_stats`.

    Raises:
        LayerError: A layer out of range.
        PromptError: Bad prompts or a bad ``positions`` value.
        ConfigError: ``device`` is not a device.
    """
    layer_list, ps, sel, names = _prepare(model, prompts, layers, positions)
    run_on = _run_device(model, device)
    out: list[Tensor] = []
    stop = max(layer_list) + 1
    desc = "mlp coefficients"
    batches = _read_batches(model, ps, sel, names, stop, batch_size, progress, run_on, desc)
    with preserved(model):
        for acts, mask in batches:
            coef = torch.stack([acts[name] for name in names])
            out.append(coef * mask.to(coef.device)[None, :, :, None])
    return torch.cat(out, dim=1)


@dataclass(frozen=True)
class CoefficientStats:
    """Per-neuron moments of the MLP coefficients over all selected positions of all prompts.

    Attributes:
        layers: The layers, in the order of the ``layer`` axis.
        positions: The position selection the moments are over.
        count: Number of positions reduced over (the same for every layer and neuron).
        mean: Mean coefficient.
        mean_abs: Mean absolute coefficient.
        mean_sq: Mean squared coefficient (second moment).
    """

    layers: tuple[int, ...]
    positions: str
    count: int
    mean: Float[Tensor, "layer d_mlp"]
    mean_abs: Float[Tensor, "layer d_mlp"]
    mean_sq: Float[Tensor, "layer d_mlp"]

    @property
    def var(self) -> Float[Tensor, "layer d_mlp"]:
        """Population variance ``E[c^2] - E[c]^2`` (clamped at 0 against rounding)."""
        return (self.mean_sq - self.mean.square()).clamp(min=0.0)

    @property
    def std(self) -> Float[Tensor, "layer d_mlp"]:
        """Population standard deviation."""
        return self.var.sqrt()


def mlp_coefficient_stats(
    model: HookedTransformer,
    prompts: Prompts,
    *,
    layers: int | Sequence[int] | None = None,
    positions: CoefficientPositions | str = "answer",
    batch_size: int | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> CoefficientStats:
    """Streaming moments of the MLP coefficients, without holding them all.

    Same read-out as :func:`mlp_coefficients`, reduced batch by batch into float64 running
    sums over every real selected position, so memory stays at one batch of activations plus
    ``4 x layer x d_mlp`` numbers: fit for 7B models (32 x 11008) and thousands of prompts.

    Args:
        model: The model to read.
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        layers: Layers to read; all by default.
        positions: ``"answer"`` (target positions, the default), ``"prompt"``, ``"all"`` or
            ``"last"`` (see :func:`coefficient_positions`).
        batch_size: Prompts per forward pass; all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).
        device: Where to run the model, as in :func:`mlp_coefficients`.

    Returns:
        A :class:`CoefficientStats` of float32 ``[layer, d_mlp]`` moments on the CPU.

    Raises:
        LayerError: A layer out of range.
        PromptError: Bad prompts or a bad ``positions`` value.
        ConfigError: ``device`` is not a device.
    """
    layer_list, ps, sel, names = _prepare(model, prompts, layers, positions)
    run_on = _run_device(model, device)
    shape = (len(layer_list), model.cfg.d_mlp)
    dev = model.cfg.device if run_on is None else run_on
    s1, s_abs, s2 = (torch.zeros(shape, dtype=torch.float64, device=dev) for _ in range(3))
    count = 0
    stop = max(layer_list) + 1
    desc = "mlp coefficient stats"
    batches = _read_batches(model, ps, sel, names, stop, batch_size, progress, run_on, desc)
    with preserved(model):
        for acts, real in batches:
            mask = real.to(dev)
            for i, name in enumerate(names):
                c = acts[name].to(dev)[mask].double()  # [n_real, d_mlp]
                s1[i] += c.sum(0)
                s_abs[i] += c.abs().sum(0)
                s2[i] += c.square().sum(0)
            count += int(mask.sum())
    return CoefficientStats(
        layers=tuple(layer_list),
        positions=positions,
        count=count,
        mean=(s1 / count).float().cpu(),
        mean_abs=(s_abs / count).float().cpu(),
        mean_sq=(s2 / count).float().cpu(),
    )
