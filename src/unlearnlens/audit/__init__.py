"""Is it really gone? Recovery attacks and memorisation metrics, side by side.

:mod:`~unlearnlens.audit.memorisation` holds the membership scores (LOSS, zlib, Min-K%,
Min-K%++), the truth ratio and extraction strength; :mod:`~unlearnlens.audit.quantization`
the round-to-nearest fake quantization attack.
"""

from unlearnlens.audit.memorisation import (
    MEMBERSHIP_SCORES,
    answer_losses,
    extraction_strength,
    loss_scores,
    membership_auc,
    min_k_plus_plus_scores,
    min_k_scores,
    truth_ratio_forget,
    truth_ratio_retain,
    truth_ratios,
    zlib_scores,
)
from unlearnlens.audit.quantization import (
    QUANTIZABLE,
    fake_quantize,
    quantization_step,
    quantize_matrix,
)

__all__ = [
    "MEMBERSHIP_SCORES",
    "QUANTIZABLE",
    "answer_losses",
    "extraction_strength",
    "fake_quantize",
    "loss_scores",
    "membership_auc",
    "min_k_plus_plus_scores",
    "min_k_scores",
    "quantization_step",
    "quantize_matrix",
    "truth_ratio_forget",
    "truth_ratio_retain",
    "truth_ratios",
    "zlib_scores",
]
