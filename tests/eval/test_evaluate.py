"""evaluate() sampling with a given rollout backend (`eval.backend: vllm` passes the engine)."""

import pytest
import torch

from opdistill.config import EvalConfig
from opdistill.errors import OpdistillError
from opdistill.eval.evaluate import evaluate, evaluate_with_config
from opdistill.models.loading import tiny_llama
from opdistill.rollout import HFGenerateRollout


class RecordingRollout:
    """transformers `generate`, recording each call's rows and whether it was greedy."""

    def __init__(self, model, tokenizer):
        self.inner = HFGenerateRollout(model, tokenizer, record_logprobs=False)
        self.calls = []

    def generate(self, examples, max_new_tokens, temperature=1.0, greedy=False):
        self.calls.append((len(examples), greedy))
        return self.inner.generate(examples, max_new_tokens, temperature, greedy=greedy)


def test_evaluate_samples_with_the_given_rollout(tokenizer, graph_task):
    """Same pass@k machinery, samples from the given backend: with the default sampler behind
    it the metrics are those of the default path, and every sample came through it."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3).eval()
    examples = graph_task.examples("eval", 5)
    config = EvalConfig(num_prompts=5, num_samples=4, ks=[1, 4], max_new_tokens=5, batch_size=8)
    rollout = RecordingRollout(model, tokenizer)
    given = evaluate_with_config(model, tokenizer, graph_task, examples, config, rollout=rollout)
    default = evaluate_with_config(model, tokenizer, graph_task, examples, config)
    assert dict(given) == dict(default) and {"accuracy", "pass@4", "avg@4"} <= set(given)
    assert given.samples == default.samples
    assert rollout.calls == [(5, True), (8, False), (8, False), (4, False)]


def test_vllm_evaluation_in_training_needs_the_vllm_engine(tmp_path, tokenizer, graph_task):
    from tests.test_trainer import make_config, models, small_trainer

    config = make_config(tmp_path)
    config.eval.backend = "vllm"
    teacher, student = models(tokenizer)
    with pytest.raises(OpdistillError, match=r"eval.backend=vllm .* set rollout.backend=vllm"):
        small_trainer(config, tokenizer, graph_task, teacher, student)


def test_evaluate_draws_from_its_own_seed(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3).eval()
    rollout = RecordingRollout(model, tokenizer)
    examples = graph_task.examples("eval", 3)
    first = evaluate(model, tokenizer, graph_task, examples, 2, (1,), 1.0, 4, rollout=rollout)
    torch.manual_seed(123)  # the caller's RNG does not matter
    second = evaluate(model, tokenizer, graph_task, examples, 2, (1,), 1.0, 4, rollout=rollout)
    assert first.samples == second.samples
