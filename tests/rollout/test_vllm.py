"""The vLLM rollout backend. The engine tests need vLLM (`make vllm`; `.ci/run` runs them in
.venv-vllm) and are skipped, with the reason printed in pytest's summary, elsewhere."""

import importlib.util

import pytest
import torch
from tests.test_trainer import make_config, small_trainer

from opdistill.config import LossConfig, RolloutConfig
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama

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


def test_lora_students_are_refused(tokenizer):
    from opdistill.config import LoraConfig
    from opdistill.models.lora import add_lora
    from opdistill.rollout.vllm import VLLMRollout

    student = add_lora(
        tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2), LoraConfig(r=2)
    )
    with pytest.raises(OpdistillError, match="LoRA"):
        VLLMRollout(student, tokenizer)


@needs_vllm
def test_engine_follows_the_trained_student(tmp_path, tokenizer, graph_task):
    """Train 3 steps sampling with vLLM at T = 0.7. Every step the engine's processed log-probs
    equal the learner's (mismatch ≈ 0, so the weights pushed after each step arrived), and
    afterwards the engine scores a fixed sequence exactly as the trained student does."""
    config = make_config(tmp_path, steps=3, temperature=0.7, lr=5e-2)
    config.loss = LossConfig(kind="sampled_token")
    config.rollout = RolloutConfig(
        backend="vllm", vllm_enforce_eager=True, vllm_gpu_memory_utilization=0.2
    )
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
