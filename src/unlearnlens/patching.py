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
from jaxtyping import Bool
from torch import Tensor

from unlearnlens._checks import (
    check_batch_size,
    check_layers,
    check_window,
    resolve_hooks,
    window_layers,
)
from unlearnlens._finite import check_finite
from unlearnlens._roles import check_models, check_order
from unlearnlens._variants import VariantSpec, parse_variants
from unlearnlens.errors import ConfigError, HookError, PromptError
from unlearnlens.metrics import MetricLike, resolve_metric
from unlearnlens.prompts import Prompts, PromptSet, as_promptset
from unlearnlens.results import SweepResult
from unlearnlens.runner import Patch, SweepScores, Variant, run_variants

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.metrics import BoundMetric

__all__ = [
    "patch",
    "patch_attention",
    "patch_mlp_coefficients",
    "patch_residual",
    "position_slots",
    "sweep_result",
]

Positions = Literal["all", "prompt", "last", "answer", "each"]
_POSITIONS = ("all", "prompt", "last", "answer", "each")
Align = Literal["start", "answer"]
_ALIGNS = ("start", "answer")


def position_slots(
    prompts: PromptSet, align: str = "start"
) -> tuple[list[object], Bool[Tensor, "slot batch seq"]]:
    """The positions of a per-position sweep: labels and, per label, which token it is.

    With ``align="start"`` a slot is an absolute token index (``0 .. seq_len-1``), so one slot
    is a different token in prompts of different lengths. With ``align="answer"`` slots are
    counted back from the end of the prompt and on from the start of the answer, labelled
    ``"prompt-K" .. "prompt-1", "answer+0" .. "answer+(M-1)"`` (``prompt-1`` is the prompt's
    last token, the one that predicts the first answer token), so one slot is the same role in
    every prompt. A prompt lacks a slot past its own start or end (padding): its mask row is
    all False there.

    Returns:
        The slot labels, and a ``[slot, batch, seq]`` mask of the token each slot picks.
    """
    pos = torch.arange(prompts.seq_len, device=prompts.device)[None, :]
    real = prompts.position_mask("all")
    if align == "start":
        labels: list[object] = list(range(prompts.seq_len))
        masks = [(pos == p) & real for p in range(prompts.seq_len)]
        return labels, torch.stack(masks)
    n = prompts.prompt_lengths[:, None].to(pos.device)
    m = prompts.answer_lengths[:, None].to(pos.device)
    k_max, j_max = int(n.max()), int(m.max())
    labels = [f"prompt-{k}" for k in range(k_max, 0, -1)]
    labels += [f"answer+{j}" for j in range(j_max)]
    masks = [pos == n - k for k in range(k_max, 0, -1)]
    masks += [(pos == n + j) & (j < m) for j in range(j_max)]
    return labels, torch.stack(masks) & real[None]


def prepare(
    source: HookedTransformer,
    target: HookedTransformer,
    prompts: Prompts,
    function: str,
    metric: BoundMetric | None = None,
) -> PromptSet:
    """Checks that two models can be compared and turns ``prompts`` into a PromptSet for both.

    Warns (:class:`~unlearnlens.ArgumentOrderWarning`) when the library knows the two models
    are the wrong way round (see :mod:`unlearnlens._roles`). With a metric defined by the
    difference of the two models (KRS, ``recovery``) the models must also differ
    (:func:`~unlearnlens.models.check_distinct`).
    """
    from unlearnlens.models import check_compatible, check_distinct

    check_models(source, target, function)
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
    check_order(source, target, function=function, changes_target=False)
    ps = as_promptset(target, prompts)
    ps.check_fits(source)
    return ps


def sweep_result(
    scores: SweepScores,
    metric: BoundMetric,
    axes: dict[str, list[object]],
    meta: dict[str, object],
    present: torch.Tensor | None = None,
) -> SweepResult:
    """Aggregates per-prompt scores over prompts into a :class:`SweepResult` with these axes.

    ``present`` (``[variant, batch]``, optional) marks which prompts a variant applies to: a
    per-position patch at a position a prompt does not have (its padding) leaves that prompt
    out (NaN in ``per_prompt``) instead of scoring it as unchanged.
    """
    base = float(scores.baseline.nanmean())
    ref = float(scores.reference.nanmean())
    shape = [len(v) for v in axes.values()]
    per_prompt = scores.per_prompt
    if present is not None:
        per_prompt = torch.where(present.to(per_prompt.device), per_prompt, torch.nan)
    per_prompt = per_prompt.reshape(*shape, -1)
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
    hooks: str | Sequence[str] | None = None,
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    positions: str = "all",
    align: str = "start",
    variants: VariantSpec | None = None,
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """Patches the source's activations into the target, one layer window at a time.

    For every layer ``l`` in ``layers``, the target is run on the prompts with the activations
    at ``hooks`` in layers ``l-(w-1)/2 .. l+(w-1)/2`` (clipped to the model) replaced by the
    source's activations on the same prompts, at the chosen positions, and the metric is read
    at the target positions. Several hooks are patched together in the same run (the study's
    "coefficients + attention").

    ``variants`` replaces the layer sweep by explicit patches, each an exact set of layers
    (any number) with its own hooks and positions, all scored in one engine run::

        ul.patch(base, unlearned, prompts, variants={
            "late coefficients": dict(layers=[-3, -2, -1], hooks="mlp.hook_post"),
            "late coef + attn": dict(layers=[-3, -2, -1], hooks=["mlp.hook_post", "attn_out"]),
        })

    The result then has a ``variant`` axis labelled with the names.

    Args:
        source: The model activations come from (the base model in the study).
        target: The model they go into (the unlearned model).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        hooks: One block-relative hook name or several: ``"hook_resid_pre"``,
            ``"hook_resid_mid"``, ``"hook_resid_post"``, ``"hook_attn_out"``, ``"hook_mlp_out"``,
            ``"mlp.hook_post"`` (MLP coefficients), ``"attn.hook_z"``, ... (short aliases such
            as ``"resid_pre"`` work too). Required unless every variant names its own.
        layers: The window centres; all layers by default.
        window: A positive odd number of layers patched together (the study uses 5).
        positions: ``"all"`` real positions; ``"prompt"`` or ``"answer"`` tokens only;
            ``"last"`` prompt token; ``"each"``: one patch per position, which adds a ``pos``
            axis (as TransformerLens's ``get_act_patch_*`` functions do). Padding is never
            patched: a prompt shorter than a position is left out of that position's score
            (NaN in ``per_prompt``, skipped by the mean over prompts).
        align: How ``positions="each"`` counts positions. ``"start"``: the absolute token
            index (labels ``0, 1, ...``). ``"answer"``: back from the prompt's end and on from
            the answer's start (labels ``"prompt-3", "prompt-2", "prompt-1", "answer+0",
            ...``), so a column is the same role in every prompt and heatmaps of prompts of
            different lengths line up (see :func:`position_slots`).
        variants: A list of ``dict(layers=..., hooks=..., positions=...)``, or a dict of
            name -> such a dict, in place of the layer sweep (``layers`` and ``window`` are
            then left at their defaults). ``layers``: a layer, a list (negative count from
            the end) or ``None`` for all; ``hooks`` and ``positions`` (not ``"each"``)
            default to the arguments of the same name.
        metric: ``"krs"`` (default), ``"answer_logprob"``, ``"answer_prob"``, ``"accuracy"``,
            ``"recovery"``, or a callable ``(logits, prompts) -> [batch]``.
        batch_size: Most rows (prompts x stacked variants) per forward pass.
        progress: Show a progress bar (``None``: the library-wide setting).

    Returns:
        A SweepResult with a ``layer`` axis (and a ``pos`` axis for ``positions="each"``), or
        a ``variant`` axis with ``variants``.

    Raises:
        ConfigError: A dict of models, or a malformed ``variants``.
        IncompatibleModelsError: The models differ in architecture or tokenizer.
        HookError: An unknown hook (the message lists the valid ones), or none given.
        LayerError: A layer out of range, or a window that is not a positive odd number.
        PromptError: Bad prompts, or ``positions`` not among the allowed values.
        MetricError: An unknown metric, or one that returns the wrong shape.
    """
    check_models(source, target, "patch")
    if positions not in _POSITIONS:
        raise PromptError(f"positions must be one of {', '.join(_POSITIONS)}; got {positions!r}")
    if align not in _ALIGNS:
        raise PromptError(f"align must be one of {', '.join(_ALIGNS)}; got {align!r}")
    if align != "start" and positions != "each":
        raise PromptError(f"align={align!r} applies to positions='each' only")
    if variants is not None:
        return _patch_variants(
            source,
            target,
            prompts,
            variants,
            hooks,
            layers,
            window,
            positions,
            metric,
            batch_size,
            progress,
        )
    if hooks is None:
        raise HookError("patch needs hooks=, e.g. hooks='mlp.hook_post' (or variants=)")
    hook_names = resolve_hooks(target, hooks)
    centres = check_layers(target, layers)
    window = check_window(window)
    batch_size = check_batch_size(batch_size)
    resolve_hooks(source, hooks, what="the source model")
    bound = resolve_metric(metric)
    ps = prepare(source, target, prompts, "patch", bound)
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
        labels, masks = position_slots(ps, align)
        runs = [variant(c, m) for c in centres for m in masks]
        present = masks.any(-1).repeat(len(centres), 1)
        axes["pos"] = labels
    else:
        mask = None if positions == "all" else ps.position_mask(positions)
        runs = [variant(c, mask) for c in centres]
        present = None

    scores = run_variants(
        source,
        target,
        ps,
        runs,
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
        "align": align,
        "windows": [window_layers(c, window, n_layers) for c in centres],
        "source": source.cfg.model_name,
        "target": target.cfg.model_name,
    }
    return sweep_result(scores, bound, axes, meta, present)


def _patch_variants(
    source: HookedTransformer,
    target: HookedTransformer,
    prompts: Prompts,
    variants: VariantSpec,
    hooks: str | Sequence[str] | None,
    layers: int | Sequence[int] | None,
    window: int,
    positions: str,
    metric: MetricLike,
    batch_size: int | None,
    progress: bool | None,
) -> SweepResult:
    """:func:`patch` with explicit variants: every check first, then one engine run."""
    if layers is not None or window != 1 or positions == "each":
        raise ConfigError(
            "patch: variants replace the layer sweep; leave layers and window at their defaults "
            "(and positions other than 'each') and give each variant its own layers"
        )
    entries = parse_variants(
        variants,
        keys=("layers", "hooks", "positions"),
        function="patch",
        defaults={"hooks": hooks},
    )
    resolved = []
    for name, entry in entries:
        wanted = entry.get("hooks", hooks)
        if wanted is None:
            raise HookError(f"patch: variant {name!r} names no hooks, and hooks= is not given")
        where = entry.get("positions", positions)
        if where not in _POSITIONS or where == "each":
            allowed = ", ".join(p for p in _POSITIONS if p != "each")
            raise PromptError(
                f"patch: variant {name!r} has positions={where!r}; one of {allowed} is needed"
            )
        chosen = sorted(set(check_layers(target, entry["layers"])))
        hook_names = resolve_hooks(target, wanted)
        resolve_hooks(source, wanted, what="the source model")
        resolved.append((name, chosen, hook_names, where))
    batch_size = check_batch_size(batch_size)
    bound = resolve_metric(metric)
    ps = prepare(source, target, prompts, "patch", bound)
    runs = []
    for _, chosen, hook_names, where in resolved:
        mask = None if where == "all" else ps.position_mask(where)
        runs.append(
            Variant(patches=tuple(Patch(lay, h, mask) for lay in chosen for h in hook_names))
        )
    scores = run_variants(
        source,
        target,
        ps,
        runs,
        bound,
        batch_size=batch_size,
        progress=progress,
        desc="patch variants",
    )
    meta = {
        "kind": "patch",
        "hooks": sorted({h for _, _, names, _ in resolved for h in names}),
        "window": None,
        "positions": "variants",
        "windows": [chosen for _, chosen, _, _ in resolved],
        "variants": [
            {"name": name, "layers": chosen, "hooks": names, "positions": where}
            for name, chosen, names, where in resolved
        ],
        "source": source.cfg.model_name,
        "target": target.cfg.model_name,
    }
    return sweep_result(scores, bound, {"variant": [r[0] for r in resolved]}, meta)


def patch_residual(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    hook: str = "resid_pre",
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    positions: str = "all",
    align: str = "start",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool | None = None,
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
        align: For ``positions="each"``: ``"start"`` (absolute token index) or ``"answer"``
            (``"prompt-1"``, ``"answer+0"``, ...), as in :func:`patch`.
        metric: A metric name or callable; KRS by default.
        batch_size: Most rows per forward pass.
        progress: Show a progress bar (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).
    """
    check_models(base, unlearned, "patch_residual")
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
        align=align,
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
    align: str = "start",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """Patches the base model's MLP coefficients (``mlp.hook_post``) into the unlearned model.

    The coefficients weight the columns of ``W_out`` (for gated MLPs ``act(gate(x)) * up(x)``,
    the input of LLaMA's ``down_proj``). The study finds that patching them in late layers
    brings back most of the unlearned knowledge: the value vectors are intact, their
    retrieval changed. Arguments as in :func:`patch_residual`; the study uses ``window=5``.
    """
    check_models(base, unlearned, "patch_mlp_coefficients")
    return patch(
        base,
        unlearned,
        prompts,
        hooks="mlp.hook_post",
        layers=layers,
        window=window,
        positions=positions,
        align=align,
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
    align: str = "start",
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """Patches the base model's attention outputs (``hook_attn_out``) into the unlearned model.

    The study's second activation: attention outputs of middle-to-late layers also recover a
    great deal. Arguments as in :func:`patch_residual`.
    """
    check_models(base, unlearned, "patch_attention")
    return patch(
        base,
        unlearned,
        prompts,
        hooks="hook_attn_out",
        layers=layers,
        window=window,
        positions=positions,
        align=align,
        metric=metric,
        batch_size=batch_size,
        progress=progress,
    )
