"""The vLLM rollout backend. The engine tests need vLLM (`make vllm`; `.ci/run` runs them in
.venv-vllm) and are skipped, with the reason printed in pytest's summary, elsewhere."""

import importlib.util

import pytest
import torch
from tests.test_trainer import make_config, small_trainer

from opdistill.config import EvalConfig, LoraConfig, LossConfig, RolloutConfig
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.models.lora import add_lora
from opdistill.trainer import Trainer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed here: `make vllm` builds .venv-vllm, where CI runs this",
)


@pytest.mark.skipif(HAS_VLLM, reason="checks the error shown when vLLM is missing")
def test_missing_vllm_is_a_one_line_error(tokenizer):
    from opdistill.rollout.vllm import VLLMRollout

    student = tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2)
    with pytest.raises(OpdistillError, match="make vllm") as error:
        VLLMRollout(student, tokenizer)
    assert "\n" not in str(error.value)


@needs_vllm
def test_engine_follows_the_trained_student(tmp_path, tokenizer, graph_task):
    """Train 3 steps sampling with vLLM at T = 0.7. Every step the engine's processed log-probs
    equal the learner's (mismatch ≈ 0, so the weights pushed after each step arrived), and
    afterwards the engine scores a fixed sequence exactly as the trained student does."""
    config = make_config(tmp_path, steps=3, temperature=0.7, lr=5e-2)
    config.loss = LossConfig(kind="sampled_token")
    config.rollout = RolloutConfig(backend="vllm", vllm_enforce_eager=True, vllm_kv_cache_gib=0.25)
    teacher = tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=1)
    student = tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=2)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student)
    stats = [trainer.step() for _ in range(3)]
    assert all(s.sampler_mismatch is not None and s.sampler_mismatch < 1e-4 for s in stats)
    assert any(not torch.equal(initial[k], v) for k, v in student.state_dict().items())
    engine = trainer.student_sampler
    assert engine.version == 3
    prompt = tokenizer("a b c", add_special_tokens=False).input_ids or [1, 2]
    response = [3, 4, 5, 6]
    with torch.no_grad():
        logits = student.eval()(torch.tensor([prompt + response])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(
        -1, torch.tensor(response).unsqueeze(-1)
    )[:, 0]
    assert torch.allclose(engine.logprobs_of(prompt, response), expected, atol=1e-4)
    # Sampling is pure and only from the tokenizer's ids, and EOS ends a response.
    batch = engine.generate(graph_task.examples("eval", 16), 8, temperature=1.0)
    assert int(batch.response_ids.max()) < len(tokenizer)
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        assert tokenizer.eos_token_id not in ids[mask.bool()].tolist()[:-1]
    trainer.close()


def student_logprobs(student, prompt, response):
    """log softmax(z)[y_t] of `response` after `prompt` under `student` (temperature 1)."""
    with torch.no_grad():
        logits = student.eval()(torch.tensor([prompt + response])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(
        -1, torch.tensor(response).unsqueeze(-1)
    )[:, 0]


@needs_vllm
def test_engine_follows_a_trained_lora_student_and_evaluates(tmp_path, tokenizer, graph_task):
    """A LoRA student: the engine serves its base model and receives only the adapter after
    each step. After 3 steps its log-probs of a fixed sequence are the trained student's, the
    sampler log-probs matched the learner's every step, and `eval.backend: vllm` samples the
    evaluation (greedy and pass@k) with the same engine."""
    config = make_config(tmp_path, steps=3, temperature=0.7, lr=5e-2)
    config.loss = LossConfig(kind="sampled_token")
    config.model.lora = LoraConfig(r=4, alpha=8)
    config.rollout = RolloutConfig(backend="vllm", vllm_enforce_eager=True, vllm_kv_cache_gib=0.25)
    config.eval = EvalConfig(
        backend="vllm", num_prompts=6, num_samples=4, ks=[1, 4], max_new_tokens=6
    )
    teacher = tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=1)
    student = add_lora(
        tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=2), config.model.lora
    )
    trainer = Trainer(
        config,
        student,
        tokenizer,
        graph_task,
        graph_task.examples("train", 8),
        graph_task.examples("eval", 6),
        teacher_model=teacher,
    )
    engine = trainer.student_sampler
    prompt = tokenizer("a b c", add_special_tokens=False).input_ids or [1, 2]
    response = [3, 4, 5, 6]
    before = student_logprobs(student, prompt, response)
    assert torch.allclose(engine.logprobs_of(prompt, response), before, atol=1e-4)
    stats = [trainer.step() for _ in range(3)]
    assert all(s.sampler_mismatch is not None and s.sampler_mismatch < 1e-4 for s in stats)
    assert engine.version == 3 and engine.lora_request.lora_int_id == 4  # start + 3 pushes
    after = student_logprobs(student, prompt, response)
    assert (after - before).abs().max() > 1e-3  # the adapter moved
    assert torch.allclose(engine.logprobs_of(prompt, response), after, atol=1e-4)

    calls = []
    generate = engine.generate
    engine.generate = lambda *args, **kwargs: calls.append(args) or generate(*args, **kwargs)
    metrics = trainer.evaluate()
    assert {"accuracy", "pass@1", "pass@4", "avg@4"} <= set(metrics)
    assert sum(len(c[0]) for c in calls) == 6 + 6 * 4  # greedy, then 4 samples per prompt
    assert trainer.evaluate() == metrics  # seeded
    trainer.close()
