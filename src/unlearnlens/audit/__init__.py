"""Is it really gone? Recovery attacks and memorisation metrics, side by side.

:func:`audit` (also ``unlearnlens.audit``) runs every probe on the same forget prompts and
puts their recovery on one scale (:class:`AuditResult`). The pieces:

* :mod:`~unlearnlens.audit.memorisation`: membership scores (LOSS, zlib, Min-K%, Min-K%++)
  with their forget-vs-holdout AUC, the truth ratio and extraction strength;
* :mod:`~unlearnlens.audit.quantization`: round-to-nearest fake quantization;
* :mod:`~unlearnlens.audit.prompting`: few-shot, template and held-out-fact prompts;
* :mod:`~unlearnlens.audit.probes`: per-layer linear probes on the residual stream;
* :mod:`~unlearnlens.audit.base` and :mod:`~unlearnlens.audit.builtin`: the probe interface,
  the registry and the built-in probes.

Import submodules with ``from unlearnlens.audit.memorisation import ...``: the top-level name
``unlearnlens.audit`` is the function.
"""

from unlearnlens.audit.audit import audit
from unlearnlens.audit.base import (
    KNOWLEDGE_METRICS,
    AuditData,
    Probe,
    ProbeScore,
    available_probes,
    get_probe,
    knowledge,
    register_probe,
    unregister_probe,
)
from unlearnlens.audit.builtin import (
    ExtractionProbe,
    InContextProbe,
    LinearProbe,
    MembershipProbe,
    ParaphraseProbe,
    QuantizationProbe,
    RelearnProbe,
    RestoreProbe,
    TemplateProbe,
    TruthRatioProbe,
)
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
from unlearnlens.audit.result import AuditResult, AuditRow

__all__ = [
    "KNOWLEDGE_METRICS",
    "MEMBERSHIP_SCORES",
    "QUANTIZABLE",
    "AuditData",
    "AuditResult",
    "AuditRow",
    "ExtractionProbe",
    "InContextProbe",
    "LinearProbe",
    "MembershipProbe",
    "ParaphraseProbe",
    "Probe",
    "ProbeScore",
    "QuantizationProbe",
    "RelearnProbe",
    "RestoreProbe",
    "TemplateProbe",
    "TruthRatioProbe",
    "answer_losses",
    "audit",
    "available_probes",
    "extraction_strength",
    "fake_quantize",
    "get_probe",
    "knowledge",
    "loss_scores",
    "membership_auc",
    "min_k_plus_plus_scores",
    "min_k_scores",
    "quantization_step",
    "quantize_matrix",
    "register_probe",
    "truth_ratio_forget",
    "truth_ratio_retain",
    "truth_ratios",
    "unregister_probe",
    "zlib_scores",
]
