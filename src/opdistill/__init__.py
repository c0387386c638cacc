"""opdistill: on-policy distillation of language models.

The names a script needs, importable from the top-level package (loaded on first use, so that
`import opdistill` stays cheap):

    from opdistill import load_config, build_trainer, Trainer, evaluate
    from opdistill import Teacher, RolloutBackend, TopKLogprobs, losses

`opdistill.losses` holds the objectives as pure functions of logits and masks; `opdistill.teachers`,
`opdistill.rollout`, `opdistill.models`, `opdistill.tasks` and `opdistill.eval` are the packages
behind them (see README, "Python API").
"""

from __future__ import annotations

import importlib
from typing import Any

from opdistill.errors import OpdistillError

_EXPORTS = {
    "Config": "opdistill.config",
    "load_config": "opdistill.config",
    "config_from_dict": "opdistill.config",
    "Trainer": "opdistill.trainer",
    "build_trainer": "opdistill.trainer",
    "evaluate": "opdistill.eval",
    "evaluate_with_config": "opdistill.eval.evaluate",
    "Teacher": "opdistill.teachers",
    "TopKLogprobs": "opdistill.teachers",
    "build_teacher": "opdistill.teachers",
    "model_teacher": "opdistill.teachers",
    "RolloutBackend": "opdistill.rollout",
    "HFGenerateRollout": "opdistill.rollout",
    "Batch": "opdistill.batch",
    "make_task": "opdistill.tasks",
    "load_model": "opdistill.models",
    "load_tokenizer": "opdistill.models",
}
_MODULES = ("losses", "objectives", "teachers", "rollout", "models", "tasks", "eval")

__all__ = ["OpdistillError", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"opdistill.{name}")
    raise AttributeError(f"module 'opdistill' has no attribute {name!r}")
