"""Compare two models' MLP coefficients, and what each change does to the answer's logit.

The reference study finds that fine-tuning unlearning changes the coefficients of the last
layers far more than the value vectors. :func:`compare_coefficients` makes that checkable
neuron by neuron: which coefficients moved, and how much each move shifts the answer's logit.

Direct logit contributions. The final norm is linear once its scale is fixed, so the logit of
answer token ``a`` at a target position splits exactly into one term per component written to
the residual stream. Neuron ``n`` of layer ``l`` contributes::

    c_n * ((centre(W_out[l][n]) * w_final) @ W_U[:, a]) / s

where ``s`` is the final norm's scale at that position (``ln_final.hook_scale``, as the model
computes it), ``w_final`` the final norm's weight and ``centre`` subtracts the mean over
``d_model`` for LayerNorm (not for RMSNorm). The embeddings, attention outputs, MLP biases, the
final norm's bias and ``b_U`` make up the rest of the logit (before any logit soft-cap).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from unlearnlens import _offload
from unlearnlens._checks import check_batch_size, check_has_mlp, check_int, check_layers
from unlearnlens._finite import check_finite
from unlearnlens._guard import preserved
from unlearnlens.coefficients import (
    capture,
    hook_post_name,
    prompt_batches,
)
from unlearnlens.errors import ConfigError
from unlearnlens.prompts import Prompts, as_promptset

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from transformer_lens import HookedTransformer

__all__ = [
    "CoefficientComparison",
    "NeuronChange",
    "compare_coefficients",
    "neuron_logit_contributions",
]


# ------------------------------------------------------------------------ direct logit parts


def _final_norm_name(model: HookedTransformer) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def _centres(model: HookedTransformer) -> bool:
    return model.cfg.normalization_type in ("LN", "LNPre")


def final_scale(
    model: HookedTransformer, resid: Float[Tensor, "batch answer d_model"]
) -> Float[Tensor, "batch answer"]:
    """The final norm's scale at these residual vectors, as ``ln_final.hook_scale`` holds it.

    Ones for a model without a final norm.
    """
    if model.cfg.normalization_type is None:
        return torch.ones(resid.shape[:2], device=resid.device)
    seen: list[Tensor] = []

    def keep(scale: Tensor, hook: object) -> None:
        seen.append(scale)

    with model.hooks(fwd_hooks=[("ln_final.hook_scale", keep)]):
        model.ln_final(resid)
    return seen[0][..., 0].float()


def answer_logit(
    model: HookedTransformer,
    resid: Float[Tensor, "batch answer d_model"],
    answer_tokens: Int[Tensor, "batch answer"],
    device: torch.device | None = None,
) -> Float[Tensor, "batch answer"]:
    """The answer token's logit (before any soft-cap) from the final residual stream.

    With ``device``, the model's final norm must be there (:func:`unlearnlens._offload.moved`)
    and the unembedding streams there (:func:`unlearnlens._offload.logits`).
    """
    normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
    if device is None:
        logits = model.unembed(normed).float()
    else:
        logits = _offload.logits(model, normed, device).float()
    return logits.gather(-1, answer_tokens.to(logits.device)[..., None])[..., 0]


def readout(
    model: HookedTransformer,
    layer: int,
    answer_tokens: Int[Tensor, "batch answer"],
    device: torch.device | None = None,
) -> Float[Tensor, "batch answer d_mlp"]:
    """``(centre(W_out[n]) * w_final) @ W_U[:, a]`` for every neuron and answer slot, float32.

    Divided by the final norm's scale and multiplied by the coefficient, this is the neuron's
    direct contribution to the logit of ``a``. Computed where ``W_out`` lives, or on
    ``device`` (copying only ``W_out``, the final norm's weight and the answers' columns).
    """
    w_out = model.blocks[layer].mlp.W_out
    w_out = (w_out if device is None else w_out.to(device)).float()  # [d_mlp, d_model]
    if _centres(model):
        w_out = w_out - w_out.mean(-1, keepdim=True)
    w = getattr(model.ln_final, "w", None) if model.cfg.normalization_type is not None else None
    if w is not None:
        w_out = w_out * w.float().to(w_out.device)
    w_u = model.unembed.W_U  # [d_model, d_vocab]
    toks = answer_tokens.to(w_u.device)
    cols = w_u[:, toks.flatten()].float().to(w_out.device)  # [d_model, batch*answer]
    return (w_out @ cols).T.reshape(*toks.shape, -1)


def neuron_logit_contributions(
    model: HookedTransformer,
    prompts: Prompts,
    *,
    layers: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Float[Tensor, "layer batch answer d_mlp"]:
    """Each neuron's direct contribution to the answer token's logit at each target position.

    ``c_n * ((centre(W_out[n]) * w_final) @ W_U[:, a]) / s`` with the model's own weights and
    final-norm scale (see the module docstring). Together with the embeddings, attention
    outputs, biases, the final norm's bias and ``b_U``, these add up exactly to the answer
    logit before any soft-cap.

    Args:
        model: The model to read.
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        layers: Layers to read; all by default.
        batch_size: Prompts per forward pass; all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).

    Returns:
        ``[layer, batch, answer, d_mlp]`` float32 contributions on the model's device, zero at
        padded answer slots.

    Raises:
        LayerError: A layer out of range.
        PromptError: Bad prompts.
    """
    check_has_mlp(model, "neuron_logit_contributions")
    layer_list = check_layers(model, layers)
    ps = as_promptset(model, prompts)
    check_finite(model)
    names = [hook_post_name(layer) for layer in layer_list] + [_final_norm_name(model)]
    out: list[Tensor] = []
    with preserved(model):
        for _, chunk in prompt_batches(ps, batch_size, progress, "neuron contributions"):
            acts = capture(
                model, chunk, names, chunk.target_positions, stop_at_layer=model.cfg.n_layers
            )
            scale = final_scale(model, acts[names[-1]])
            mask = chunk.answer_mask.to(scale.device)
            parts = [
                acts[hook_post_name(layer)].float()
                * readout(model, layer, chunk.answer_tokens)
                / scale[..., None]
                * mask[..., None]
                for layer in layer_list
            ]
            out.append(torch.stack(parts))
    width = ps.max_answer_len
    return torch.cat(
        [torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[2])) for p in out], dim=1
    )


# ------------------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class NeuronChange:
    """How one neuron's coefficient and its pull on the answer logit changed.

    All values are means over the real target positions of all prompts.

    Attributes:
        layer: The neuron's layer.
        neuron: Its index in ``d_mlp``.
        base_coefficient: Mean coefficient in the base model.
        unlearned_coefficient: Mean coefficient in the unlearned model.
        mean_delta: Mean of ``c_unlearned - c_base``.
        mean_abs_delta: Mean of ``|c_unlearned - c_base|``.
        logit_effect: Change of its direct contribution to the answer logit, each model read
            with its own ``W_out``, final norm and unembedding.
        coefficient_effect: The part due to the coefficient alone:
            ``(c_unlearned - c_base)`` read out with the base model's weights and scale.
        readout_effect: The rest, ``logit_effect - coefficient_effect``: the change of the
            value vector, final-norm scale and unembedding, at the unlearned coefficients.
    """

    layer: int
    neuron: int
    base_coefficient: float
    unlearned_coefficient: float
    mean_delta: float
    mean_abs_delta: float
    logit_effect: float
    coefficient_effect: float
    readout_effect: float


@dataclass(frozen=True)
class CoefficientComparison:
    """Where and how much two models' MLP coefficients differ, and what it does to the answer.

    Everything is read at the target positions (those that predict the answer tokens) and
    averaged over all real target positions of all prompts. "Logit" means the answer token's
    logit before any soft-cap. A layer's *logit effect* is the change (unlearned minus base)
    of the summed direct contributions of its neurons, each model read with its own weights
    and final-norm scale; these effects plus those of the embeddings, attention outputs and
    biases add up to the change of the answer logit. The *coefficient effect* holds the base
    model's ``W_out``, final norm and unembedding fixed and changes only the coefficients, so
    ``logit_effect = coefficient_effect + readout_effect`` exactly.

    Attributes:
        layers: The compared layers, in the order of every ``layer`` axis.
        n_prompts: Number of prompts.
        n_positions: Number of real target positions averaged over.
        base_logit: Mean answer logit of the base model.
        unlearned_logit: Mean answer logit of the unlearned model.
        mean_abs_delta: Per layer, mean over positions and neurons of ``|c_u - c_b|``.
        relative_shift: Per layer, mean over positions of ``||c_u - c_b|| / ||c_b||``.
        cosine: Per layer, mean over positions of the cosine similarity of ``c_b`` and ``c_u``.
        base_contribution: Per layer, the summed direct contribution of its neurons to the
            base model's answer logit.
        unlearned_contribution: The same in the unlearned model.
        logit_effect: Per layer, ``unlearned_contribution - base_contribution``.
        coefficient_effect: Per layer, the coefficient-only part of ``logit_effect``.
        logit_share: Per layer, ``logit_effect / (unlearned_logit - base_logit)``: the share of
            the change of the answer logit (a drop, after unlearning) that the layer's neurons
            account for. NaN when the logit did not change.
        coefficient_share: Per layer, ``coefficient_effect / (unlearned_logit - base_logit)``.
        neuron_delta: Per neuron, mean ``c_u - c_b``.
        neuron_abs_delta: Per neuron, mean ``|c_u - c_b|``.
        neuron_logit_effect: Per neuron, the change of its direct contribution.
        neuron_coefficient_effect: Per neuron, its coefficient-only effect.
        top_by_coefficient: The ``top_k`` neurons (over all compared layers) with the largest
            mean ``|c_u - c_b|``.
        top_by_logit: The ``top_k`` neurons with the largest ``|logit_effect|``.
    """

    layers: tuple[int, ...]
    n_prompts: int
    n_positions: int
    base_logit: float
    unlearned_logit: float
    mean_abs_delta: Float[Tensor, " layer"]
    relative_shift: Float[Tensor, " layer"]
    cosine: Float[Tensor, " layer"]
    base_contribution: Float[Tensor, " layer"]
    unlearned_contribution: Float[Tensor, " layer"]
    logit_effect: Float[Tensor, " layer"]
    coefficient_effect: Float[Tensor, " layer"]
    logit_share: Float[Tensor, " layer"]
    coefficient_share: Float[Tensor, " layer"]
    neuron_delta: Float[Tensor, "layer d_mlp"]
    neuron_abs_delta: Float[Tensor, "layer d_mlp"]
    neuron_logit_effect: Float[Tensor, "layer d_mlp"]
    neuron_coefficient_effect: Float[Tensor, "layer d_mlp"]
    top_by_coefficient: tuple[NeuronChange, ...]
    top_by_logit: tuple[NeuronChange, ...]

    @property
    def logit_change(self) -> float:
        """``unlearned_logit - base_logit`` (negative when unlearning lowered the answer)."""
        return self.unlearned_logit - self.base_logit

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer with every per-layer field; the logits in ``attrs``."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "layer": list(self.layers),
                "mean_abs_delta": self.mean_abs_delta.tolist(),
                "relative_shift": self.relative_shift.tolist(),
                "cosine": self.cosine.tolist(),
                "base_contribution": self.base_contribution.tolist(),
                "unlearned_contribution": self.unlearned_contribution.tolist(),
                "logit_effect": self.logit_effect.tolist(),
                "coefficient_effect": self.coefficient_effect.tolist(),
                "readout_effect": (self.logit_effect - self.coefficient_effect).tolist(),
                "logit_share": self.logit_share.tolist(),
                "coefficient_share": self.coefficient_share.tolist(),
            }
        )
        frame.attrs.update(
            base_logit=self.base_logit,
            unlearned_logit=self.unlearned_logit,
            n_prompts=self.n_prompts,
            n_positions=self.n_positions,
        )
        return frame

    def neurons_dataframe(self, by: Literal["logit", "coefficient"] = "logit") -> pd.DataFrame:
        """The top neurons as a table, ranked by ``|logit_effect|`` or by mean ``|Δc|``."""
        import pandas as pd

        if by not in ("logit", "coefficient"):
            raise ConfigError(f"by must be 'logit' or 'coefficient', got {by!r}")
        rows = self.top_by_logit if by == "logit" else self.top_by_coefficient
        return pd.DataFrame([vars(r) for r in rows], columns=list(NeuronChange.__annotations__))

    def plot(self, ax: Sequence[Axes] | None = None) -> tuple[Axes, Axes, Axes]:
        """Three panels over layers: coefficient shift, cosine, and shares of the logit change.

        Args:
            ax: Three matplotlib Axes to draw on (a new 1 x 3 figure by default).

        Returns:
            The three Axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, axes = plt.subplots(1, 3, figsize=(13, 3.5))
            ax0, ax1, ax2 = axes
        else:
            panels = list(ax)
            if len(panels) != 3:
                raise ConfigError(f"plot(ax=...) takes three Axes, got {len(panels)}")
            ax0, ax1, ax2 = panels
        x = list(self.layers)
        ax0.plot(x, self.relative_shift.numpy(), marker="o", label="||Δc|| / ||c_base||")
        ax0.plot(x, self.mean_abs_delta.numpy(), marker="s", label="mean |Δc|")
        ax0.set_xlabel("layer")
        ax0.set_title("coefficient shift")
        ax0.legend(fontsize="small")
        ax1.plot(x, self.cosine.numpy(), marker="o", color="C2")
        ax1.set_xlabel("layer")
        ax1.set_title("cosine(c_base, c_unlearned)")
        width = 0.4
        ax2.bar([v - width / 2 for v in x], self.logit_share.numpy(), width, label="total")
        ax2.bar(
            [v + width / 2 for v in x],
            self.coefficient_share.numpy(),
            width,
            label="coefficients only",
        )
        ax2.axhline(0.0, color="grey", lw=0.8)
        ax2.set_xlabel("layer")
        ax2.set_title(f"share of answer-logit change ({self.logit_change:+.3g})")
        ax2.legend(fontsize="small")
        if ax is None:
            ax0.figure.tight_layout()
        return ax0, ax1, ax2

    def __repr__(self) -> str:
        top = ", ".join(f"L{r.layer}N{r.neuron}" for r in self.top_by_logit[:5])
        return (
            f"CoefficientComparison({len(self.layers)} layers, {self.n_prompts} prompts; answer "
            f"logit {self.base_logit:.4g} -> {self.unlearned_logit:.4g}; top neurons by logit "
            f"effect: {top})"
        )


def _check_pair(base: HookedTransformer, unlearned: HookedTransformer) -> None:
    from unlearnlens.models import check_compatible

    check_compatible(base, unlearned)
    check_finite(base, "base model")
    check_finite(unlearned, "unlearned model")


def compare_coefficients(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    layers: int | Sequence[int] | None = None,
    top_k: int = 20,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> CoefficientComparison:
    """Compares two models' MLP coefficients on the same prompts, neuron by neuron.

    At each target position (the positions whose outputs predict the answer tokens), both
    models are run and their coefficients ``c_b``, ``c_u`` read. Per layer the result has the
    coefficient shift (mean ``|Δc|``, ``||Δc|| / ||c_b||``, cosine) and the change of the
    layer's direct contribution to the answer logit, split into the coefficient-only part
    (base weights held fixed) and the read-out part; per neuron the same, and the ``top_k``
    neurons by ``|Δc|`` and by ``|logit effect|``. See :class:`CoefficientComparison` for the
    exact definitions. Memory stays at one batch: the per-neuron means are reduced as the
    batches go.

    Args:
        base: The original model.
        unlearned: The unlearned model (same architecture and tokenizer).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        layers: Layers to compare; all by default.
        top_k: How many neurons each ranking lists.
        batch_size: Prompts per forward pass (per model); all at once by default.
        progress: Show a progress bar over batches (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).

    Raises:
        IncompatibleModelsError: The models differ in architecture (e.g. ``d_mlp``) or
            tokenizer.
        LayerError: A layer out of range.
        ConfigError: ``top_k`` not a positive integer.
        PromptError: Bad prompts.
    """
    _check_pair(base, unlearned)
    check_has_mlp(base, "compare_coefficients")
    layer_list = check_layers(base, layers)
    top_k = check_int(top_k, "top_k", minimum=1)
    batch_size = check_batch_size(batch_size)
    ps = as_promptset(base, prompts)
    ps.check_fits(unlearned)

    # A base model that lives off the unlearned model's device runs there block by block.
    offload = _offload.pair_offload(base, unlearned)
    dev = base.cfg.device if offload is None else offload
    n_l, d_mlp = len(layer_list), base.cfg.d_mlp
    names = [hook_post_name(layer) for layer in layer_list] + [_final_norm_name(base)]
    acc = {
        k: torch.zeros(n_l, d_mlp, dtype=torch.float64, device=dev)
        for k in ("cb", "cu", "d", "abs_d", "contrib_b", "contrib_u", "coef_eff")
    }
    cos_sum = torch.zeros(n_l, dtype=torch.float64, device=dev)
    rel_sum = torch.zeros(n_l, dtype=torch.float64, device=dev)
    z_sum = {"b": 0.0, "u": 0.0}
    count = 0

    with preserved(base, unlearned):
        for _, chunk in prompt_batches(ps, batch_size, progress, "compare coefficients"):
            pos, toks = chunk.target_positions, chunk.answer_tokens
            mask = chunk.answer_mask.to(dev)
            w = mask.double()[..., None]
            read = {}
            for key, model, on in (("b", base, offload), ("u", unlearned, None)):
                n = model.cfg.n_layers
                acts = capture(model, chunk, names, pos, stop_at_layer=n, device=on)
                resid = acts[names[-1]]
                with _offload.moved(on, *_offload.final_norm(model)):
                    read[key] = (acts, final_scale(model, resid).to(dev))
                    z = answer_logit(model, resid, toks, on).to(dev)
                z_sum[key] += float((z.double() * mask).sum())
            count += int(mask.sum())
            (acts_b, s_b), (acts_u, s_u) = read["b"], read["u"]
            for i, layer in enumerate(layer_list):
                name = hook_post_name(layer)
                cb = acts_b[name].float().to(dev)
                cu = acts_u[name].float().to(dev)
                r_b = readout(base, layer, toks, offload).to(dev) / s_b[..., None]
                r_u = readout(unlearned, layer, toks).to(dev) / s_u[..., None]
                delta = cu - cb
                acc["cb"][i] += (cb * w).sum((0, 1))
                acc["cu"][i] += (cu * w).sum((0, 1))
                acc["d"][i] += (delta * w).sum((0, 1))
                acc["abs_d"][i] += (delta.abs() * w).sum((0, 1))
                acc["contrib_b"][i] += (cb * r_b * w).sum((0, 1))
                acc["contrib_u"][i] += (cu * r_u * w).sum((0, 1))
                acc["coef_eff"][i] += (delta * r_b * w).sum((0, 1))
                cos = torch.nn.functional.cosine_similarity(cb, cu, dim=-1, eps=1e-12)
                cos_sum[i] += (cos * mask).sum()
                rel = delta.norm(dim=-1) / cb.norm(dim=-1).clamp(min=1e-12)
                rel_sum[i] += (rel * mask).sum()

    mean = {k: (v / count).float().cpu() for k, v in acc.items()}
    z_b, z_u = z_sum["b"] / count, z_sum["u"] / count
    change = z_u - z_b
    neuron_logit = mean["contrib_u"] - mean["contrib_b"]
    logit_effect = neuron_logit.sum(-1)
    coef_effect = mean["coef_eff"].sum(-1)
    if abs(change) <= 1e-9 * (1.0 + abs(z_b)):
        warnings.warn(
            "the mean answer logit is the same in both models, so the shares of its change are "
            "undefined (NaN)",
            stacklevel=2,
        )
        denom = math.nan
    else:
        denom = change

    def change_of(li: int, n: int) -> NeuronChange:
        return NeuronChange(
            layer=layer_list[li],
            neuron=n,
            base_coefficient=float(mean["cb"][li, n]),
            unlearned_coefficient=float(mean["cu"][li, n]),
            mean_delta=float(mean["d"][li, n]),
            mean_abs_delta=float(mean["abs_d"][li, n]),
            logit_effect=float(neuron_logit[li, n]),
            coefficient_effect=float(mean["coef_eff"][li, n]),
            readout_effect=float(neuron_logit[li, n] - mean["coef_eff"][li, n]),
        )

    def top(score: Tensor) -> tuple[NeuronChange, ...]:
        k = min(top_k, score.numel())
        idx = score.flatten().topk(k).indices.tolist()
        return tuple(change_of(i // d_mlp, i % d_mlp) for i in idx)

    return CoefficientComparison(
        layers=tuple(layer_list),
        n_prompts=len(ps),
        n_positions=count,
        base_logit=z_b,
        unlearned_logit=z_u,
        mean_abs_delta=mean["abs_d"].mean(-1),
        relative_shift=(rel_sum / count).float().cpu(),
        cosine=(cos_sum / count).float().cpu(),
        base_contribution=mean["contrib_b"].sum(-1),
        unlearned_contribution=mean["contrib_u"].sum(-1),
        logit_effect=logit_effect,
        coefficient_effect=coef_effect,
        logit_share=logit_effect / denom,
        coefficient_share=coef_effect / denom,
        neuron_delta=mean["d"],
        neuron_abs_delta=mean["abs_d"],
        neuron_logit_effect=neuron_logit,
        neuron_coefficient_effect=mean["coef_eff"],
        top_by_coefficient=top(mean["abs_d"]),
        top_by_logit=top(neuron_logit.abs()),
    )
