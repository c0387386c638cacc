"""Golden metrics against a brute-force reference: token-by-token probabilities of each answer."""

from __future__ import annotations

import math

import pytest
import torch

from opdistill.batch import chat_prompt, encode_text
from opdistill.errors import OpdistillError
from opdistill.eval.golden import golden_metrics, kl_to_golden, response_logprobs
from opdistill.models import tiny_llama
from opdistill.tasks import make_task


def brute_force_logprob(model, tokenizer, prompt: str, response: str, temperature: float) -> float:
    """log p(response + EOS | prompt), one unpadded forward per token."""
    ids = chat_prompt(tokenizer, prompt)
    total = 0.0
    for token in [*encode_text(tokenizer, response), tokenizer.eos_token_id]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, : len(tokenizer)]
        total += float(torch.log_softmax(logits.double() / temperature, dim=-1)[token])
        ids = [*ids, token]
    return total


def test_kl_to_golden_matches_the_definition():
    golden = {"a": 0.25, "b": 0.75}
    logprobs = {"a": math.log(0.1), "b": math.log(0.3)}
    expected = 0.25 * math.log(0.25 / 0.1) + 0.75 * math.log(0.75 / 0.3)
    assert kl_to_golden(golden, logprobs) == pytest.approx(expected)
    assert kl_to_golden(golden, {y: math.log(g) for y, g in golden.items()}) == pytest.approx(0)
    with pytest.raises(ValueError):
        kl_to_golden({"a": 0.5}, {"a": 0.0})


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_golden_metrics_match_brute_force(graph_task, tokenizer, temperature):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    examples = graph_task.examples("eval", 4)
    kls, masses = [], []
    for example in examples:
        golden = graph_task.golden_distribution(example)
        assert sum(golden.values()) == pytest.approx(1.0)
        assert set(golden) == set(example.meta["solutions"])
        logp = {
            y: brute_force_logprob(model, tokenizer, example.prompt, y, temperature) for y in golden
        }
        kls.append(sum(g * (math.log(g) - logp[y]) for y, g in golden.items()))
        masses.append(sum(math.exp(v) for v in logp.values()))
    got = golden_metrics(model, tokenizer, graph_task, examples, temperature, batch_size=3)
    assert got["golden_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert got["golden_mass"] == pytest.approx(sum(masses) / len(masses), rel=1e-4)


def test_response_logprobs_do_not_depend_on_batching(graph_task, tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=4)
    pairs = [(e.prompt, s) for e in graph_task.examples("eval", 3) for s in e.meta["solutions"]]
    one = response_logprobs(model, tokenizer, pairs, batch_size=1)
    many = response_logprobs(model, tokenizer, pairs, batch_size=len(pairs))
    assert one == pytest.approx(many, abs=1e-4)


def test_arithmetic_and_chain_golden_is_the_worked_solution():
    for task in (make_task("arithmetic", num_steps=2, max_value=9), make_task("chain")):
        example = task.examples("eval", 1)[0]
        assert task.has_golden
        assert task.golden_distribution(example) == {example.completion: 1.0}


def test_golden_metrics_refuse_a_task_without_golden(tokenizer, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a b", "answer": "1"}\n{"prompt": "c d", "answer": "2"}\n')
    task = make_task("jsonl", train_path=str(rows))
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(OpdistillError, match=r"eval\.golden"):
        golden_metrics(model, tokenizer, task, task.examples("train", 1))
