"""Linear probes: where is the answer still linearly present in the residual stream?

A probe per layer is fitted on the *base* model's residual stream (after the block, at the
last prompt position, the position that predicts the answer's first token) to decode the
answer's first token. The same probes, unchanged, then read the *unlearned* model's residual
stream. If unlearning erased the knowledge, they fail there; if it only suppressed the output,
they still decode the answer, from the layers where the base model computes it.

Two read-outs: ``"token"`` (the probe's top class is the answer's first token) and
``"distractor"`` (the probe scores the answer above every distractor's first token), the
linear-probe form of a multiple-choice test.

The fitting is scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` on
standardised features (the ``probes`` extra: ``pip install 'unlearnlens[probes]'``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from unlearnlens._checks import check_float, check_int, check_layers
from unlearnlens._guard import preserved
from unlearnlens.errors import ConfigError
from unlearnlens.runner import default_batch_size

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.prompts import PromptSet

__all__ = ["LinearProbes", "fit_linear_probes", "last_prompt_residuals"]


def _sklearn() -> Any:
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ImportError(
            "linear probes need scikit-learn: pip install 'unlearnlens[probes]' (or scikit-learn)"
        ) from None
    return LogisticRegression, make_pipeline, StandardScaler


def last_prompt_residuals(
    model: HookedTransformer,
    prompts: PromptSet,
    *,
    layers: int | Iterable[int] | None = None,
    batch_size: int | None = None,
) -> Float[Tensor, "layer batch d_model"]:
    """The residual stream after each block (``hook_resid_post``) at each prompt's last token.

    Args:
        model: The model; it comes back unchanged.
        prompts: The prompts (only the prompt part of each sequence is run).
        layers: Blocks to read; ``None`` for all.
        batch_size: Most prompts per forward pass.

    Returns:
        Float32 residuals on the CPU, one row per layer of ``layers``.
    """
    chosen = check_layers(model, layers)
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
    names = {f"blocks.{layer}.hook_resid_post" for layer in chosen}
    stop = max(chosen) + 1
    out = []
    with preserved(model):
        for _, chunk in prompts.batches(batch_size or default_batch_size(prompts)):
            end = int(chunk.prompt_lengths.max())
            device = model.cfg.device
            _, cache = model.run_with_cache(
                chunk.tokens[:, :end].to(device),
                attention_mask=chunk.attention_mask[:, :end].to(device),
                stop_at_layer=stop,
                names_filter=lambda name: name in names,
            )
            last = (chunk.prompt_lengths - 1).to(device)
            rows = torch.arange(len(chunk), device=device)
            out.append(
                torch.stack(
                    [
                        cache[f"blocks.{layer}.hook_resid_post"][rows, last].float().cpu()
                        for layer in chosen
                    ]
                )
            )
    return torch.cat(out, dim=1)


@dataclass(frozen=True)
class LinearProbes:
    """One fitted logistic-regression probe per layer.

    Attributes:
        layers: The layer each probe reads.
        classes: The token ids the probes decode (the training labels), in class order.
        models: The fitted scikit-learn pipelines (scaler + logistic regression), per layer.
    """

    layers: tuple[int, ...]
    classes: tuple[int, ...]
    models: tuple[Any, ...]

    def _check(self, resid: Tensor) -> None:
        if resid.ndim != 3 or resid.shape[0] != len(self.layers):
            raise ConfigError(
                f"residuals must be [layer, batch, d_model] with {len(self.layers)} layers, got "
                f"shape {tuple(resid.shape)}"
            )

    def scores(
        self, resid: Float[Tensor, "layer batch d_model"]
    ) -> Float[Tensor, "layer batch n_classes"]:
        """The probes' decision scores (log-odds) for every class."""
        self._check(resid)
        return torch.stack(
            [
                torch.as_tensor(m.decision_function(r.numpy()), dtype=torch.float32).reshape(
                    r.shape[0], -1
                )
                for m, r in zip(self.models, resid)
            ]
        )

    def _class_index(self, tokens: Tensor) -> Tensor:
        lookup = {t: i for i, t in enumerate(self.classes)}
        return torch.tensor([lookup.get(int(t), -1) for t in tokens.flatten()]).reshape(
            tokens.shape
        )

    def accuracy(
        self, resid: Float[Tensor, "layer batch d_model"], labels: Int[Tensor, " batch"]
    ) -> Float[Tensor, " layer"]:
        """Per layer, the share of rows whose top class is the label (unknown labels miss)."""
        s = self.scores(resid)
        if len(self.classes) == 2:  # binary: one score, for the second class
            pred = (s[..., 0] > 0).long()
        else:
            pred = s.argmax(-1)
        idx = self._class_index(labels)
        return (pred == idx[None]).float().mean(-1)

    def pairwise_accuracy(
        self,
        resid: Float[Tensor, "layer batch d_model"],
        labels: Int[Tensor, " batch"],
        distractors: Sequence[Sequence[int]],
    ) -> Float[Tensor, " layer"]:
        """Per layer, the share of rows scoring the label above all their known distractors.

        Rows whose label is not a class count as misses; distractors that are not classes are
        ignored; rows left without a distractor are left out.
        """
        s = self.scores(resid)
        if len(self.classes) == 2:
            s = torch.stack([-s[..., 0], s[..., 0]], dim=-1) / 2
        idx = self._class_index(labels)
        hits: list[Tensor] = []
        for i, ds in enumerate(distractors):
            d_idx = [
                j
                for j in self._class_index(torch.tensor(list(ds), dtype=torch.long)).tolist()
                if j >= 0 and j != int(idx[i])
            ]
            if not d_idx:
                continue
            if int(idx[i]) < 0:
                hits.append(torch.zeros(s.shape[0]))
                continue
            hits.append((s[:, i, int(idx[i])] > s[:, i, d_idx].amax(-1)).float())
        if not hits:
            raise ConfigError("no prompt has a distractor among the probes' classes")
        return torch.stack(hits, dim=-1).mean(-1)


def fit_linear_probes(
    resid: Float[Tensor, "layer batch d_model"],
    labels: Int[Tensor, " batch"],
    *,
    layers: Sequence[int] | None = None,
    c: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> LinearProbes:
    """Fits one standardised logistic-regression probe per layer.

    Args:
        resid: Training residuals, ``[layer, batch, d_model]``.
        labels: The class (token id) of each row.
        layers: The layer index of each row of ``resid`` (default ``0 .. n-1``).
        c: Inverse L2 regularisation strength (scikit-learn's ``C``).
        max_iter: Solver iterations.
        seed: The solver's random state.

    Raises:
        ConfigError: Fewer than two classes, or mismatched shapes.
        ImportError: scikit-learn is not installed.
    """
    logistic, pipeline, scaler = _sklearn()
    c = check_float(c, "c", positive=True)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    if resid.ndim != 3 or resid.shape[1] != labels.shape[0]:
        raise ConfigError(
            f"resid must be [layer, batch, d_model] with batch = len(labels) = {len(labels)}, "
            f"got shape {tuple(resid.shape)}"
        )
    y = labels.numpy().astype(np.int64)
    classes = tuple(int(v) for v in np.unique(y))
    if len(classes) < 2:
        raise ConfigError(f"a probe needs at least two classes, the labels hold {len(classes)}")
    fitted = []
    for r in resid:
        m = pipeline(scaler(), logistic(C=c, max_iter=max_iter, random_state=seed))
        m.fit(r.numpy(), y)
        fitted.append(m)
    lay = tuple(range(resid.shape[0])) if layers is None else tuple(int(v) for v in layers)
    return LinearProbes(layers=lay, classes=classes, models=tuple(fitted))
