"""One switch for every progress bar unlearnlens shows.

Every function that can show a bar takes ``progress: bool | None = None``. ``None`` follows the
library-wide setting: :func:`set_progress` in code, else the environment variable
``UNLEARNLENS_PROGRESS`` (``0``/``false``/``off``/``no`` turn bars off), else on. Bars use
``tqdm.auto`` (widgets in Jupyter when ``ipywidgets`` is installed), falling back to the plain
terminal bar where the notebook one cannot be drawn, so no ``TqdmWarning`` reaches the user.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.std import tqdm as _std_tqdm

from unlearnlens.errors import ConfigError

__all__ = ["ENV_VAR", "bar", "progress_enabled", "set_progress"]

ENV_VAR = "UNLEARNLENS_PROGRESS"
_OFF = {"0", "false", "off", "no"}
_ON = {"1", "true", "on", "yes", ""}
_setting: bool | None = None

T = TypeVar("T")


def set_progress(enabled: bool | None) -> None:
    """Turns every progress bar on (``True``) or off (``False``); ``None`` defers to the env."""
    global _setting
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"set_progress takes True, False or None, got {enabled!r}")
    _setting = enabled


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a bar: an explicit ``progress`` wins, then the setting, then the env."""
    if progress is not None:
        if not isinstance(progress, bool):
            raise ConfigError(f"progress must be True, False or None, got {progress!r}")
        return progress
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        warnings.warn(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of 0/1/true/false/on/off; bars stay on",
            stacklevel=2,
        )
    return True


def _tqdm_class() -> type:
    try:
        from tqdm.auto import tqdm as auto_tqdm
    except ImportError:  # pragma: no cover - tqdm always ships tqdm.auto
        return _std_tqdm
    if auto_tqdm is _std_tqdm:
        return _std_tqdm
    try:  # the notebook bar needs ipywidgets; without it tqdm warns and draws text
        import ipywidgets  # noqa: F401
    except ImportError:
        return _std_tqdm
    return auto_tqdm


def bar(iterable: Iterable[T] | None = None, *, progress: bool | None = None, **kw: Any) -> Any:
    """A tqdm bar (over ``iterable``, or a manual one with ``total=``), disabled per the switch.

    Args:
        iterable: What to iterate over, or ``None`` for a bar updated by hand.
        progress: ``True``/``False`` to force, ``None`` for the library-wide setting.
        **kw: Passed to ``tqdm`` (``desc``, ``total``, ``leave``, ...).
    """
    enabled = progress_enabled(progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=Warning)
        return _tqdm_class()(iterable, disable=not enabled, **kw)
