"""The chain task: generation, the strict verifier and where a response first goes wrong."""

from __future__ import annotations

import pytest

from opdistill.errors import OpdistillError
from opdistill.models import build_word_tokenizer
from opdistill.tasks import ChainTask, make_task


def test_examples_are_valid_chains_of_the_requested_length():
    task = make_task("chain", min_steps=3, max_steps=5, max_value=20)
    examples = task.examples("train", 200, seed=1)
    lengths = set()
    for example in examples:
        steps = example.meta["steps"]
        lengths.add(len(steps))
        value = steps[0][0]
        for start, op, operand, result in steps:
            assert start == value and 0 <= result <= 20
            assert result == (start + operand if op == "+" else start - operand)
            value = result
        assert example.meta["answer"] == value
        assert task.is_correct(example, example.completion)
        assert task.first_error(example, example.completion) is None
    assert lengths == {3, 4, 5}
    assert task.examples("train", 200, seed=1) == examples
    evals = {e.prompt for e in task.examples("eval", 50)}
    assert not evals & {e.prompt for e in examples}


def test_first_error_points_at_the_first_wrong_step():
    task = ChainTask(min_steps=3, max_steps=3, max_value=9)
    example = task.examples("eval", 1)[0]
    steps = example.completion.split(" . ")
    assert len(steps) == 4  # three steps and "#### v"
    wrong_second = example.completion.replace(steps[1], steps[1][:-1] + "99", 1)
    assert task.first_error(example, wrong_second) == 1
    assert not task.is_correct(example, wrong_second)
    answer = example.meta["answer"]
    assert task.first_error(example, example.completion[: -len(str(answer))] + "42") == 3
    assert task.first_error(example, example.completion.rsplit("####", 1)[0]) == 3
    assert task.first_error(example, "") == 0
    truncated = " . ".join(steps[:2])
    assert task.first_error(example, truncated) == 2


def test_a_lucky_final_answer_after_a_wrong_step_is_wrong():
    task = ChainTask(min_steps=3, max_steps=3, max_value=9)
    example = task.examples("eval", 1)[0]
    first = example.completion.split(" . ")[0]
    bad = example.completion.replace(first, first + "0", 1)  # wrong first result, right answer
    assert bad.endswith(f"#### {example.meta['answer']}")
    assert task.first_error(example, bad) == 0


def test_word_tokenizer_round_trip_splits_digits_and_still_verifies():
    task = make_task("chain", max_value=30)
    examples = task.examples("train", 50)
    tokenizer = build_word_tokenizer(e.prompt + " " + e.completion for e in examples)
    for example in examples[:10]:
        ids = tokenizer(example.completion, add_special_tokens=False).input_ids
        decoded = tokenizer.decode(ids)
        assert task.is_correct(example, decoded)
        assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [({"min_steps": 0}, "min_steps"), ({"min_steps": 4, "max_steps": 3}, "max_steps")],
)
def test_invalid_knobs(kwargs, knob):
    with pytest.raises(OpdistillError, match=knob):
        make_task("chain", **kwargs)


def test_final_verification_accepts_a_repaired_mistake_and_needs_the_answer():
    strict = ChainTask(min_steps=3, max_steps=3, max_value=9)
    final = ChainTask(min_steps=3, max_steps=3, max_value=9, verify="final")
    example = final.examples("eval", 1)[0]
    first = example.completion.split(" . ")[0]
    repaired = example.completion.replace(first, first + "0", 1)
    assert final.is_correct(example, repaired) and not strict.is_correct(example, repaired)
    answer = str(example.meta["answer"])
    assert not final.is_correct(example, example.completion[: -len(answer)] + "42")
    assert not final.is_correct(example, example.completion.rsplit("####", 1)[0])
    with pytest.raises(OpdistillError, match="verify"):
        ChainTask(verify="lenient")


def test_repair_examples_go_on_from_the_right_value_after_one_wrong_result():
    task = ChainTask(min_steps=3, max_steps=5, max_value=9, verify="final")
    examples = task.examples("train", 300, seed=2)
    repaired = task.repair_examples(examples)
    assert task.repair_examples(examples) == repaired
    broken_at = set()
    for example, repair in zip(examples, repaired, strict=True):
        assert repair.prompt == example.prompt and repair.meta == example.meta
        whole = f"{repair.response_prefix} {repair.completion}"
        index = task.first_error(example, whole)
        broken_at.add(index)
        # The prefix ends at its one mistake; the rest is the reference from the next step on.
        steps = example.completion.split(" . ")
        assert repair.response_prefix.count(" . ") == index
        assert repair.response_prefix.split(" . ")[:index] == steps[:index]
        assert whole.split(" . ")[index + 1 :] == steps[index + 1 :]
        assert task.is_correct(example, whole)
    assert broken_at == {0, 1, 2, 3, 4}
