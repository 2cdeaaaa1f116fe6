"""unlearnlens: has an unlearned language model forgotten, or does it only hide what it knows?"""

from unlearnlens import metrics, toy, trainers
from unlearnlens.coefficients import (
    CoefficientStats,
    coefficient_positions,
    mlp_coefficient_stats,
    mlp_coefficients,
)
from unlearnlens.comparison import (
    CoefficientComparison,
    compare_coefficients,
    neuron_logit_contributions,
)
from unlearnlens.concepts import (
    ConceptVector,
    DriftTable,
    concept_vector_drift,
    locate_concept_vectors,
    vocab_projection,
)
from unlearnlens.conceptvectors import Concept, load_conceptvectors
from unlearnlens.errors import (
    CheckpointError,
    ComponentError,
    ConfigError,
    HookError,
    IncompatibleModelsError,
    LayerError,
    MetricError,
    NonFiniteLossError,
    PromptError,
    UnknownMethodError,
    UnlearnLensError,
    UnsupportedArchitectureError,
)
from unlearnlens.lens import attribution_patch, logit_lens, logit_lens_compare
from unlearnlens.models import (
    SUPPORTED_ARCHITECTURES,
    check_compatible,
    load_hf,
    load_model,
    save_model,
)
from unlearnlens.patching import patch, patch_attention, patch_mlp_coefficients, patch_residual
from unlearnlens.prompts import PromptSet, format_question
from unlearnlens.restoration import Restoration, restore_, restore_sweep, restored
from unlearnlens.results import SweepResult
from unlearnlens.trainers import (
    MethodConfig,
    MethodLoss,
    ParamSelection,
    RelearnRun,
    UnlearningMethod,
    UnlearnRun,
    available_methods,
    register_method,
    relearn,
    select_parameters,
    unlearn,
    unregister_method,
)

__all__ = [
    "ComponentError",
    "ConfigError",
    "HookError",
    "LayerError",
    "MethodConfig",
    "MethodLoss",
    "MetricError",
    "NonFiniteLossError",
    "ParamSelection",
    "PromptError",
    "RelearnRun",
    "UnknownMethodError",
    "UnlearnRun",
    "UnlearningMethod",
    "available_methods",
    "register_method",
    "relearn",
    "select_parameters",
    "toy",
    "trainers",
    "unlearn",
    "unregister_method",
    "Restoration",
    "restore_",
    "restore_sweep",
    "restored",
    "Concept",
    "load_conceptvectors",
    "CoefficientComparison",
    "CoefficientStats",
    "ConceptVector",
    "DriftTable",
    "attribution_patch",
    "coefficient_positions",
    "compare_coefficients",
    "concept_vector_drift",
    "locate_concept_vectors",
    "logit_lens",
    "logit_lens_compare",
    "mlp_coefficient_stats",
    "mlp_coefficients",
    "neuron_logit_contributions",
    "vocab_projection",
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "check_compatible",
    "load_hf",
    "load_model",
    "save_model",
    "IncompatibleModelsError",
    "PromptSet",
    "SweepResult",
    "patch",
    "patch_attention",
    "patch_mlp_coefficients",
    "patch_residual",
    "UnlearnLensError",
    "format_question",
    "metrics",
]
__version__ = "0.1.0"
