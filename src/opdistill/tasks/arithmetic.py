"""Multi-step arithmetic word problems (GSM8K-like) with a worked solution and a final answer.

Text format of `style: compact` (numbers in decimal digits; the answer follows "####")::

    prompt:     "Tom has 3 apples . He buys 4 more . He gives away 2 .
                 How many apples does Tom have ?"   (one line)
    completion: "3 + 4 = 7 . 7 - 2 = 5 . #### 5"

`style: natural` writes ordinary punctuation and the phrase pretrained chat models already use::

    prompt:     "Tom has 3 apples. He buys 4 more. He gives away 2. How many apples does Tom have?"
    completion: "3 + 4 = 7. 7 - 2 = 5. The answer is 5."

`instruction` is appended to every prompt, e.g. to ask a pretrained model for that format.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import ClassVar

from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example, Task, check_int, generate_split

NAMES = (
    ("Tom", "He"),
    ("Ann", "She"),
    ("Bob", "He"),
    ("Eva", "She"),
    ("Sam", "He"),
    ("Mia", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Ben", "He"),
    ("Amy", "She"),
    ("Max", "He"),
    ("Lia", "She"),
)
ITEMS = (
    ("apple", "apples"),
    ("pen", "pens"),
    ("coin", "coins"),
    ("card", "cards"),
    ("book", "books"),
    ("stone", "stones"),
    ("shell", "shells"),
    ("marble", "marbles"),
    ("sticker", "stickers"),
    ("cookie", "cookies"),
)
ADD_VERBS = ("buys {k} more", "finds {k} more", "gets {k} more", "receives {k} more")
SUB_VERBS = ("gives away {k}", "loses {k}", "sells {k}")
MUL_VERBS = {2: "doubles them", 3: "triples them"}

_INT = re.compile(r"[+-]?\d+")
_NATURAL_ANSWER = re.compile(r"the answer is:?\s*(-?\d+)(?![\d.]*\d)", re.IGNORECASE)
STYLES = ("compact", "natural")


def parse_final_answer(response: str) -> int | None:
    """The integer after the last "####", ignoring whitespace inside it ("1 2" -> 12)."""
    if "####" not in response:
        return None
    text = "".join(response.rsplit("####", 1)[1].split())
    return int(text) if _INT.fullmatch(text) else None


def parse_natural_answer(response: str) -> int | None:
    """The integer right after the last "The answer is" (any case, optional colon)."""
    found = _NATURAL_ANSWER.findall(response)
    return int(found[-1]) if found else None


@dataclass
class ArithmeticTask(Task):
    """Word problems: a starting amount, then `num_steps` additions/subtractions (/doublings).

    num_steps: number of operations after the starting amount.
    max_value: every intermediate value stays within [0, max_value].
    allow_multiply: also use "doubles"/"triples" when the product stays within range.
    style: "compact" (space-separated tokens, answer after "####") or "natural" (ordinary
        punctuation, answer after "The answer is"); the verifier follows the style.
    instruction: text appended to every prompt after a space ("" for none). The problems and the
        train/eval partition do not depend on it.
    """

    name: ClassVar[str] = "arithmetic"

    num_steps: int = 2
    max_value: int = 20
    allow_multiply: bool = False
    style: str = "compact"
    instruction: str = ""

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps, 1)
        check_int("max_value", self.max_value, 2)
        if not isinstance(self.allow_multiply, bool):
            got = self.allow_multiply
            raise OpdistillError(f"allow_multiply: must be true or false, got {got!r}")
        if self.style not in STYLES:
            raise OpdistillError(f"style: must be one of {', '.join(STYLES)}, got {self.style!r}")
        if not isinstance(self.instruction, str):
            raise OpdistillError(f"instruction: must be a string, got {self.instruction!r}")

    def _make(self, rng: random.Random) -> Example:
        name, pronoun = rng.choice(NAMES)
        singular, plural = rng.choice(ITEMS)
        value = rng.randint(1, self.max_value)
        sentences = [f"{name} has {value} {singular if value == 1 else plural} ."]
        steps: list[str] = []
        for _ in range(self.num_steps):
            ops = []
            if value < self.max_value:
                ops.append("+")
            if value > 0:
                ops.append("-")
            if self.allow_multiply and value > 0 and 2 * value <= self.max_value:
                ops.append("*")
            op = rng.choice(ops)
            if op == "+":
                k = rng.randint(1, self.max_value - value)
                verb, new = rng.choice(ADD_VERBS).format(k=k), value + k
            elif op == "-":
                k = rng.randint(1, value)
                verb, new = rng.choice(SUB_VERBS).format(k=k), value - k
            else:
                k = rng.choice([f for f in MUL_VERBS if f * value <= self.max_value])
                verb, new = MUL_VERBS[k], value * k
            sentences.append(f"{pronoun} {verb} .")
            steps.append(f"{value} {op} {k} = {new} .")
            value = new
        sentences.append(f"How many {plural} does {name} have ?")
        prompt = " ".join(sentences)
        solution = " ".join([*steps, f"#### {value}"])
        if self.style == "natural":
            prompt = prompt.replace(" .", ".").replace(" ?", "?")
            solution = " ".join([*steps, f"The answer is {value} ."]).replace(" .", ".")
        return Example(
            prompt=prompt,
            completion=solution,
            reference=solution,
            meta={"answer": value},
        )

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct problems of `split`; eval prompts are a fixed hash-partition of all."""
        examples = generate_split(self.name, self._make, split, n, seed)
        if self.instruction:
            examples = [replace(e, prompt=f"{e.prompt} {self.instruction}") for e in examples]
        return examples

    def is_correct(self, example: Example, response: str) -> bool:
        """Whether the final answer (after the last "####"; "The answer is" if natural) is right."""
        parse = parse_natural_answer if self.style == "natural" else parse_final_answer
        return parse(response) == example.meta["answer"]

    def solution_key(self, example: Example, response: str) -> str:
        """The whitespace-normalised worked solution."""
        return " ".join(response.split())

    @property
    def has_golden(self) -> bool:
        return True

    def golden_distribution(self, example: Example) -> dict[str, float]:
        """All mass on the worked solution: each problem has exactly one (the operations in the
        order the problem states them)."""
        return {example.completion: 1.0}

    def solution_exact(self, example: Example, response: str) -> bool:
        """Stricter than `is_correct`: the whole worked solution is right, not only the number
        after "####" (a lucky final answer after a wrong step does not count)."""
        return " ".join(response.split()) == " ".join(example.completion.split())
