from collections import Counter

import pytest

from opdistill.batch import dataset_batch
from opdistill.tasks.base import Example
from opdistill.teachers.context import DemonstrationContext, ReferenceContext


class ScriptedSampler:
    """A rollout backend that answers each prompt with a fixed cycle of responses."""

    def __init__(self, tokenizer, responses):
        self.tokenizer = tokenizer
        self.responses = responses  # prompt -> list of response texts, cycled
        self.calls = []

    def generate(self, examples, max_new_tokens, temperature=1.0, greedy=False):
        self.calls.append([e.prompt for e in examples])
        seen = Counter()
        rows = []
        for e in examples:
            options = self.responses[e.prompt]
            rows.append(Example(e.prompt, completion=options[seen[e.prompt] % len(options)]))
            seen[e.prompt] += 1
        return dataset_batch(self.tokenizer, rows)


def test_reference_context_falls_back_to_the_completion():
    examples = [Example("p", completion="c", reference="r"), Example("q", completion="c")]
    assert ReferenceContext().contexts(examples) == ["r", "c"]


@pytest.fixture
def example(graph_task):
    return graph_task.examples("train", 1)[0]


def solutions(example):
    return example.meta["solutions"]


def test_demonstrations_are_verified_and_sampled_once_per_prompt(tokenizer, graph_task, example):
    good, wrong = solutions(example)[0], "A A A"
    sampler = ScriptedSampler(tokenizer, {example.prompt: [wrong, good, wrong, wrong]})
    source = DemonstrationContext(sampler, tokenizer, graph_task, attempts=4)
    assert source.contexts([example, example, example]) == [good] * 3
    assert sampler.calls == [[example.prompt] * 4]  # one prompt, `attempts` samples
    assert source.prompts_with_demonstration / source.prompts_seen == 1.0


def test_no_correct_sample_means_no_context(tokenizer, graph_task, example):
    sampler = ScriptedSampler(tokenizer, {example.prompt: ["A A A"]})
    source = DemonstrationContext(sampler, tokenizer, graph_task, attempts=3)
    assert source.contexts([example]) == [None]
    assert source.prompts_with_demonstration / source.prompts_seen == 0.0


def test_several_demonstrations_are_joined(tokenizer, graph_task, example):
    first, second = solutions(example)[:2]
    sampler = ScriptedSampler(tokenizer, {example.prompt: [first, second]})
    source = DemonstrationContext(
        sampler,
        tokenizer,
        graph_task,
        num_demonstrations=2,
        attempts=2,
        selection="uniform",
        separator=" ; ",
    )
    (context,) = source.contexts([example])
    assert sorted(context.split(" ; ")) == sorted([first, second])


@pytest.mark.parametrize(("selection", "expected"), [("probability", 0.9), ("uniform", 0.5)])
def test_selection_follows_probability_or_is_uniform_over_solutions(
    tokenizer, graph_task, example, selection, expected
):
    """9 of 10 correct samples are one path: probability shows it 90% of the time, uniform 50%."""
    common, rare = solutions(example)[:2]
    sampler = ScriptedSampler(tokenizer, {example.prompt: [common] * 9 + [rare]})
    source = DemonstrationContext(
        sampler, tokenizer, graph_task, attempts=10, selection=selection, seed=1
    )
    picks = [source.contexts([example])[0] for _ in range(400)]
    assert picks.count(common) / len(picks) == pytest.approx(expected, abs=0.07)


def test_state_round_trip(tokenizer, graph_task, example):
    paths = solutions(example)
    sampler = ScriptedSampler(tokenizer, {example.prompt: paths})
    source = DemonstrationContext(sampler, tokenizer, graph_task, attempts=len(paths), seed=3)
    source.contexts([example])
    state = source.state_dict()
    after = [source.contexts([example]) for _ in range(5)]
    source.load_state_dict(state)
    assert [source.contexts([example]) for _ in range(5)] == after
