"""unlearnlens: has an unlearned language model forgotten, or does it only hide what it knows?"""

from unlearnlens import metrics, toy, trainers
from unlearnlens._progress import set_progress
from unlearnlens._seed import seed_everything
from unlearnlens.audit import AuditResult, audit
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
    ArgumentOrderError,
    ArgumentOrderWarning,
    CheckpointError,
    ComponentError,
    ConfigError,
    DataFileError,
    FileFormatError,
    HookError,
    IncompatibleModelsError,
    LayerError,
    MetricError,
    NonFiniteLossError,
    NonFiniteModelError,
    PromptError,
    UnknownMethodError,
    UnknownProbeError,
    UnlearnLensError,
    UnsupportedArchitectureError,
)
from unlearnlens.evaluation import Evaluation, evaluate
from unlearnlens.export import save_hf
from unlearnlens.lens import attribution_patch, logit_lens, logit_lens_compare
from unlearnlens.loaders import load_pairs, load_tofu, load_wmdp
from unlearnlens.models import (
    SUPPORTED_ARCHITECTURES,
    check_compatible,
    load_hf,
    load_model,
    save_model,
)
from unlearnlens.patching import patch, patch_attention, patch_mlp_coefficients, patch_residual
from unlearnlens.prompts import PromptSet, format_question
from unlearnlens.ray_executor import RayExecutor
from unlearnlens.report import write_report
from unlearnlens.restoration import Restoration, restore_, restore_sweep, restored
from unlearnlens.results import SweepResult
from unlearnlens.scoring import score
from unlearnlens.study import ANALYSES, CoefficientTables, StudyResult, dissect
from unlearnlens.suite import Recipe, SuiteCase, run_suite
from unlearnlens.suite_result import SuiteResult
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
    "ANALYSES",
    "SUPPORTED_ARCHITECTURES",
    "ArgumentOrderError",
    "ArgumentOrderWarning",
    "AuditResult",
    "CheckpointError",
    "CoefficientComparison",
    "CoefficientStats",
    "CoefficientTables",
    "ComponentError",
    "Concept",
    "ConceptVector",
    "ConfigError",
    "DataFileError",
    "DriftTable",
    "Evaluation",
    "FileFormatError",
    "HookError",
    "IncompatibleModelsError",
    "LayerError",
    "MethodConfig",
    "MethodLoss",
    "MetricError",
    "NonFiniteLossError",
    "NonFiniteModelError",
    "ParamSelection",
    "PromptError",
    "PromptSet",
    "RayExecutor",
    "Recipe",
    "RelearnRun",
    "Restoration",
    "StudyResult",
    "SuiteCase",
    "SuiteResult",
    "SweepResult",
    "UnknownMethodError",
    "UnknownProbeError",
    "UnlearnLensError",
    "UnlearnRun",
    "UnlearningMethod",
    "UnsupportedArchitectureError",
    "attribution_patch",
    "audit",
    "available_methods",
    "check_compatible",
    "coefficient_positions",
    "compare_coefficients",
    "concept_vector_drift",
    "dissect",
    "evaluate",
    "format_question",
    "load_conceptvectors",
    "load_hf",
    "load_model",
    "load_pairs",
    "load_tofu",
    "load_wmdp",
    "locate_concept_vectors",
    "logit_lens",
    "logit_lens_compare",
    "metrics",
    "mlp_coefficient_stats",
    "mlp_coefficients",
    "neuron_logit_contributions",
    "patch",
    "patch_attention",
    "patch_mlp_coefficients",
    "patch_residual",
    "register_method",
    "relearn",
    "restore_",
    "restore_sweep",
    "restored",
    "run_suite",
    "save_hf",
    "save_model",
    "score",
    "seed_everything",
    "select_parameters",
    "set_progress",
    "toy",
    "trainers",
    "unlearn",
    "unregister_method",
    "vocab_projection",
    "write_report",
]
__version__ = "0.1.0"
