"""Give the caller's models back exactly as they came in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

__all__ = ["preserved"]


@contextmanager
def _one(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    hooks = {
        hp: (list(hp.fwd_hooks), list(hp.bwd_hooks))
        for hp in model.modules()
        if isinstance(hp, HookPoint)
    }
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for hp, (fwd, bwd) in hooks.items():
            for handle in [h for h in hp.fwd_hooks if not any(h is f for f in fwd)]:
                handle.hook.remove()
                hp.fwd_hooks.remove(handle)
            for handle in [h for h in hp.bwd_hooks if not any(h is b for b in bwd)]:
                handle.hook.remove()
                hp.bwd_hooks.remove(handle)
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


@contextmanager
def preserved(*models: nn.Module, eval_mode: bool = True, no_grad: bool = True) -> Iterator[None]:
    """Runs a block on models and restores their hooks, train/eval modes and grad flags after.

    Whatever happens inside (an exception, a KeyboardInterrupt), on exit every model has exactly
    the hooks it had on entry (hooks added inside are removed, the caller's own are kept), each
    module is back in its own train/eval mode, and each parameter has its own ``requires_grad``.
    Weights are not touched here; :func:`unlearnlens.restored` guards those.

    Args:
        *models: The models to guard (the same model may appear twice).
        eval_mode: Put the models in eval mode inside the block.
        no_grad: Run the block under ``torch.no_grad()``.
    """
    seen: list[nn.Module] = []
    for m in models:
        if not any(m is s for s in seen):
            seen.append(m)
    with ExitStack() as stack:
        for m in seen:
            stack.enter_context(_one(m, eval_mode))
        if no_grad:
            stack.enter_context(torch.no_grad())
        yield
