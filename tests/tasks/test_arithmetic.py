"""Arithmetic word problems: generation, splits, answers, knobs and the verifier."""

from __future__ import annotations

import re

import pytest

from opdistill.errors import OpdistillError
from opdistill.tasks import ArithmeticTask
from opdistill.tasks.arithmetic import parse_final_answer

STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+) \.")


def _check_solution(task: ArithmeticTask, ex) -> None:
    steps = STEP.findall(ex.completion)
    assert len(steps) == task.num_steps
    first = int(re.search(r"has (\d+) ", ex.prompt).group(1))
    value = first
    assert 0 <= value <= task.max_value
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert a == value
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert 0 <= c <= task.max_value
        value = c
    assert ex.completion.endswith(f"#### {value}")
    assert ex.meta["answer"] == value
    assert ex.reference == ex.completion


def test_default_examples() -> None:
    task = ArithmeticTask()
    train = task.examples("train", 500, seed=0)
    evals = task.examples("eval", 100, seed=0)
    assert len({e.prompt for e in train}) == 500
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    for ex in train + evals:
        _check_solution(task, ex)
        assert ex.prompt.endswith("have ?")
        assert "*" not in ex.completion
        assert task.is_correct(ex, ex.completion)


def test_deterministic() -> None:
    task = ArithmeticTask()
    assert task.examples("eval", 10, seed=2) == task.examples("eval", 10, seed=2)
    assert task.examples("eval", 10, seed=2) != task.examples("eval", 10, seed=3)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_steps": 1}, {"num_steps": 5, "max_value": 50}, {"allow_multiply": True, "num_steps": 4}],
)
def test_knobs(kwargs: dict) -> None:
    task = ArithmeticTask(**kwargs)
    exs = task.examples("train", 200, seed=1)
    for ex in exs:
        _check_solution(task, ex)
        assert ex.prompt.count(" . ") == task.num_steps + 1
    if task.allow_multiply:
        assert any("*" in e.completion for e in exs)
        assert any("doubles" in e.prompt or "triples" in e.prompt for e in exs)


def test_small_value_range() -> None:
    task = ArithmeticTask(max_value=3, num_steps=3)
    for ex in task.examples("train", 50):
        _check_solution(task, ex)


def test_too_few_distinct_problems() -> None:
    with pytest.raises(OpdistillError, match="too few distinct"):
        ArithmeticTask(max_value=2, num_steps=1).examples("eval", 1000)


def test_verifier() -> None:
    task = ArithmeticTask()
    ex = task.examples("train", 1, seed=5)[0]
    ans = ex.meta["answer"]
    assert task.is_correct(ex, f"#### {ans}")
    assert task.is_correct(ex, f"blah #### 99 .. #### {ans}  ")
    assert task.is_correct(ex, f"#### {' '.join(str(ans))}")  # word-level decoding of digits
    assert not task.is_correct(ex, f"#### {ans + 1}")
    assert not task.is_correct(ex, f"#### {ans} #### {ans + 1}")
    assert not task.is_correct(ex, str(ans))  # no marker
    assert not task.is_correct(ex, f"#### {ans} apples")
    assert not task.is_correct(ex, "")
    assert task.solution_key(ex, "  1 +  2 = 3 .\n#### 3") == "1 + 2 = 3 . #### 3"


def test_parse_final_answer() -> None:
    assert parse_final_answer("#### 1 2") == 12
    assert parse_final_answer("#### -3") == -3
    assert parse_final_answer("####") is None
    assert parse_final_answer("#### 1.5") is None
    assert parse_final_answer("12") is None


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"max_value": 1}, "max_value"),
        ({"max_value": 2.5}, "max_value"),
        ({"allow_multiply": "yes"}, "allow_multiply"),
    ],
)
def test_invalid_knobs(kwargs: dict, knob: str) -> None:
    with pytest.raises(OpdistillError, match=knob):
        ArithmeticTask(**kwargs)


def test_natural_style_and_instruction() -> None:
    compact = ArithmeticTask(num_steps=2, max_value=20)
    task = ArithmeticTask(num_steps=2, max_value=20, style="natural", instruction="Show it.")
    for ex in task.examples("eval", 50, seed=1):
        assert ex.prompt.endswith("have? Show it.") and " ." not in ex.prompt
        steps = re.findall(r"(\d+) ([-+]) (\d+) = (\d+)\.", ex.completion)
        assert len(steps) == 2
        assert ex.completion.endswith(f"The answer is {ex.meta['answer']}.")
        assert task.is_correct(ex, ex.completion) and not compact.is_correct(ex, ex.completion)
    # the instruction changes neither the problems nor the train/eval partition
    plain = ArithmeticTask(num_steps=2, max_value=20, style="natural").examples("eval", 20, seed=1)
    assert [e.prompt + " Show it." for e in plain] == [
        e.prompt for e in task.examples("eval", 20, seed=1)
    ]


def test_natural_verifier() -> None:
    task = ArithmeticTask(style="natural")
    ex = task.examples("train", 1, seed=5)[0]
    ans = ex.meta["answer"]
    assert task.is_correct(ex, f"{ans} apples. The answer is {ans}.")
    assert task.is_correct(ex, f"the answer is: {ans}")
    assert task.is_correct(ex, f"The answer is {ans + 1}. No wait, the answer is {ans}.")
    assert not task.is_correct(ex, f"The answer is {ans}. The answer is {ans + 1}.")
    assert not task.is_correct(ex, f"The answer is {ans}.5")
    assert not task.is_correct(ex, f"#### {ans}")
    assert not task.is_correct(ex, str(ans))


@pytest.mark.parametrize(
    ("kwargs", "knob"), [({"style": "fancy"}, "style"), ({"instruction": 3}, "instruction")]
)
def test_invalid_style_options(kwargs: dict, knob: str) -> None:
    with pytest.raises(OpdistillError, match=knob):
        ArithmeticTask(**kwargs)


def test_solution_exact_is_stricter_than_the_final_answer() -> None:
    task = ArithmeticTask(num_steps=2, max_value=9)
    example = task.examples("eval", 1)[0]
    assert task.solution_exact(example, example.completion)
    assert task.solution_exact(example, "  " + example.completion.replace(" ", "  "))
    answer = example.meta["answer"]
    lucky = f"1 + 1 = 2 . 2 + 1 = 3 . #### {answer}"
    assert task.is_correct(example, lucky)
    assert lucky == example.completion or not task.solution_exact(example, lucky)
