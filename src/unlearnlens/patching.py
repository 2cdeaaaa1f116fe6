"""Activation patching from a source model into a target model, layer by layer.

The reference study patches the *base* model's MLP coefficients and attention outputs into the
*unlearned* model over a sliding window of layers and measures how much of the base model's
output comes back (KRS). :func:`patch` does that for any hook, window, set of positions and
metric; :func:`patch_residual`, :func:`patch_mlp_coefficients` and :func:`patch_attention` are
its named forms. All of them run on :mod:`unlearnlens.runner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from unlearnlens._checks import (
    check_batch_size,
    check_layers,
    check_window,
    resolve_hooks,
    window_layers,
)
from unlearnlens._finite import check_finite
from unlearnlens.errors import HookError, PromptError
from unlearnlens.metrics import MetricLike, resolve_metric
from unlearnlens.prompts import Prompts, PromptSet, as_promptset
from unlearnlens.results import SweepResult
from unlearnlens.runner import Patch, SweepScores, Variant, run_variants

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.metrics import BoundMetric

__all__ = ["patch", "patch_attention", "patch_mlp_coefficients", "patch_residual", "sweep_result"]

Positions = Literal["all", "prompt", "last", "answer", "each"]
_POSITIONS = ("all", "prompt", "last", "answer", "each")


def prepare(
    source: HookedTransformer,
    target: HookedTransformer,
    prompts: Prompts,
    metric: BoundMetric | None = None,
) -> PromptSet:
    """Checks that two models can be compared and turns ``prompts`` into a PromptSet for both.

    With a metric defined by the difference of the two models (KRS, ``recovery``) the models
    must also differ (:func:`~unlearnlens.models.check_distinct`).
    """
    from unlearnlens.models import check_compatible, check_distinct

    check_compatible(source, target)
    check_finite(source, "source model")
    check_finite(target, "target model")
    if metric is not None and (metric.uses_references or metric.normalized):
        check_distinct(
            source,
            target,
            what="target model",
            base_what="source model",
            why=f"{metric.name.upper() if metric.name == 'krs' else metric.name} is undefined "
            "when the source and target models are the same",
        )
    ps = as_promptset(target, prompts)
    ps.check_fits(source)
    return ps


def sweep_result(
    scores: SweepScores,
    metric: BoundMetric,
    axes: dict[str, list[object]],
    meta: dict[str, object],
) -> SweepResult:
    """Aggregates per-prompt scores over prompts into a :class:`SweepResult` with these axes."""
    base = float(scores.baseline.nanmean())
    ref = float(scores.reference.nanmean())
    shape = [len(v) for v in axes.values()]
    per_prompt = scores.per_prompt.reshape(*shape, -1)
    return SweepResult(
        scores=metric.aggregate(per_prompt, baseline=base, reference=ref),
        axes=axes,
        metric=metric.name,
        baseline=float(metric.aggregate(scores.baseline[None], baseline=base, reference=ref)[0]),
        reference=float(metric.aggregate(scores.reference[None], baseline=base, reference=ref)[0]),
        meta={**meta, "n_prompts": per_prompt.shape[-1], "left_out": int(scores.left_out.sum())},
        per_prompt=per_prompt,
    )


def patch(
    source: HookedTransformer,
    target: HookedTransformer,
    prompts: Prompts,
    *,
    hooks: str | Sequence[str],
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    positions: str = "all",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patches the source's activations into the target, one layer window at a time.

    For every layer ``l`` in ``layers``, the target is run on the prompts with the activations
    at ``hooks`` in layers ``l-(w-1)/2 .. l+(w-1)/2`` (clipped to the model) replaced by the
    source's activations on the same prompts, at the chosen positions, and the metric is read
    at the target positions. Several hooks are patched together in the same run (the study's
    "coefficients + attention").

    Args:
        source: The model activations come from (the base model in the study).
        target: The model they go into (the unlearned model).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        hooks: One block-relative hook name or several: ``"hook_resid_pre"``,
            ``"hook_resid_mid"``, ``"hook_resid_post"``, ``"hook_attn_out"``, ``"hook_mlp_out"``,
            ``"mlp.hook_post"`` (MLP coefficients), ``"attn.hook_z"``, ... (short aliases such
            as ``"resid_pre"`` work too).
        layers: The window centres; all layers by default.
        window: A positive odd number of layers patched together (the study uses 5).
        positions: ``"all"`` real positions; ``"prompt"`` or ``"answer"`` tokens only;
            ``"last"`` prompt token; ``"each"``: one patch per position, which adds a ``pos``
            axis (as TransformerLens's ``get_act_patch_*`` functions do). Padding is never
            patched.
        metric: ``"krs"`` (default), ``"answer_logprob"``, ``"answer_prob"``, ``"accuracy"``,
            ``"recovery"``, or a callable ``(logits, prompts) -> [batch]``.
        batch_size: Most rows (prompts x stacked variants) per forward pass.
        progress: Show a progress bar.

    Returns:
        A SweepResult with a ``layer`` axis (and a ``pos`` axis for ``positions="each"``).

    Raises:
        IncompatibleModelsError: The models differ in architecture or tokenizer.
        HookError: An unknown hook (the message lists the valid ones).
        LayerError: A layer out of range, or a window that is not a positive odd number.
        PromptError: Bad prompts, or ``positions`` not among the allowed values.
        MetricError: An unknown metric, or one that returns the wrong shape.
    """
    if positions not in _POSITIONS:
        raise PromptError(f"positions must be one of {', '.join(_POSITIONS)}; got {positions!r}")
    hook_names = resolve_hooks(target, hooks)
    centres = check_layers(target, layers)
    window = check_window(window)
    batch_size = check_batch_size(batch_size)
    resolve_hooks(source, hooks, what="the source model")
    bound = resolve_metric(metric)
    ps = prepare(source, target, prompts, bound)
    n_layers = target.cfg.n_layers

    def variant(centre: int, mask: torch.Tensor | None) -> Variant:
        return Variant(
            patches=tuple(
                Patch(layer, hook, mask)
                for layer in window_layers(centre, window, n_layers)
                for hook in hook_names
            )
        )

    axes: dict[str, list[object]] = {"layer": list(centres)}
    if positions == "each":
        pos = torch.arange(ps.seq_len)
        masks = [(pos == p)[None, :].expand(len(ps), -1) for p in range(ps.seq_len)]
        variants = [variant(c, m) for c in centres for m in masks]
        axes["pos"] = list(range(ps.seq_len))
    else:
        mask = None if positions == "all" else ps.position_mask(positions)
        variants = [variant(c, mask) for c in centres]

    scores = run_variants(
        source,
        target,
        ps,
        variants,
        bound,
        batch_size=batch_size,
        progress=progress,
        desc=f"patch {'+'.join(hook_names)}",
    )
    meta = {
        "kind": "patch",
        "hooks": hook_names,
        "window": window,
        "positions": positions,
        "windows": [window_layers(c, window, n_layers) for c in centres],
        "source": source.cfg.model_name,
        "target": target.cfg.model_name,
    }
    return sweep_result(scores, bound, axes, meta)


def patch_residual(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    positions: str = "all",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patches the base model's residual stream into the unlearned model, layer by layer.

    Patching the whole residual stream at a layer and position carries everything the base
    model computed there, so the curve shows at which depth and position the information that
    differs between the models enters. With ``positions="each"`` this is TransformerLens's
    ``get_act_patch_resid_pre`` (base cache, unlearned model), run faster.

    Args:
        base: The original model (source of the activations).
        unlearned: The unlearned model (patched).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        hook: ``"resid_pre"`` (block input), ``"resid_mid"`` (after attention) or
            ``"resid_post"`` (block output).
        layers: Layers to patch (window centres); all by default.
        window: Positive odd number of layers patched together.
        positions: ``"all"``, ``"prompt"``, ``"answer"``, ``"last"`` or ``"each"``.
        metric: A metric name or callable; KRS by default.
        batch_size: Most rows per forward pass.
        progress: Show a progress bar.
    """
    if hook not in ("resid_pre", "resid_mid", "resid_post"):
        raise HookError(f"hook must be 'resid_pre', 'resid_mid' or 'resid_post'; got {hook!r}")
    return patch(
        base,
        unlearned,
        prompts,
        hooks=f"hook_{hook}",
        layers=layers,
        window=window,
        positions=positions,
        metric=metric,
        batch_size=batch_size,
        progress=progress,
    )


def patch_mlp_coefficients(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    positions: str = "all",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patches the base model's MLP coefficients (``mlp.hook_post``) into the unlearned model.

    The coefficients weight the columns of ``W_out`` (for gated MLPs ``act(gate(x)) * up(x)``,
    the input of LLaMA's ``down_proj``). The study finds that patching them in late layers
    brings back most of the unlearned knowledge: the value vectors are intact, their
    retrieval changed. Arguments as in :func:`patch_residual`; the study uses ``window=5``.
    """
    return patch(
        base,
        unlearned,
        prompts,
        hooks="mlp.hook_post",
        layers=layers,
        window=window,
        positions=positions,
        metric=metric,
        batch_size=batch_size,
        progress=progress,
    )


def patch_attention(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    positions: str = "all",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patches the base model's attention outputs (``hook_attn_out``) into the unlearned model.

    The study's second activation: attention outputs of middle-to-late layers also recover a
    great deal. Arguments as in :func:`patch_residual`.
    """
    return patch(
        base,
        unlearned,
        prompts,
        hooks="hook_attn_out",
        layers=layers,
        window=window,
        positions=positions,
        metric=metric,
        batch_size=batch_size,
        progress=progress,
    )
