"""unlearnlens: has an unlearned language model forgotten, or does it only hide what it knows?"""

from unlearnlens import metrics
from unlearnlens.errors import (
    IncompatibleModelsError,
    UnlearnLensError,
)
from unlearnlens.prompts import PromptSet, format_question

__all__ = [
    "IncompatibleModelsError",
    "PromptSet",
    "UnlearnLensError",
    "format_question",
    "metrics",
]
__version__ = "0.1.0"
