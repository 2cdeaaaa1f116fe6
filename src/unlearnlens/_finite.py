"""A model with NaN or infinite weights is refused before an analysis, not reported as NaN.

Every score of a sweep on such a model is NaN (or every prompt is dropped from KRS), and the
cause, one bad tensor, is nowhere in the result. :func:`check_finite` reads every parameter once
(one ``isfinite`` reduction per tensor and a single device synchronisation per device, far
less than one forward pass) and raises :class:`~unlearnlens.errors.NonFiniteModelError` naming
the first bad parameter. Buffers (masks, rotary tables) are not checked: TransformerLens
fills attention masks with ``-inf`` on purpose.

A call that runs many analyses on the same models (:func:`unlearnlens.dissect`) checks them
once and runs the analyses inside :func:`finite_checked`, so their own checks do not read every
parameter again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch

from unlearnlens.errors import NonFiniteModelError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["check_finite", "finite_checked"]

_CHECKED: ContextVar[frozenset[int]] = ContextVar("unlearnlens_finite_checked", default=frozenset())


@contextmanager
def finite_checked(*models: HookedTransformer) -> Iterator[None]:
    """Within the block, :func:`check_finite` passes ``models`` without reading them again.

    For a caller that has just checked them and holds them unchanged for the block's length
    (weights swapped in by a restoration come from another checked model).
    """
    token = _CHECKED.set(_CHECKED.get() | {id(m) for m in models})
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_finite(model: HookedTransformer, what: str = "model") -> None:
    """Raises if a parameter of ``model`` holds a NaN or an infinity.

    Args:
        model: The model to check.
        what: How the message names the model (``"base model"``, ``"unlearned model 'npo'"``).

    Raises:
        NonFiniteModelError: Names the model, the first non-finite parameter, and how many of
            its values are NaN or infinite.
    """
    if id(model) not in _CHECKED.get():
        _scan(model, what)


def _scan(model: HookedTransformer, what: str) -> None:
    params = list(model.named_parameters())
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, p) in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    bad: list[int] = []
    with torch.no_grad():
        for indices in by_device.values():
            flags = torch.stack([torch.isfinite(params[i][1]).all() for i in indices])
            if not bool(flags.all()):
                bad += [i for i, ok in zip(indices, flags.tolist()) if not ok]
    if not bad:
        return
    name, p = params[min(bad)]
    n_nan, n_inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
    label = getattr(model.cfg, "model_name", None)
    raise NonFiniteModelError(
        f"{what}{f' ({label})' if label else ''} has non-finite weights: parameter {name!r} "
        f"holds {n_nan} NaN and {n_inf} infinite values of {p.numel()}"
        + (f" ({len(bad) - 1} more parameters too)" if len(bad) > 1 else "")
        + "; every score computed from it would be NaN",
        parameter=name,
    )
