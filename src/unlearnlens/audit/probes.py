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

__all__ = [
    "LinearProbes",
    "class_accuracy",
    "fit_linear_probes",
    "last_prompt_residuals",
    "pairwise_class_accuracy",
]


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
        """The probes' decision scores for every class (two-class probes: ``-s/2, s/2``)."""
        self._check(resid)
        out = []
        for m, r in zip(self.models, resid):
            s = torch.as_tensor(m.decision_function(r.numpy()), dtype=torch.float32)
            out.append(torch.stack([-s / 2, s / 2], dim=-1) if s.ndim == 1 else s)
        return torch.stack(out)

    def class_index(self, tokens: Int[Tensor, "..."]) -> Int[Tensor, "..."]:
        """The class index of each token id (-1 for ids that are not a class)."""
        lookup = {t: i for i, t in enumerate(self.classes)}
        return torch.tensor(
            [lookup.get(int(t), -1) for t in tokens.flatten()], dtype=torch.long
        ).reshape(tokens.shape)

    def accuracy(
        self, resid: Float[Tensor, "layer batch d_model"], labels: Int[Tensor, " batch"]
    ) -> Float[Tensor, " layer"]:
        """Per layer, the share of rows whose top class is the label (unknown labels miss)."""
        return class_accuracy(self.scores(resid), self.class_index(labels))

    def pairwise_accuracy(
        self,
        resid: Float[Tensor, "layer batch d_model"],
        labels: Int[Tensor, " batch"],
        distractors: Sequence[Sequence[int]],
    ) -> Float[Tensor, " layer"]:
        """Per layer, the share of rows scoring the label above all their known distractors.

        See :func:`pairwise_class_accuracy`; distractors are token ids.
        """
        d_idx = [
            self.class_index(torch.tensor(list(d), dtype=torch.long)).tolist() for d in distractors
        ]
        return pairwise_class_accuracy(self.scores(resid), self.class_index(labels), d_idx)


def class_accuracy(
    scores: Float[Tensor, "layer batch n_classes"], label_index: Int[Tensor, " batch"]
) -> Float[Tensor, " layer"]:
    """Per layer, the share of rows whose top-scoring class is their label (-1 never is)."""
    return (scores.argmax(-1) == label_index[None]).float().mean(-1)


def pairwise_class_accuracy(
    scores: Float[Tensor, "layer batch n_classes"],
    label_index: Int[Tensor, " batch"],
    distractor_index: Sequence[Sequence[int]],
) -> Float[Tensor, " layer"]:
    """Per layer, the share of rows whose label scores above every one of their distractors.

    Distractor indices below 0 (not a class) or equal to the label are ignored, and rows left
    without a distractor are left out; a row whose label is not a class (-1) counts as a miss.

    Raises:
        ConfigError: No row has a distractor.
    """
    hits: list[Tensor] = []
    for i, ds in enumerate(distractor_index):
        label = int(label_index[i])
        d = [j for j in ds if j >= 0 and j != label]
        if not d:
            continue
        if label < 0:
            hits.append(torch.zeros(scores.shape[0]))
        else:
            hits.append((scores[:, i, label] > scores[:, i, d].amax(-1)).float())
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
