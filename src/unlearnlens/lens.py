"""Per-layer knowledge probes: the logit lens, and attribution patching.

The logit lens reads the residual stream after each block through the model's own final norm
and unembedding, at the positions that predict the answer: the layer at which the answer
becomes likely shows where the model retrieves it, and comparing a base and an unlearned model
shows whether the knowledge is still present in the unlearned model's middle layers and only
suppressed at the end.

Attribution patching estimates, from one forward and one backward pass, the effect that
patching every layer's activation from a source model into a target model would have on a
metric: a first-order Taylor expansion around the target's run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from unlearnlens._checks import check_layers, resolve_hooks
from unlearnlens._finite import check_finite
from unlearnlens._guard import preserved
from unlearnlens.coefficients import capture, prompt_batches
from unlearnlens.errors import MetricError, PromptError
from unlearnlens.metrics import MetricLike, answer_logprob, resolve_metric
from unlearnlens.prompts import Prompts, PromptSet, as_promptset
from unlearnlens.results import SweepResult
from unlearnlens.runner import unembed

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["attribution_patch", "logit_lens", "logit_lens_compare"]

_POSITIONS = ("all", "prompt", "answer", "last")


# ------------------------------------------------------------------------------ logit lens


def _lens(
    model: HookedTransformer, ps: PromptSet, batch_size: int | None, progress: bool | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-prompt answer log-prob, mean rank and accuracy, ``[1 + n_layers, batch]`` each.

    Row 0 reads the embedding (``blocks.0.hook_resid_pre``); row ``l + 1`` the output of
    block ``l`` (``blocks.{l}.hook_resid_post``).
    """
    n = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n)]
    logp, rank, acc = [], [], []
    with preserved(model):
        for _, chunk in prompt_batches(ps, batch_size, progress, "logit lens"):
            acts = capture(model, chunk, names, chunk.target_positions, stop_at_layer=n)
            mask = chunk.answer_mask.to(model.cfg.device)
            toks = chunk.answer_tokens.to(model.cfg.device)
            lp_rows, rank_rows, acc_rows = [], [], []
            for name in names:
                logits = unembed(model, acts[name])  # [batch, answer, d_vocab], float32
                lp_rows.append(answer_logprob(logits, chunk))
                own = logits.gather(-1, toks[..., None])
                r = (logits > own).sum(-1).float()  # 0 = the answer is the top token
                rank_rows.append((r * mask).sum(-1) / mask.sum(-1))
                acc_rows.append(((r == 0) | ~mask).all(-1).float())
            logp.append(torch.stack(lp_rows))
            rank.append(torch.stack(rank_rows))
            acc.append(torch.stack(acc_rows))
    return torch.cat(logp, 1).cpu(), torch.cat(rank, 1).cpu(), torch.cat(acc, 1).cpu()


def logit_lens(
    model: HookedTransformer,
    prompts: Prompts,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """The answer's log-probability and rank read from the residual stream after each layer.

    At each target position, the residual stream after block ``l`` goes through the model's
    final norm and unembedding (and logit soft-cap, if any) as if it were the last block's
    output. The score is ``answer_logprob``: per prompt the mean over its answer tokens of
    ``log p(answer token)``, then the mean over prompts. After the last layer it is the
    model's own answer log-prob.

    Args:
        model: The model to probe.
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        batch_size: Prompts per forward pass; all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).

    Returns:
        A SweepResult with a ``layer`` axis (0 .. n_layers-1, read at
        ``blocks.{l}.hook_resid_post``), metric ``"answer_logprob"``, and ``baseline`` =
        ``reference`` = the model's own score (the last layer's). ``meta`` holds, per layer,
        ``"rank"`` (mean over prompts of the mean over answer tokens of the answer token's
        rank, 0 = top token) and ``"accuracy"`` (the share of prompts whose every answer token
        is the top token), and the same three numbers read from the embeddings alone
        (``blocks.0.hook_resid_pre``) as ``"embed_logprob"``, ``"embed_rank"``,
        ``"embed_accuracy"``. ``per_prompt`` holds the per-prompt log-probs.

    Raises:
        PromptError: Bad prompts.
    """
    ps = as_promptset(model, prompts)
    check_finite(model)
    logp, rank, acc = _lens(model, ps, batch_size, progress)
    own = float(logp[-1].mean())
    return SweepResult(
        scores=logp[1:].mean(-1),
        axes={"layer": list(range(model.cfg.n_layers))},
        metric="answer_logprob",
        baseline=own,
        reference=own,
        meta={
            "kind": "logit_lens",
            "model": model.cfg.model_name,
            "hook": "hook_resid_post",
            "rank": rank[1:].mean(-1),
            "accuracy": acc[1:].mean(-1),
            "embed_logprob": float(logp[0].mean()),
            "embed_rank": float(rank[0].mean()),
            "embed_accuracy": float(acc[0].mean()),
            "n_prompts": len(ps),
        },
        per_prompt=logp[1:],
    )


def logit_lens_compare(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """The logit lens of a base and an unlearned model side by side.

    Where the unlearned model's curve follows the base model's through the middle layers and
    drops only at the end, the answer is still computed and then suppressed: hidden, not
    forgotten.

    Args:
        base: The original model.
        unlearned: The unlearned model (same architecture and tokenizer).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        batch_size: Prompts per forward pass; all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).

    Returns:
        A SweepResult with axes ``{"model": ["base", "unlearned"], "layer": [...]}`` and
        metric ``"answer_logprob"``; ``baseline`` is the unlearned model's own score,
        ``reference`` the base model's. ``meta["rank"]`` and ``meta["accuracy"]`` are
        ``[model][layer]`` lists, ``meta["embed_*"]`` two-element lists (base, unlearned).

    Raises:
        IncompatibleModelsError: The models differ in architecture or tokenizer.
        PromptError: Bad prompts.
    """
    from unlearnlens.models import check_compatible

    check_compatible(base, unlearned)
    check_finite(base, "base model")
    check_finite(unlearned, "unlearned model")
    ps = as_promptset(base, prompts)
    ps.check_fits(unlearned)
    rows = [_lens(m, ps, batch_size, progress) for m in (base, unlearned)]
    logp = torch.stack([r[0] for r in rows])  # [model, 1 + layer, batch]
    rank = torch.stack([r[1] for r in rows])
    acc = torch.stack([r[2] for r in rows])
    return SweepResult(
        scores=logp[:, 1:].mean(-1),
        axes={"model": ["base", "unlearned"], "layer": list(range(base.cfg.n_layers))},
        metric="answer_logprob",
        baseline=float(logp[1, -1].mean()),
        reference=float(logp[0, -1].mean()),
        meta={
            "kind": "logit_lens",
            "models": [base.cfg.model_name, unlearned.cfg.model_name],
            "hook": "hook_resid_post",
            "rank": rank[:, 1:].mean(-1),
            "accuracy": acc[:, 1:].mean(-1),
            "embed_logprob": logp[:, 0].mean(-1),
            "embed_rank": rank[:, 0].mean(-1),
            "embed_accuracy": acc[:, 0].mean(-1),
            "n_prompts": len(ps),
        },
        per_prompt=logp[:, 1:],
    )


# ------------------------------------------------------------------------ attribution patching


def _full_acts(
    model: HookedTransformer, chunk: PromptSet, names: Sequence[str], n: int, *, leaf: bool
) -> tuple[dict[str, Tensor], Tensor]:
    """Activations at ``names`` over the first ``n`` positions, and the target-position logits.

    With ``leaf``, the residual stream entering block 0 is made a leaf that requires grad, so
    that every later activation is differentiable while no parameter is.
    """
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: object) -> None:
        store[hook.name] = act  # type: ignore[attr-defined]

    def make_leaf(act: Tensor, hook: object) -> Tensor:
        return act.detach().requires_grad_(True)

    fwd = ([("blocks.0.hook_resid_pre", make_leaf)] if leaf else []) + [(m, keep) for m in names]
    device = model.cfg.device
    with model.hooks(fwd_hooks=fwd):
        resid = model(
            chunk.tokens[:, :n].to(device),
            attention_mask=chunk.attention_mask[:, :n].to(device),
            stop_at_layer=model.cfg.n_layers,
        )
    idx = chunk.target_positions.to(resid.device)
    final = resid.gather(1, idx[..., None].expand(-1, -1, resid.shape[-1]))
    return store, unembed(model, final)


def attribution_patch(
    source: HookedTransformer,
    target: HookedTransformer,
    prompts: Prompts,
    hooks: str | Sequence[str] = "mlp.hook_post",
    *,
    layers: int | Sequence[int] | None = None,
    positions: Literal["all", "prompt", "answer", "last"] | str = "all",
    metric: MetricLike = "answer_logprob",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """First-order estimate of every layer's patching effect, from one backward pass.

    Patching the source's activation ``a_s`` at a hook into the target (whose activation is
    ``a_t``) changes the metric ``M`` by about ``sum(dM/da (a_t) * (a_s - a_t))``, the sum
    over the patched positions and the activation's features, with the gradient taken on the
    target's unpatched run (attribution patching, Nanda 2023; Syed et al. 2023). One forward
    and one backward pass of the target give the estimate for every layer and hook at once;
    exact patching (:func:`unlearnlens.patch`) needs one run per layer. For
    ``mlp.hook_post`` the per-neuron terms (summed over positions only) are kept too.

    The estimate is exact only to first order. It breaks down when the source and target
    activations differ a lot (a heavily unlearned model against its base: the effect of a
    large patch is not the tangent at the target), when the patch moves the output across a
    saturated softmax (an answer whose probability is near 0 or 1 has a nearly flat log-prob
    for the wrong reasons, and ``answer_prob`` saturates the same way), for strongly
    nonlinear metrics such as KRS (a ratio of squared errors, whose linearisation around the
    target ignores the quadratic term that dominates once the patch recovers much of the
    source), and near ties of attention or of gated activations. Piecewise-constant metrics
    (``accuracy``) have no useful gradient and are refused. Use it to screen layers and
    neurons, then confirm the interesting ones with exact patching.

    Args:
        source: The model activations come from (the base model in the study).
        target: The model they would go into (the unlearned model); the gradient is taken on
            its run.
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        hooks: One block-relative hook name (``"mlp.hook_post"``, ``"hook_attn_out"``,
            ``"hook_resid_pre"``, ...) or several. Several hooks are estimated one by one
            (each as its own single-hook patch), not patched together.
        layers: Layers to estimate; all by default.
        positions: Which positions the patch covers, as in :func:`unlearnlens.patch`:
            ``"all"`` real positions, ``"prompt"`` or ``"answer"`` tokens, or the ``"last"``
            prompt token.
        metric: ``"answer_logprob"`` (default), ``"answer_prob"``, ``"krs"``, ``"recovery"``
            or a differentiable callable ``(logits, prompts) -> [batch]``.
        batch_size: Prompts per forward/backward pass; all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).

    Returns:
        A SweepResult whose scores are the *estimated patched* metric (the target's score
        plus the estimated change), comparable with :func:`unlearnlens.patch`'s. Axes are
        ``{"layer": [...]}`` for one hook given as a string, else ``{"hook": [...], "layer":
        [...]}``. ``baseline`` is the target's score, ``reference`` the source's. For
        ``mlp.hook_post``, ``meta["neuron_effects"]`` is a ``[layer][d_mlp]`` list of the
        estimated change of the metric per neuron (the layer's effect is their sum).

    Raises:
        IncompatibleModelsError: The models differ in architecture or tokenizer.
        HookError: An unknown hook.
        LayerError: A layer out of range.
        MetricError: An unknown or non-differentiable metric.
        PromptError: Bad prompts, or a bad ``positions`` value.
    """
    from unlearnlens.models import check_compatible

    if positions not in _POSITIONS:
        raise PromptError(
            f"positions must be one of {', '.join(repr(p) for p in _POSITIONS)}; got {positions!r}"
        )
    hook_names = resolve_hooks(target, hooks)
    resolve_hooks(source, hooks, what="the source model")
    layer_list = check_layers(target, layers)
    if metric == "accuracy":
        raise MetricError(
            "attribution patching needs a differentiable metric; 'accuracy' is piecewise "
            "constant (its gradient is zero). Use 'answer_logprob', 'answer_prob', 'krs' or "
            "'recovery'"
        )
    bound = resolve_metric(metric)
    check_compatible(source, target)
    check_finite(source, "source model")
    check_finite(target, "target model")
    ps = as_promptset(target, prompts)
    ps.check_fits(source)

    pairs = [(h, layer) for h in hook_names for layer in layer_list]
    names = [f"blocks.{layer}.{h}" for h, layer in pairs]
    neuron_hook = "mlp.hook_post" in hook_names
    n_l, n_p = len(layer_list), len(ps)
    delta = torch.zeros(len(pairs), n_p)  # per (hook, layer) and prompt
    neuron = torch.zeros(n_l, target.cfg.d_mlp, dtype=torch.float64) if neuron_hook else None
    base_pp = torch.zeros(n_p)
    ref_pp = torch.zeros(n_p)

    with preserved(source, target, no_grad=False):
        for p in target.parameters():
            p.requires_grad_(False)
        for rows, chunk in prompt_batches(ps, batch_size, progress, "attribution patching"):
            n = int(chunk.last_target_position.max()) + 1
            with torch.no_grad():
                src_acts, src_logits = _full_acts(source, chunk, names, n, leaf=False)
            with torch.enable_grad():
                tgt_acts, logits = _full_acts(target, chunk, names, n, leaf=True)
                tgt_logits = logits.detach()
                per_prompt = bound(logits, chunk, src_logits, tgt_logits)
                valid = ~per_prompt.detach().isnan()
                total = per_prompt[valid].sum()
                if not total.requires_grad:
                    raise MetricError(
                        f"metric {bound.name!r} is not differentiable in the logits; attribution "
                        "patching needs its gradient"
                    )
                grads = torch.autograd.grad(total, [tgt_acts[m] for m in names], allow_unused=True)
            base_pp[rows] = per_prompt.detach().cpu()
            ref_pp[rows] = bound(src_logits, chunk, src_logits, tgt_logits).cpu()
            mask = chunk.attention_mask[:, :n].bool()
            if positions != "all":
                mask = mask & chunk.position_mask(positions)[:, :n]
            for i, ((h, _), name, grad) in enumerate(zip(pairs, names, grads, strict=True)):
                if grad is None:
                    continue
                diff = src_acts[name].to(grad.device).float() - tgt_acts[name].detach().float()
                term = grad.float() * diff
                m = mask.to(term.device).reshape(*mask.shape, *([1] * (term.ndim - 2)))
                term = term * m
                per_p = term.flatten(1).sum(-1)
                delta[i, rows] = torch.where(valid, per_p, torch.nan).cpu()
                if h == "mlp.hook_post" and neuron is not None:
                    neuron[i % n_l] += term[valid].sum((0, 1)).double().cpu()

    valid_all = ~base_pp.isnan()
    if not bool(valid_all.any()):
        raise ValueError(
            f"metric {bound.name!r} is undefined for every prompt (for KRS: the source and "
            "target models give the same logits at all target positions)"
        )
    if not bool(valid_all.all()):
        warnings.warn(
            f"attribution patching leaves out {int((~valid_all).sum())} of {n_p} prompts whose "
            f"{bound.name} is undefined",
            stacklevel=2,
        )
    raw_base = float(base_pp.nanmean())
    raw_ref = float(ref_pp.nanmean())
    per_prompt_est = base_pp[None, :] + delta  # estimated patched per-prompt scores
    scores = bound.aggregate(per_prompt_est, baseline=raw_base, reference=raw_ref)
    baseline = float(bound.aggregate(base_pp[None], baseline=raw_base, reference=raw_ref)[0])
    reference = float(bound.aggregate(ref_pp[None], baseline=raw_base, reference=raw_ref)[0])

    meta: dict[str, object] = {
        "kind": "attribution_patch",
        "hooks": hook_names,
        "positions": positions,
        "source": source.cfg.model_name,
        "target": target.cfg.model_name,
        "n_prompts": n_p,
        "left_out": int((~valid_all).sum()),
    }
    if neuron is not None:
        effects = neuron / int(valid_all.sum())
        if bound.normalized:
            effects = effects / (raw_ref - raw_base) if raw_ref != raw_base else effects * math.nan
        meta["neuron_effects"] = effects.float()
    if isinstance(hooks, str):
        axes: dict[str, list[object]] = {"layer": list(layer_list)}
        shape = [n_l]
    else:
        axes = {"hook": list(hook_names), "layer": list(layer_list)}
        shape = [len(hook_names), n_l]
    return SweepResult(
        scores=scores.reshape(shape),
        axes=axes,
        metric=bound.name,
        baseline=baseline,
        reference=reference,
        meta=meta,
        per_prompt=per_prompt_est.reshape(*shape, n_p),
    )
