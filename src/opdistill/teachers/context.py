"""Privileged context for self-distillation: what the teacher copy reads that the student does not.

A context source maps examples to context strings (None when it has none for an example):
the example's reference solution, or demonstrations — correct rollouts of a model, sampled afresh
and checked by the task's verifier.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from transformers import PreTrainedTokenizerBase

from opdistill.rollout import RolloutBackend, decode_responses
from opdistill.tasks.base import Example, Task


class ContextSource(Protocol):
    """Privileged context for each example (None: nothing to add)."""

    def contexts(self, examples: Sequence[Example]) -> list[str | None]: ...


class ReferenceContext:
    """The example's reference solution, or its completion when it has no reference."""

    def contexts(self, examples: Sequence[Example]) -> list[str | None]:
        return [e.reference if e.reference is not None else e.completion for e in examples]


class DemonstrationContext:
    """Correct rollouts of a model as context, drawn afresh for every batch.

    For each distinct prompt, `attempts` responses are sampled and checked by the verifier;
    `num_demonstrations` of the correct ones are joined by `separator`. `selection`:
    "probability" picks among the correct samples as drawn, i.e. in proportion to the model's
    probability (the published method); "uniform" first picks a distinct correct solution
    uniformly (by `Task.solution_key`), so that a dominant mode is not shown more often than a
    rare one. A prompt with no correct sample gets no context.
    """

    def __init__(
        self,
        sampler: RolloutBackend,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        num_demonstrations: int = 1,
        attempts: int = 8,
        selection: Literal["probability", "uniform"] = "probability",
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        separator: str = "\n",
        seed: int = 0,
    ):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.task = task
        self.num_demonstrations = num_demonstrations
        self.attempts = attempts
        self.selection = selection
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.separator = separator
        self.rng = random.Random(seed)
        self.prompts_seen = 0
        self.prompts_with_demonstration = 0

    def contexts(self, examples: Sequence[Example]) -> list[str | None]:
        unique: dict[str, Example] = {}
        for example in examples:
            unique.setdefault(example.prompt, example)
        prompts = list(unique.values())
        batch = self.sampler.generate(
            [e for e in prompts for _ in range(self.attempts)],
            self.max_new_tokens,
            self.temperature,
        )
        texts = decode_responses(self.tokenizer, batch)
        chosen: dict[str, str | None] = {}
        for index, example in enumerate(prompts):
            samples = texts[index * self.attempts : (index + 1) * self.attempts]
            correct = [t for t in samples if self.task.is_correct(example, t)]
            picks = self._select(example, correct)
            chosen[example.prompt] = self.separator.join(picks) if picks else None
        self.prompts_seen += len(prompts)
        self.prompts_with_demonstration += sum(c is not None for c in chosen.values())
        return [chosen[e.prompt] for e in examples]

    def _select(self, example: Example, correct: list[str]) -> list[str]:
        k = min(self.num_demonstrations, len(correct))
        if self.selection == "probability":
            return self.rng.sample(correct, k)
        by_solution: dict[str, list[str]] = {}
        for text in correct:
            by_solution.setdefault(self.task.solution_key(example, text), []).append(text)
        keys = self.rng.sample(sorted(by_solution), min(k, len(by_solution)))
        return [self.rng.choice(by_solution[key]) for key in keys]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "seen": self.prompts_seen,
            "found": self.prompts_with_demonstration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.prompts_seen, self.prompts_with_demonstration = state["seen"], state["found"]
