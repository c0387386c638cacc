"""A mixture of tasks in one run: `data.mix`, each part a task with a weight and a teacher.

Every example keeps its own task's verifier and is tagged in its `meta` with the part it came
from (`meta["task"]`) and, when the part names one, the teacher that scores it
(`meta["teacher"]`, the routing field of a multi-teacher run).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example, Task, check_int, stable_hash

MIX_KEYS = ("name", "task", "task_args", "weight", "teacher")


@dataclass(frozen=True)
class MixturePart:
    """One part of a mixture: a task, its share of the examples and its teacher (if named)."""

    name: str
    task: Task
    weight: float
    teacher: str | None = None


def split_sizes(n: int, weights: Sequence[float]) -> list[int]:
    """`n` split in proportion to `weights` (largest remainders; the sizes sum to `n`)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


class MixtureTask(Task):
    """Examples drawn from several tasks in proportion to their weights, interleaved by a seeded
    shuffle; each is verified by the task it came from."""

    name = "mix"

    def __init__(self, parts: Sequence[MixturePart]):
        if not parts:
            raise OpdistillError("data.mix: needs at least one part")
        self.parts = {part.name: part for part in parts}

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_int("n", n, 0)
        parts = list(self.parts.values())
        out: list[Example] = []
        for part, size in zip(parts, split_sizes(n, [p.weight for p in parts]), strict=True):
            meta_extra: dict[str, Any] = {"task": part.name}
            if part.teacher is not None:
                meta_extra["teacher"] = part.teacher
            out += [
                replace(e, meta={**e.meta, **meta_extra})
                for e in part.task.examples(split, size, seed=seed)
            ]
        random.Random(stable_hash(f"mix|{seed}|{split}")).shuffle(out)
        return out

    def part_of(self, example: Example) -> MixturePart:
        name = example.meta.get("task")
        if name not in self.parts:
            raise OpdistillError(
                f"example {example.prompt[:40]!r} does not come from a part of this mixture "
                f"(meta task={name!r}; parts: {', '.join(self.parts)})"
            )
        return self.parts[name]

    def is_correct(self, example: Example, response: str) -> bool:
        return self.part_of(example).task.is_correct(example, response)

    def solution_key(self, example: Example, response: str) -> str:
        return self.part_of(example).task.solution_key(example, response)

    @property
    def has_verifier(self) -> bool:
        return all(part.task.has_verifier for part in self.parts.values())


def make_mixture(entries: Sequence[Mapping[str, Any]]) -> MixtureTask:
    """A `MixtureTask` from `data.mix` entries {task, task_args, weight, teacher, name}."""
    from opdistill.tasks import make_task

    parts, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"data.mix[{index}]"
        check_mix_entry(entry, where)
        task = make_task(entry["task"], **entry.get("task_args", {}))
        name = entry.get("name") or entry["task"]
        if name in seen:
            raise OpdistillError(
                f"{where}: part name {name!r} is used twice; give each part a distinct 'name'"
            )
        seen.add(name)
        parts.append(MixturePart(name, task, float(entry.get("weight", 1.0)), entry.get("teacher")))
    return MixtureTask(parts)


def check_mix_entry(entry: object, where: str) -> None:
    """One-line errors for a malformed `data.mix` entry (no task is built)."""
    if not isinstance(entry, Mapping):
        raise OpdistillError(f"{where}: expected a mapping with 'task', got {entry!r}")
    unknown = [key for key in entry if key not in MIX_KEYS]
    if unknown:
        raise OpdistillError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(MIX_KEYS)})")
    if not isinstance(entry.get("task"), str):
        raise OpdistillError(f"{where}.task: required, a task name such as graph or jsonl")
    if not isinstance(entry.get("task_args", {}), Mapping):
        raise OpdistillError(f"{where}.task_args: expected a mapping")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise OpdistillError(f"{where}.weight: must be a number > 0, got {weight!r}")
    for key in ("teacher", "name"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise OpdistillError(f"{where}.{key}: must be a non-empty string, got {value!r}")
