"""Arithmetic chains with every intermediate result written out: long responses in which one
early mistake derails every later step (a probe of exposure bias).

The prompt is a chain of `min_steps`..`max_steps` additions and subtractions; the response
rewrites each step with its result, carrying the result into the next step, then the final
value. The verifier is strict: every step must be right, so a wrong intermediate result cannot
be rescued by a lucky final answer. `first_error` says which step went wrong first.

Text format (values within [0, max_value]; the word-level tokenizer splits digits)::

    prompt:     "compute 7 + 2 - 5 + 3 step by step ."
    completion: "7 + 2 = 9 . 9 - 5 = 4 . 4 + 3 = 7 . #### 7"
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example, Task, check_int, generate_split

Step = tuple[int, str, int, int]  # value, operator, operand, result
VERIFY_MODES = ("strict", "final")


def step_text(step: Step) -> str:
    value, op, operand, result = step
    return f"{value} {op} {operand} = {result} ."


@dataclass
class ChainTask(Task):
    """Chains of `min_steps`..`max_steps` operations on values within [0, `max_value`].

    min_steps, max_steps: number of operations after the starting value (1 or more).
    max_value: every intermediate value stays within [0, max_value].
    verify: "strict" (every step right) or "final" (only the final answer).
    """

    name: ClassVar[str] = "chain"

    min_steps: int = 3
    max_steps: int = 5
    max_value: int = 20
    verify: str = "strict"

    def __post_init__(self) -> None:
        check_int("min_steps", self.min_steps, 1)
        check_int("max_steps", self.max_steps, self.min_steps)
        check_int("max_value", self.max_value, 2)
        if self.verify not in VERIFY_MODES:
            raise OpdistillError(
                f"chain: verify={self.verify!r} must be one of {', '.join(VERIFY_MODES)}"
            )

    def _make(self, rng: random.Random) -> Example:
        value = rng.randint(0, self.max_value)
        start, steps = value, []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            ops = [op for op, ok in (("+", value < self.max_value), ("-", value > 0)) if ok]
            op = rng.choice(ops)
            operand = rng.randint(1, self.max_value - value if op == "+" else value)
            result = value + operand if op == "+" else value - operand
            steps.append((value, op, operand, result))
            value = result
        chain = " ".join(f"{op} {operand}" for _, op, operand, _ in steps)
        prompt = f"compute {start} {chain} step by step ."
        completion = " ".join([*map(step_text, steps), f"#### {value}"])
        meta = {"answer": value, "steps": [list(s) for s in steps]}
        return Example(prompt=prompt, completion=completion, reference=completion, meta=meta)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct chains of `split`; eval prompts are a fixed hash-partition of all."""
        return generate_split(self.name, self._make, split, n, seed)

    def first_error(self, example: Example, response: str) -> int | None:
        """The index of the first wrong step (len(steps) when only the final answer is wrong,
        missing, or followed by extra steps), or None when the whole response is right.

        Whitespace is ignored, so "1 2 + 3 = 1 5 ." (digits as separate tokens) reads as 12+3=15.
        """
        steps = [tuple(s) for s in example.meta["steps"]]
        text = "".join(response.split())
        body, sep, answer = text.rpartition("####")
        if not sep:
            body, answer = text, None
        written = [s for s in body.split(".") if s]
        for index, step in enumerate(steps):
            value, op, operand, result = step
            if index >= len(written) or written[index] != f"{value}{op}{operand}={result}":
                return index
        if len(written) != len(steps) or answer != str(example.meta["answer"]):
            return len(steps)
        return None

    def is_correct(self, example: Example, response: str) -> bool:
        """`verify: strict`: every intermediate result and the final answer are right (see
        `first_error`); `verify: final`: the number after the last "####" is the answer."""
        if self.verify == "final":
            _, sep, answer = "".join(response.split()).rpartition("####")
            return bool(sep) and answer == str(example.meta["answer"])
        return self.first_error(example, response) is None

    def repair_examples(self, examples: list[Example], seed: int = 0) -> list[Example]:
        """One example per example: its worked solution with one result, picked at random,
        replaced by a wrong value, as a `response_prefix` that ends at that mistake; the
        completion goes on from the right value. Trained on these, a model learns to continue
        correctly after a mistake instead of carrying it on."""
        rng = random.Random(f"{self.name}-repair-{seed}")
        repaired = []
        for example in examples:
            steps = [tuple(s) for s in example.meta["steps"]]
            index = rng.randrange(len(steps))
            value, op, operand, result = steps[index]
            wrong = rng.choice([v for v in range(self.max_value + 1) if v != result])
            prefix = [*map(step_text, steps[:index]), step_text((value, op, operand, wrong))]
            completion = [*map(step_text, steps[index + 1 :]), f"#### {example.meta['answer']}"]
            repaired.append(
                Example(
                    prompt=example.prompt,
                    completion=" ".join(completion),
                    reference=example.reference,
                    meta=example.meta,
                    response_prefix=" ".join(prefix),
                )
            )
        return repaired

    @property
    def has_golden(self) -> bool:
        return True

    def golden_distribution(self, example: Example) -> dict[str, float]:
        """All mass on the one worked chain."""
        if example.completion is None:
            raise OpdistillError("chain: the example has no worked solution")
        return {example.completion: 1.0}
