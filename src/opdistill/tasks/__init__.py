"""Tasks: example generators with verifiers, and a registry to build them by name."""

from __future__ import annotations

import inspect
from typing import Any

from opdistill.errors import OpdistillError
from opdistill.tasks.arithmetic import ArithmeticTask, parse_natural_answer
from opdistill.tasks.base import Example, Task
from opdistill.tasks.chain import ChainTask
from opdistill.tasks.graph import GraphTask
from opdistill.tasks.mixture import MixtureTask, make_mixture
from opdistill.tasks.user_data import (
    HFDatasetTask,
    JsonlTask,
    UserDataTask,
    load_hf_dataset,
    load_jsonl,
)

_REGISTRY: dict[str, type[Task]] = {
    "graph": GraphTask,
    "arithmetic": ArithmeticTask,
    "chain": ChainTask,
    "jsonl": JsonlTask,
    "hf": HFDatasetTask,
}
TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the task called `name` (one of `TASK_NAMES`) with its options."""
    if name not in _REGISTRY:
        raise OpdistillError(f"unknown task {name!r} (valid: {', '.join(TASK_NAMES)})")
    cls = _REGISTRY[name]
    params = {
        p.name: p
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key in kwargs:
        if key not in params:
            raise OpdistillError(
                f"unknown option {key!r} for task {name!r} (valid: {', '.join(params) or 'none'})"
            )
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in kwargs:
            raise OpdistillError(f"task {name!r} needs option {key!r}")
    return cls(**kwargs)


__all__ = [
    "TASK_NAMES",
    "ArithmeticTask",
    "ChainTask",
    "Example",
    "GraphTask",
    "HFDatasetTask",
    "JsonlTask",
    "MixtureTask",
    "Task",
    "UserDataTask",
    "load_hf_dataset",
    "load_jsonl",
    "make_mixture",
    "make_task",
    "parse_natural_answer",
]
