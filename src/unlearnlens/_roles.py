"""Which model is the base and which the unlearned one, where the library made them.

Every function that takes two models takes the source (base) first and the target
(unlearned) second. A model cannot say what it is, but the library knows the models it made:
:func:`unlearnlens.unlearn` returns an unlearned model and :func:`unlearnlens.toy.train_base`
a base model. They are remembered here (weakly: nothing is kept alive, nothing is written
onto the model), so a call that passes them the wrong way round is caught: an error where the
target would be changed (:func:`unlearnlens.restored`, :func:`unlearnlens.restore_`), a
warning elsewhere (patching or scoring in the other direction is a valid experiment). A copy
(``copy.deepcopy``) is a new model the library did not make, with no role.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from unlearnlens.errors import ArgumentOrderError, ArgumentOrderWarning, ConfigError

__all__ = ["check_models", "check_order", "mark_base", "mark_unlearned"]

_BASE: weakref.WeakSet[Any] = weakref.WeakSet()
_UNLEARNED: weakref.WeakSet[Any] = weakref.WeakSet()


def mark_base(model: Any) -> Any:
    """Remembers ``model`` as a base (original) model; returns it."""
    _UNLEARNED.discard(model)
    _BASE.add(model)
    return model


def mark_unlearned(model: Any) -> Any:
    """Remembers ``model`` as an unlearned model; returns it."""
    _BASE.discard(model)
    _UNLEARNED.add(model)
    return model


def _swapped(source: Any, target: Any) -> bool:
    try:
        source_unlearned = source in _UNLEARNED and target not in _UNLEARNED
        target_base = target in _BASE and source not in _BASE
    except TypeError:  # not hashable: not a model the library made
        return False
    return source_unlearned or target_base


def check_order(source: Any, target: Any, *, function: str, changes_target: bool) -> None:
    """Raises (or warns) when the library's own roles say base and unlearned are swapped.

    Args:
        source: The first model argument (documented as the base model).
        target: The second model argument (documented as the unlearned model).
        function: The public function's name, for the message.
        changes_target: Whether the function changes the target's weights (then it raises).

    Raises:
        ArgumentOrderError: ``changes_target`` and the models are swapped.
    """
    if not _swapped(source, target):
        return
    message = (
        f"{function}(base, unlearned, ...) takes the base model first and the unlearned model "
        "second, but the first model given is one ul.unlearn returned (or the second is the "
        f"base model ul.toy.train_base returned). Call {function}(base=..., unlearned=...)"
    )
    if changes_target:
        raise ArgumentOrderError(
            f"{message}; nothing was changed. To restore in the other direction on purpose, pass "
            "copies (copy.deepcopy), which carry no role."
        )
    warnings.warn(
        f"{message}; to run the other way round on purpose, filter ArgumentOrderWarning.",
        ArgumentOrderWarning,
        stacklevel=3,
    )


def check_models(source: Any, target: Any, function: str) -> None:
    """Rejects a dict of models where one model is taken, pointing to :func:`dissect`.

    Raises:
        ConfigError: ``source`` or ``target`` is a mapping (several models).
    """
    for role, value in (("base", source), ("unlearned", target)):
        if isinstance(value, Mapping):
            raise ConfigError(
                f"{function} takes one {role} model, got a dict of {len(value)} models for "
                f"{role!r}. To study several unlearned models at once use "
                f"ul.dissect(base, {{name: model, ...}}, prompts), or call {function} once per "
                "model."
            )
