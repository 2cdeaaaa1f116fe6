"""The exceptions unlearnlens raises.

Every error derives from :class:`UnlearnLensError`, so a caller can catch the library's errors
in one clause. Errors about bad arguments also derive from :class:`ValueError` (or the matching
built-in), so code written against plain Python conventions keeps working. Messages name the
hook, layer, model, component or shape at fault.
"""

from __future__ import annotations

__all__ = [
    "ArgumentOrderError",
    "ArgumentOrderWarning",
    "CheckpointError",
    "ComponentError",
    "ConfigError",
    "DataFileError",
    "FileFormatError",
    "HookError",
    "IncompatibleModelsError",
    "LayerError",
    "MetricError",
    "NonFiniteLossError",
    "NonFiniteModelError",
    "PromptError",
    "UnknownMethodError",
    "UnknownProbeError",
    "UnlearnLensError",
    "UnsupportedArchitectureError",
]


class UnlearnLensError(Exception):
    """Base class of every error raised by unlearnlens."""


class IncompatibleModelsError(UnlearnLensError, ValueError):
    """Two models cannot be compared: architecture fields or tokenizers differ."""


class CheckpointError(UnlearnLensError, FileNotFoundError):
    """A checkpoint path is missing, or lacks a file it needs (such as ``config.json``)."""


class UnsupportedArchitectureError(UnlearnLensError, ValueError):
    """A Hugging Face architecture that unlearnlens cannot convert."""


class PromptError(UnlearnLensError, ValueError):
    """Prompts that cannot be used: empty, an empty answer, too long, no tokenizer, ..."""


class HookError(UnlearnLensError, ValueError):
    """An unknown hook name, or a hook the model does not have."""


class LayerError(UnlearnLensError, ValueError):
    """A layer (or neuron) index out of range, or a bad layer window."""


class ComponentError(UnlearnLensError, ValueError):
    """An unknown parameter component, or one this architecture lacks."""


class MetricError(UnlearnLensError, ValueError):
    """An unknown metric, or a metric that returned the wrong shape or type."""


class ConfigError(UnlearnLensError, ValueError):
    """A configuration value out of its allowed range."""


class UnknownMethodError(UnlearnLensError, ValueError):
    """An unlearning method name that is not registered."""


class NonFiniteLossError(UnlearnLensError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""


class FileFormatError(UnlearnLensError, ValueError):
    """A file that is missing, truncated, corrupt or not in the expected format; names the file."""


class NonFiniteModelError(UnlearnLensError, FloatingPointError):
    """A model whose parameters hold NaN or infinite values; names the first such parameter.

    Attributes:
        parameter: The name of the first non-finite parameter (TransformerLens's name).
    """

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class ArgumentOrderError(ConfigError):
    """Base and unlearned model passed the wrong way round to a function that changes one."""


class ArgumentOrderWarning(UserWarning):
    """Base and unlearned model look passed the wrong way round (the source is the unlearned one).

    A warning, not an error, where nothing is changed: patching or scoring in the other
    direction is a valid experiment. Filter it with ``warnings.filterwarnings`` when meant.
    """


class DataFileError(FileFormatError):
    """A prompt data file (pairs, TOFU, WMDP) that is malformed; names the file and line."""


class UnknownProbeError(UnlearnLensError, ValueError):
    """An audit probe name that is not registered."""
