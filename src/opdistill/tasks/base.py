"""What every task provides: examples, a verifier, and a canonical key for distinct solutions."""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opdistill.errors import OpdistillError


@dataclass(frozen=True)
class Example:
    """One prompt with optional supervision.

    prompt: the user's message (plain text, no chat template applied).
    completion: a reference response for off-policy training (SFT, supervised KD).
    reference: privileged context a teacher may see (e.g. a worked solution).
    meta: task-specific data the verifier needs (graph edges, final answer, ...).
    response_prefix: a given start of the response, before `completion`: off-policy training
        conditions on its tokens but takes no loss on them (e.g. a teacher taught to continue
        correctly after a mistake).
    """

    prompt: str
    completion: str | None = None
    reference: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    response_prefix: str | None = None


class Task(ABC):
    """A source of examples plus a verifier."""

    name: str = "task"

    @abstractmethod
    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """Return `n` examples of `split` ("train" or "eval"); splits never share a prompt."""

    @abstractmethod
    def is_correct(self, example: Example, response: str) -> bool:
        """Whether `response` solves `example`."""

    def solution_key(self, example: Example, response: str) -> str:
        """Canonical form of a correct response, so that distinct solutions can be counted."""
        return " ".join(response.split())

    @property
    def has_verifier(self) -> bool:
        """False for tasks that cannot judge responses (e.g. user data without answers)."""
        return True

    @property
    def has_golden(self) -> bool:
        """Whether `golden_distribution` is defined (the task knows its true answers)."""
        return False

    def golden_distribution(self, example: Example) -> dict[str, float]:
        """The distribution correct responses to `example` should follow: {response: probability},
        summing to 1 (e.g. uniform over every valid answer). Tasks with `has_golden` define it."""
        raise NotImplementedError(f"task {self.name!r} defines no golden distribution")


# --- helpers shared by the built-in tasks -------------------------------------------------------

SPLITS = ("train", "eval")
EVAL_MODULUS = 10  # a prompt belongs to "eval" iff stable_hash(prompt) % EVAL_MODULUS == 0


def check_split(split: str) -> None:
    """Raise OpdistillError unless `split` is "train" or "eval"."""
    if split not in SPLITS:
        raise OpdistillError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")


def stable_hash(text: str) -> int:
    """A hash of `text` that is the same in every process (unlike the built-in `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(prompt: str) -> str:
    """The split a generated prompt belongs to: a fixed partition of all possible prompts."""
    return "eval" if stable_hash(prompt) % EVAL_MODULUS == 0 else "train"


def seeded_rng(*parts: object) -> random.Random:
    """A private RNG whose state depends only on `parts` (e.g. task name, seed, split)."""
    return random.Random(stable_hash("|".join(map(str, parts))))


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Validate an integer knob, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpdistillError(f"{name}: must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise OpdistillError(f"{name}: must be {bound}, got {value}")
    return value


def generate_split(
    task_name: str,
    make: Callable[[random.Random], Example | None],
    split: str,
    n: int,
    seed: int,
) -> list[Example]:
    """Draw `n` distinct examples of `split` from the generator `make` (deterministic per seed).

    `make` may return None to reject an instance. Candidates whose prompt hashes to the other
    split are dropped, so train and eval never share a prompt, whatever the seeds or knobs.
    """
    check_split(split)
    check_int("n", n, 0)
    rng = seeded_rng(task_name, seed, split)
    out: list[Example] = []
    seen: set[str] = set()
    max_attempts = 1000 + 100 * n
    for _ in range(max_attempts):
        if len(out) >= n:
            break
        ex = make(rng)
        if ex is None or ex.prompt in seen or split_of(ex.prompt) != split:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    if len(out) < n:
        raise OpdistillError(
            f"task {task_name!r}: could only generate {len(out)} distinct {split} examples "
            f"of the {n} requested; the task options allow too few distinct problems"
        )
    return out
