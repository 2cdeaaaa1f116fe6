"""Unlearning by fine-tuning: a registry of methods, one shared loop, and the relearning attack.

Built-in methods (registered on import): ``ga``, ``grad_diff``, ``npo``, ``npo_kl``,
``npo_rt``, ``simnpo``, ``dpo``, ``dpo_retain``, ``rmu``, ``idk``. Add your own with
:func:`register_method`.

Default learning rates and step counts (``default_lr``/``default_steps`` on each class) are
tuned on the toy world's base model (6 layers, width 128) with the whole forget concept in each
batch: ga 5e-4 / 50, grad_diff 5e-4 / 30, npo, npo_kl, npo_rt, simnpo, dpo, dpo_retain and idk
3e-4 / 30, rmu 1e-2 / 30 (alpha 10, c = 5 x the mean activation norm). For 7B models, 1e-5 to
5e-5 is the usual range.

bfloat16/float16 parameters train through float32 master copies (:mod:`.optim`); the loop,
its defaults (weight decay groups, schedules, accumulation, EOS after refusals, checkpoints,
determinism) and its differences from open-unlearning are described in ``docs/training.md``.
"""

from unlearnlens.components import ParamSelection, resolve_params, select_parameters
from unlearnlens.trainers import dpo, ga, grad_diff, idk, npo, rmu, simnpo  # noqa: F401  (register)
from unlearnlens.trainers.base import Batch, MethodConfig, MethodLoss, TrainData, UnlearningMethod
from unlearnlens.trainers.config import TrainConfig
from unlearnlens.trainers.registry import (
    available_methods,
    get_method,
    register_method,
    unregister_method,
)
from unlearnlens.trainers.relearn import RelearnRun, relearn
from unlearnlens.trainers.run import UnlearnRun, unlearn

__all__ = [
    "Batch",
    "MethodConfig",
    "MethodLoss",
    "ParamSelection",
    "RelearnRun",
    "TrainConfig",
    "TrainData",
    "UnlearnRun",
    "UnlearningMethod",
    "available_methods",
    "get_method",
    "register_method",
    "relearn",
    "resolve_params",
    "select_parameters",
    "unlearn",
    "unregister_method",
]
