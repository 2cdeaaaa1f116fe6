"""The engine: run a model with something changed and read logits only where metrics look.

Patching, restoration and the probes all do the same thing: run the target model with some
activations or weights changed, read the logits at the target positions, and score them. This
module is the one place that does it, and where the speed comes from:

* a change at layer ``l`` leaves layers ``< l`` untouched, so the run starts from the target's
  cached residual stream at layer ``l`` (``HookedTransformer.forward(start_at_layer=l)``);
* a change at position ``p`` leaves positions ``< p`` untouched, so only positions ``p ..``
  are run, attending to the target's cached keys and values for the earlier positions;
* positions after the last target position cannot affect any target, so they are not run;
* ``ln_final`` and the unembedding are applied at the target positions only;
* variants that start at the same layer and position share one forward pass, stacked along the
  batch dimension in chunks of ``batch_size`` rows;
* the clean runs cache only the hooks the sweep needs.

The source may live on another device than the target (the base model on the CPU, the
unlearned model on the GPU): its clean runs then go block by block on the target's device, one
block's weights there at a time (:mod:`unlearnlens._offload`), and give the same numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities import apply_softcap

from unlearnlens import _offload
from unlearnlens._checks import check_batch_size
from unlearnlens._guard import preserved
from unlearnlens._progress import bar
from unlearnlens.metrics import BoundMetric

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = [
    "Patch",
    "SweepScores",
    "Variant",
    "gather_targets",
    "logits_from_residual",
    "run_variants",
    "target_logits",
    "unembed",
]


def gather_targets(
    x: Float[Tensor, "batch seq ..."], prompts: PromptSet, *, offset: int = 0
) -> Float[Tensor, "batch answer ..."]:
    """Picks the target positions out of a per-position tensor.

    Args:
        x: Any ``[batch, seq, ...]`` tensor whose position axis starts at absolute position
            ``offset`` (when only a suffix of the sequence was run).
        prompts: The prompts whose ``target_positions`` to read.
        offset: Absolute position of ``x[:, 0]``.
    """
    idx = (prompts.target_positions.to(x.device) - offset).clamp(min=0)
    idx = idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def unembed(
    model: HookedTransformer,
    resid: Float[Tensor, "batch answer d_model"],
    device: torch.device | None = None,
) -> Float[Tensor, "batch answer d_vocab"]:
    """Final norm, unembedding and logit soft-cap of a final residual stream, in float32.

    The final norm works per position, so applying it to a few gathered positions gives the
    same numbers as applying it everywhere. With ``device`` (a model run block by block
    there), the final norm's weights are copied there for the call and ``W_U`` is streamed
    there a slice at a time (:func:`unlearnlens._offload.logits`).
    """
    with _offload.moved(device, *_offload.final_norm(model)):
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
    if device is None:
        # Unembed's own computation (hooks included) without its per-call contiguous copy of
        # ``W_U.T``: a d_model x d_vocab copy that costs more than the product at a few
        # positions.
        u = model.unembed
        logits = u.hook_out(torch.nn.functional.linear(u.hook_in(resid), u.W_U.T, u.b_U))
    else:
        logits = _offload.logits(model, resid, device)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap).float()


def logits_from_residual(
    model: HookedTransformer,
    final_resid: Float[Tensor, "batch seq d_model"],
    prompts: PromptSet,
    *,
    offset: int = 0,
) -> Float[Tensor, "batch answer d_vocab"]:
    """Logits at the target positions from the residual stream after the last block."""
    return unembed(model, gather_targets(final_resid, prompts, offset=offset))


def target_logits(
    model: HookedTransformer, prompts: PromptSet
) -> Float[Tensor, "batch answer d_vocab"]:
    """The model's own logits at the target positions, computed without a full unembedding.

    Runs under the caller's grad mode (so trainers can differentiate through it); wrap it in
    ``torch.no_grad()`` for analysis.
    """
    tokens = prompts.tokens.to(model.cfg.device)
    n = int(prompts.last_target_position.max()) + 1
    resid = model(
        tokens[:, :n],
        attention_mask=prompts.attention_mask[:, :n].to(model.cfg.device),
        stop_at_layer=model.cfg.n_layers,
    )
    return logits_from_residual(model, resid, prompts)


# ------------------------------------------------------------------------------------ engine


@dataclass(frozen=True)
class Patch:
    """Replace one hook's activation in the target with the source's, at some positions.

    Attributes:
        layer: The block the hook lives in.
        hook: Block-relative hook name (``"mlp.hook_post"``, ``"hook_resid_pre"``, ...).
        positions: ``[batch, seq]`` mask of the positions to patch, or None for every real
            (non-pad) position. Pad positions are never patched.
    """

    layer: int
    hook: str
    positions: Bool[Tensor, "batch seq"] | None = None

    @property
    def name(self) -> str:
        """The full TransformerLens hook name."""
        return f"blocks.{self.layer}.{self.hook}"


@dataclass(frozen=True)
class Variant:
    """One changed run of the target model.

    Attributes:
        patches: Activations taken from the source model's run on the same prompts.
        context: A factory of a context manager that changes the target for the duration of
            the run (e.g. restored weights). Variants with a context run on their own.
        start_layer: First block whose input can differ from the target's clean run: the
            run starts from the target's cached residual there. ``-1`` starts from the token
            embedding; ``n_layers`` only recomputes the final norm and unembedding. Derived
            from the patches when None.
        mlp_out_only: The change reaches block ``start_layer`` only through its MLP output
            projection (``mlp.W_out``, ``mlp.b_out``): the block's attention and MLP
            coefficients are the target's own, so the run starts from the cached
            ``resid_mid`` and ``mlp.hook_post`` there and recomputes only ``W_out``.
            Ignored for architectures whose blocks are not plain pre-norm (parallel
            attention and MLP, or norms after the sublayers).
    """

    patches: tuple[Patch, ...] = ()
    context: Callable[[], AbstractContextManager[object]] | None = None
    start_layer: int | None = None
    mlp_out_only: bool = False


@dataclass(frozen=True)
class SweepScores:
    """What :func:`run_variants` returns: per-prompt scores and the clean runs' scores.

    Attributes:
        per_prompt: ``[variant, batch]`` metric scores of each variant on each prompt.
        baseline: ``[batch]`` scores of the unchanged target.
        reference: ``[batch]`` scores of the source.
        left_out: ``[batch]`` prompts the metric leaves out (KRS where source = target).
    """

    per_prompt: Float[Tensor, "variant batch"]
    baseline: Float[Tensor, " batch"]
    reference: Float[Tensor, " batch"]
    left_out: Bool[Tensor, " batch"] = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.bool)
    )


@dataclass
class _Clean:
    """Clean runs of source and target on one chunk of prompts."""

    source_logits: Tensor
    target_logits: Tensor
    source_acts: dict[str, Tensor]
    target_resid: dict[int, Tensor]
    kv: TransformerLensKeyValueCache | None
    target_mid: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _patch_mask(patch: Patch, chunk: PromptSet, rows: slice) -> Tensor:
    real = chunk.position_mask("all")
    if patch.positions is None:
        return real
    return patch.positions[rows, : chunk.seq_len].to(real.device) & real


def _first_position(variant: Variant, chunk: PromptSet, rows: slice) -> int:
    """Earliest position a variant can change (positions before it keep the target's values)."""
    if variant.context is not None or not variant.patches:
        return 0
    firsts = []
    for patch in variant.patches:
        mask = _patch_mask(patch, chunk, rows)
        hit = mask.any(0).nonzero()
        firsts.append(int(hit[0, 0]) if len(hit) else chunk.seq_len)
    return min(firsts)


def _mid_block_start(variant: Variant, cfg: object) -> bool:
    """Whether a variant can start after its first block's MLP coefficients."""
    return (
        variant.mlp_out_only
        and not variant.patches
        and variant.start_layer is not None
        and 0 <= variant.start_layer < cfg.n_layers  # type: ignore[attr-defined]
        and not getattr(cfg, "parallel_attn_mlp", False)
        and not getattr(cfg, "use_normalization_before_and_after", False)
    )


def _start_layer(variant: Variant, n_layers: int) -> int:
    if variant.start_layer is not None:
        return variant.start_layer
    if not variant.patches:
        return n_layers
    return min(p.layer for p in variant.patches)


def _source_run(
    source: HookedTransformer,
    chunk: PromptSet,
    names: set[str],
    offload: torch.device | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The source's logits at the target positions and its activations at ``names``.

    With ``offload`` (a device), the blocks run there one at a time (see
    :func:`unlearnlens._offload.run_blocks`) and everything returned lives there.
    """
    n_layers = source.cfg.n_layers
    end = int(chunk.last_target_position.max()) + 1
    tokens, mask = chunk.tokens[:, :end], chunk.attention_mask[:, :end]
    if offload is None:
        resid, cache = source.run_with_cache(
            tokens.to(source.cfg.device),
            attention_mask=mask.to(source.cfg.device),
            stop_at_layer=n_layers,
            names_filter=lambda name: name in names,
        )
        return logits_from_residual(source, resid, chunk), dict(cache.items())
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: object) -> None:
        acts[hook.name] = act.detach()  # type: ignore[attr-defined]

    with source.hooks(fwd_hooks=[(name, keep) for name in sorted(names)]):
        resid = _offload.run_blocks(source, tokens, mask, device=offload, stop_at_layer=n_layers)
    return unembed(source, gather_targets(resid, chunk), offload), acts


def _clean_runs(
    source: HookedTransformer,
    target: HookedTransformer,
    chunk: PromptSet,
    source_hooks: set[str],
    start_layers: set[int],
    want_kv: bool,
    mid_layers: frozenset[int] = frozenset(),
    offload: torch.device | None = None,
) -> _Clean:
    n_layers = target.cfg.n_layers
    end = int(chunk.last_target_position.max()) + 1
    mask = chunk.attention_mask[:, :end]
    src_logits, src_acts = _source_run(source, chunk, source_hooks, offload)

    resid_names = {
        f"blocks.{layer}.hook_resid_pre" for layer in start_layers if 0 <= layer < n_layers
    }
    resid_names |= {
        f"blocks.{layer}.{h}" for layer in mid_layers for h in ("hook_resid_mid", "mlp.hook_post")
    }
    kv = (
        TransformerLensKeyValueCache.init_cache(target.cfg, target.cfg.device, len(chunk))
        if want_kv
        else None
    )
    tgt_tokens = chunk.tokens[:, :end].to(target.cfg.device)
    tgt_resid, tgt_cache = target.run_with_cache(
        tgt_tokens,
        attention_mask=mask.to(target.cfg.device),
        stop_at_layer=n_layers,
        past_kv_cache=kv,
        names_filter=lambda name: name in resid_names,
    )
    resid = {
        layer: tgt_cache[f"blocks.{layer}.hook_resid_pre"]
        for layer in start_layers
        if 0 <= layer < n_layers
    }
    if n_layers in start_layers:
        resid[n_layers] = tgt_resid
    return _Clean(
        source_logits=src_logits,
        target_logits=logits_from_residual(target, tgt_resid, chunk),
        source_acts=src_acts,
        target_resid=resid,
        kv=kv,
        target_mid={
            layer: (
                tgt_cache[f"blocks.{layer}.hook_resid_mid"],
                tgt_cache[f"blocks.{layer}.mlp.hook_post"],
            )
            for layer in mid_layers
        },
    )


def _prefix_cache(
    kv: TransformerLensKeyValueCache, first_pos: int, copies: int, layers: range
) -> TransformerLensKeyValueCache:
    """A frozen cache of the target's keys/values for positions ``< first_pos``, repeated.

    Only ``layers`` get real entries; a forward pass over other layers never reads theirs.
    """
    entries = {
        i: TransformerLensKeyValueCacheEntry(
            past_keys=kv.entries[i].past_keys[:, :first_pos].repeat(copies, 1, 1, 1),
            past_values=kv.entries[i].past_values[:, :first_pos].repeat(copies, 1, 1, 1),
            frozen=True,
        )
        for i in layers
    }
    some = entries[layers[0]]
    prev = torch.ones(
        some.past_keys.shape[0], first_pos, dtype=torch.long, device=some.past_keys.device
    )
    return TransformerLensKeyValueCache(
        entries=[entries.get(i, some) for i in range(len(kv.entries))],
        previous_attention_mask=prev,
        frozen=True,
    )


def _stack_hooks(
    group: Sequence[Variant], chunk: PromptSet, rows: slice, clean: _Clean, first_pos: int, end: int
) -> list[tuple[str, Callable[..., Tensor]]]:
    """One forward hook per patched hook name, applying each stacked variant to its rows."""
    names = sorted({p.name for v in group for p in v.patches})
    hooks = []
    for name in names:
        masks = []
        for v in group:
            m = torch.zeros(len(chunk), chunk.seq_len, dtype=torch.bool, device=chunk.device)
            for p in v.patches:
                if p.name == name:
                    m |= _patch_mask(p, chunk, rows)
            masks.append(m[:, first_pos:end])
        mask_vbs = torch.stack(masks)  # [variant, batch, suffix]
        src = clean.source_acts[name][:, first_pos:end]

        def hook(
            act: Tensor, hook: object, mask_vbs: Tensor = mask_vbs, src: Tensor = src
        ) -> Tensor:
            b = mask_vbs.shape[1]
            v = act.shape[0] // b  # variants that have joined the stack by this layer
            act_v = act.view(v, b, *act.shape[1:])
            m = mask_vbs[:v].to(act.device).reshape(v, b, -1, *([1] * (act.ndim - 2)))
            return torch.where(m, src.to(act.device, act.dtype)[None], act_v).view(act.shape)

        hooks.append((name, hook))
    return hooks


def _run_stack(
    target: HookedTransformer,
    group: Sequence[Variant],
    chunk: PromptSet,
    rows: slice,
    clean: _Clean,
    first_pos: int,
    end: int,
) -> Float[Tensor, "rows suffix d_model"]:
    """Runs variants stacked along the batch, each joining at its own start layer.

    ``group`` is sorted by start layer. Between two start layers the stack runs in one forward
    pass; at a start layer the joining variants' rows (the target's cached residual there) are
    appended, so no variant computes a layer before its start and passes stay large.
    """
    n_layers = target.cfg.n_layers
    b = len(chunk)
    starts = [_start_layer(v, n_layers) for v in group]
    bounds = [*sorted(set(starts)), n_layers]
    x: Tensor | None = None
    with target.hooks(fwd_hooks=_stack_hooks(group, chunk, rows, clean, first_pos, end)):
        for lo, hi in itertools.pairwise(bounds):
            new = clean.target_resid[lo][:, first_pos:end].repeat(starts.count(lo), 1, 1)
            x = new if x is None else torch.cat([x, new.to(x.device)])
            if lo == hi:
                continue
            if first_pos > 0:
                assert clean.kv is not None
                cache = _prefix_cache(clean.kv, first_pos, x.shape[0] // b, range(lo, hi))
                mask = torch.ones(x.shape[0], end, dtype=torch.long, device=x.device)
                x = target(
                    x, start_at_layer=lo, stop_at_layer=hi, past_kv_cache=cache, attention_mask=mask
                )
            else:
                x = target(x, start_at_layer=lo, stop_at_layer=hi)
    assert x is not None
    return x


def _run_group(
    target: HookedTransformer,
    group: Sequence[Variant],
    chunk: PromptSet,
    rows: slice,
    clean: _Clean,
    start: int,
    first_pos: int,
) -> Float[Tensor, "variant batch answer d_vocab"]:
    """Runs a group of variants that share a first position; logits at the target positions."""
    n_layers = target.cfg.n_layers
    n_var, b = len(group), len(chunk)
    end = int(chunk.last_target_position.max()) + 1
    ctx = group[0].context() if group[0].context is not None else nullcontext()
    with ctx:
        if _mid_block_start(group[0], target.cfg):
            mid, post = (t[:, first_pos:end] for t in clean.target_mid[start])
            mlp = target.blocks[start].mlp
            resid = mid + torch.nn.functional.linear(post, mlp.W_out.T, mlp.b_out)
            if start + 1 < n_layers:
                resid = target(resid, start_at_layer=start + 1, stop_at_layer=n_layers)
        elif start < 0:
            with target.hooks(fwd_hooks=_stack_hooks(group, chunk, rows, clean, 0, end)):
                resid = target(
                    chunk.tokens[:, :end].to(target.cfg.device),
                    attention_mask=chunk.attention_mask[:, :end].to(target.cfg.device),
                    stop_at_layer=n_layers,
                )
        else:
            resid = _run_stack(target, group, chunk, rows, clean, first_pos, end)
        resid_vbsd = resid.view(n_var, b, *resid.shape[1:])
        logits = torch.stack(
            [logits_from_residual(target, r, chunk, offset=first_pos) for r in resid_vbsd]
        )
    if first_pos > 0:  # targets before the first changed position keep the clean logits
        early = (chunk.target_positions < first_pos).to(logits.device)[None, :, :, None]
        logits = torch.where(early, clean.target_logits[None], logits)
    return logits


def _groups(
    variants: Sequence[Variant], firsts: Sequence[int], n_rows: int, n_layers: int, max_rows: int
) -> Iterator[tuple[list[int], int, int]]:
    """Variant indices to run together: ``(indices, lowest start layer, first position)``.

    ``firsts`` holds each variant's first position on the chunk (:func:`_first_position`),
    ``n_rows`` the chunk's prompts. Patch-only variants that share a first position are
    stacked (sorted by start layer), at most ``max_rows`` rows at a time; a variant with a
    context (changed weights) runs alone.
    """
    keyed: dict[int, list[int]] = {}
    for i, (v, first) in enumerate(zip(variants, firsts)):
        if v.context is not None or v.mlp_out_only:
            yield [i], _start_layer(v, n_layers), first
        else:
            keyed.setdefault(first, []).append(i)
    per_pass = max(1, max_rows // n_rows)
    for first, idx in keyed.items():
        idx = sorted(idx, key=lambda i: _start_layer(variants[i], n_layers))
        for k in range(0, len(idx), per_pass):
            stack = idx[k : k + per_pass]
            yield stack, _start_layer(variants[stack[0]], n_layers), first


def default_batch_size(prompts: PromptSet) -> int:
    """Rows per forward pass: about 8k tokens, and at least the whole prompt set up to 64."""
    return max(min(len(prompts), 64), 8192 // max(1, prompts.seq_len))


def run_variants(
    source: HookedTransformer,
    target: HookedTransformer,
    prompts: PromptSet,
    variants: Sequence[Variant],
    metric: BoundMetric,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    desc: str = "sweep",
) -> SweepScores:
    """Scores every variant of the target on every prompt; the models come back unchanged.

    Args:
        source: The model activations are patched from (the base model in a study).
        target: The model that is run changed (the unlearned model).
        prompts: The prompts, already validated for both models.
        variants: What to change in each run.
        metric: The bound metric (see :func:`unlearnlens.metrics.resolve_metric`).
        batch_size: Most rows (prompts x stacked variants) in one forward pass.
        progress: Show a progress bar over forward passes (``None``: the library-wide setting).
        desc: The progress bar's label.

    Returns:
        Per-prompt scores of every variant, and of the clean target (baseline) and source
        (reference).

    When the source does not live wholly on the target's device, its clean runs go block by
    block on the target's device (see :mod:`unlearnlens._offload`); variants with a context
    copy only the tensors they swap.
    """
    n_layers = target.cfg.n_layers
    batch_size = check_batch_size(batch_size)
    offload = _offload.pair_offload(source, target)
    rows_per_pass = default_batch_size(prompts) if batch_size is None else batch_size
    chunk_size = min(len(prompts), rows_per_pass)
    source_hooks = {p.name for v in variants for p in v.patches}
    chunks = list(prompts.batches(chunk_size))

    per_prompt = torch.full((len(variants), len(prompts)), torch.nan)
    baseline = torch.empty(len(prompts))
    reference = torch.empty(len(prompts))
    left_out = torch.zeros(len(prompts), dtype=torch.bool)

    mid = [_mid_block_start(v, target.cfg) for v in variants]
    mids = frozenset(_start_layer(v, n_layers) for v, m in zip(variants, mid) if m)
    starts = {_start_layer(v, n_layers) for v, m in zip(variants, mid) if not m}
    # Per chunk: each variant's first changed position, whether the target's keys and values
    # are needed (a run that starts after position 0), and the passes that run the variants.
    firsts = [[_first_position(v, chunk, sl) for v in variants] for sl, chunk in chunks]
    wants_kv = [any(f > 0 for f in row) for row in firsts]
    plan = [
        list(_groups(variants, row, len(chunk), n_layers, rows_per_pass))
        for (_, chunk), row in zip(chunks, firsts)
    ]

    with preserved(source, target):
        # Clean runs first: the metric and its references are checked before any sweep work.
        # With one chunk, its caches are kept for the sweep; otherwise they are rebuilt per chunk.
        keep = len(chunks) == 1
        cleans, refs = [], []
        for (_, chunk), want_kv in zip(chunks, wants_kv):
            if keep:
                clean = _clean_runs(
                    source, target, chunk, source_hooks, starts, want_kv, mids, offload
                )
                cleans.append(clean)
                refs.append((clean.source_logits, clean.target_logits))
            else:
                cleans.append(None)
                zs = (
                    target_logits(source, chunk)
                    if offload is None
                    else _source_run(source, chunk, set(), offload)[0]
                )
                refs.append((zs, target_logits(target, chunk)))
        for (sl, chunk), (zs, zt) in zip(chunks, refs):
            baseline[sl] = metric(zt, chunk, zs, zt).cpu()
            reference[sl] = metric(zs, chunk, zs, zt).cpu()
        if metric.uses_references:
            left_out = torch.cat(
                [
                    metric.check_references(zs, zt, chunk).cpu()
                    for (_, chunk), (zs, zt) in zip(chunks, refs)
                ]
            )

        pbar = bar(total=sum(len(p) for p in plan), progress=progress, desc=desc, leave=False)
        try:
            for (sl, chunk), groups, clean, want_kv in zip(chunks, plan, cleans, wants_kv):
                if clean is None:
                    clean = _clean_runs(
                        source, target, chunk, source_hooks, starts, want_kv, mids, offload
                    )
                end = int(chunk.last_target_position.max()) + 1
                for idx, start, first in groups:
                    group = [variants[i] for i in idx]
                    if first >= end:  # nothing a target position can see changes
                        logits = clean.target_logits[None].expand(
                            len(group), *clean.target_logits.shape
                        )
                    else:
                        logits = _run_group(target, group, chunk, sl, clean, start, first)
                    for i, lg in zip(idx, logits):
                        per_prompt[i, sl] = metric(
                            lg, chunk, clean.source_logits, clean.target_logits
                        ).cpu()
                    pbar.update(1)
        finally:
            pbar.close()
    return SweepScores(
        per_prompt=per_prompt, baseline=baseline, reference=reference, left_out=left_out
    )
