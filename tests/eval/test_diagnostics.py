"""Prefix recovery and length diagnostics on tiny models and hand-made samples."""

from __future__ import annotations

import pytest

from opdistill.batch import encode_text
from opdistill.eval.diagnostics import (
    Sample,
    continue_greedily,
    divergence_report,
    length_report,
    prefix_recovery,
    sample_responses,
)
from opdistill.models import tiny_llama
from opdistill.rollout import HFGenerateRollout


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)


def test_continuing_a_greedy_prefix_gives_the_rest_of_the_greedy_response(
    model, tokenizer, graph_task
):
    examples = graph_task.examples("eval", 5)
    batch = HFGenerateRollout(model, tokenizer, record_logprobs=False).generate(
        examples, 8, greedy=True
    )
    greedy = []
    for ids, mask in zip(batch.response_ids.tolist(), batch.response_mask.tolist(), strict=True):
        kept = [i for i, m in zip(ids, mask, strict=True) if m]
        greedy.append([i for i in kept if i != tokenizer.eos_token_id])
    assert continue_greedily(model, tokenizer, examples, [[]] * 5, [8] * 5) == greedy
    cuts = [min(3, len(g)) for g in greedy]
    prefixes = [g[:c] for g, c in zip(greedy, cuts, strict=True)]
    rest = continue_greedily(model, tokenizer, examples, prefixes, [8 - c for c in cuts])
    assert [g[c:] for g, c in zip(greedy, cuts, strict=True)] == rest
    assert continue_greedily(model, tokenizer, examples[:1], [greedy[0]], [0]) == [[]]


def test_recovery_with_the_whole_sample_and_no_budget_is_the_sample_accuracy(
    model, tokenizer, graph_task
):
    examples = graph_task.examples("eval", 4)
    samples = []
    for example in examples:
        path = example.meta["solutions"][0]
        backwards = " ".join(reversed(path.split()))  # as long, and never a valid path
        for text, correct in ((path, True), (backwards, False)):
            samples.append(Sample(example, encode_text(tokenizer, text), True, text, correct))
    assert {len(s.ids) for s in samples} == {3}
    whole = prefix_recovery(samples, model, tokenizer, graph_task, [1.0], max_new_tokens=3)
    assert whole["recovery@1"] == whole["sample_accuracy"] == 0.5
    assert whole["recovery_right@1"] == 1.0 and whole["recovery_wrong@1"] == 0.0
    full = prefix_recovery(samples, model, tokenizer, graph_task, [0.0, 0.5], max_new_tokens=6)
    assert full["sample_accuracy"] == 0.5
    assert {"recovery@0", "recovery_right@0.5", "recovery_wrong@0.5"} <= set(full)
    # f = 0: the continuer answers from scratch, whatever the student wrote
    assert full["recovery_right@0"] == full["recovery_wrong@0"]
    with pytest.raises(ValueError):
        prefix_recovery(samples, model, tokenizer, graph_task, [1.5])


def test_length_report_counts_truncated_samples(tokenizer, graph_task):
    example = graph_task.examples("eval", 1)[0]
    samples = [
        Sample(example, [5, 6, 7, 8], False, "x", False),  # hit the budget of 4
        Sample(example, [5, 6, 7, 8], False, "x", True),
        Sample(example, [5, 6], True, "x", True),
        Sample(example, [5], False, "x", False),  # unfinished below the budget: not truncated
    ]
    report = length_report(samples, tokenizer, max_new_tokens=4)
    assert report["truncated_fraction"] == 0.5
    assert report["unfinished_fraction"] == 0.75
    assert report["truncated_correct"] == 0.5
    assert report["mean_length"] == 2.75 and report["max_length"] == 4
    assert report["reference_length"] == len(encode_text(tokenizer, example.completion))


def test_sample_responses_are_judged_and_end_consistently(model, tokenizer, graph_task):
    examples = graph_task.examples("eval", 3)
    samples = sample_responses(model, tokenizer, graph_task, examples, 2, max_new_tokens=5)
    assert len(samples) == 6
    assert [s.example for s in samples] == [e for e in examples for _ in range(2)]
    for s in samples:
        assert tokenizer.eos_token_id not in s.ids and len(s.ids) <= 5
        assert s.ended or len(s.ids) == 5
        assert s.correct == graph_task.is_correct(s.example, s.text)
    again = sample_responses(model, tokenizer, graph_task, examples, 2, max_new_tokens=5)
    assert [s.ids for s in again] == [s.ids for s in samples]


def test_divergence_report_finds_where_samples_leave_the_golden_answers(tokenizer, graph_task):
    example = next(e for e in graph_task.examples("eval", 50) if len(e.meta["solutions"]) >= 2)
    path = example.meta["solutions"][0].split()  # "S X G"
    start = path[0]
    wrong_middle = f"{start} {example.meta['goal']} {example.meta['goal']}"  # leaves at token 1
    wrong_first = example.meta["goal"]  # leaves at token 0
    samples = [
        Sample(example, encode_text(tokenizer, s), True, s, graph_task.is_correct(example, s))
        for s in (example.meta["solutions"][1], wrong_middle, wrong_first, wrong_first)
    ]
    report = divergence_report(samples, tokenizer, graph_task)
    assert report["off_golden_fraction"] == 0.75
    assert report["first_divergence@0"] == pytest.approx(2 / 3)
    assert report["first_divergence@1"] == pytest.approx(1 / 3)
    assert report["first_divergence"] == pytest.approx(1 / 3)
    assert report["first_divergence_relative"] == pytest.approx((1 / 3) / 3)


def test_greedy_samples_are_the_greedy_continuations_from_scratch(model, tokenizer, graph_task):
    examples = graph_task.examples("eval", 3)
    greedy = sample_responses(model, tokenizer, graph_task, examples, 1, 5, greedy=True)
    expected = continue_greedily(model, tokenizer, examples, [[]] * 3, [5] * 3)
    assert [s.ids for s in greedy] == expected
