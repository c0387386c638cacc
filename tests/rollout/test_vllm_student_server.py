"""Student rollouts on a separately started vLLM server (`rollout.server`): against a real
server on 127.0.0.1 where vLLM is installed, and the refusals against an in-memory one."""

import json

import httpx
import pytest
import torch
from tests.test_trainer import make_config, small_trainer
from tests.vllm_server import vllm_server

from opdistill.config import LoraConfig, LossConfig, RolloutConfig
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.models.lora import add_lora
from opdistill.rollout.vllm_server import VLLMServerRollout


def student_logprobs(student, prompt, response, temperature=1.0):
    with torch.no_grad():
        logits = student.eval()(torch.tensor([prompt + response])).logits[0].float()
    return torch.log_softmax(logits / temperature, -1)[len(prompt) - 1 : -1].gather(
        -1, torch.tensor(response).unsqueeze(-1)
    )[:, 0]


def new_student(tokenizer, seed):
    return tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=seed)


@pytest.fixture(scope="module")
def student_server(tmp_path_factory, tokenizer):
    """A vLLM server as a user starts it for `rollout.server`: LoRA enabled, processed
    log-probs, development endpoints (full-weight reloads) on; it starts on another model than
    the students of the tests, which push their own weights."""
    root = tmp_path_factory.mktemp("vllm-student")
    new_student(tokenizer, seed=1).save_pretrained(root)
    tokenizer.save_pretrained(root)
    arguments = ["--logprobs-mode", "processed_logprobs", "--generation-config", "vllm"]
    arguments += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1"]
    arguments += ["--no-enable-prefix-caching"]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with vllm_server(root, *arguments, env=env) as url:
        yield url


def train_on_server(tmp_path, tokenizer, graph_task, server, student, steps):
    config = make_config(tmp_path, steps=steps, temperature=0.7, lr=5e-2)
    config.loss = LossConfig(kind="sampled_token")
    config.rollout = RolloutConfig(backend="vllm", server=server, server_dir=str(tmp_path / "push"))
    teacher = tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=9)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student)
    stats = [trainer.step() for _ in range(steps)]
    return trainer, stats


@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora"])
def test_server_follows_the_trained_student(student_server, tmp_path, tokenizer, graph_task, lora):
    """The server starts on another model; the student's weights (a LoRA student: base weights
    once, then its adapter) are pushed at start and after each of 3 steps. The sampled tokens'
    log-probs matched the learner's at T = 0.7 every step, and afterwards the server scores a
    fixed sequence as the trained student does."""
    student = new_student(tokenizer, seed=3)
    if lora:
        student = add_lora(student, LoraConfig(r=4, alpha=8))
    prompt = tokenizer("a b c", add_special_tokens=False).input_ids or [1, 2]
    response = [3, 4, 5, 6]
    before = student_logprobs(student, prompt, response)
    trainer, stats = train_on_server(tmp_path, tokenizer, graph_task, student_server, student, 3)
    assert all(s.sampler_mismatch is not None and s.sampler_mismatch < 1e-4 for s in stats)
    engine = trainer.student_sampler
    assert isinstance(engine, VLLMServerRollout) and engine.version == 3
    after = student_logprobs(student, prompt, response)
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(engine.logprobs_of(prompt, response), after, atol=1e-4)
    (directory,) = (tmp_path / "push").iterdir()  # the run's own, inside rollout.server_dir
    assert [p.name for p in directory.iterdir()] == (["adapter-5"] if lora else [])
    batch = engine.generate(graph_task.examples("eval", 8), 8, temperature=1.0)
    assert int(batch.response_ids.max()) < len(tokenizer)
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        assert tokenizer.eos_token_id not in ids[mask.bool()].tolist()[:-1]
    engine.close()
    assert not directory.exists()


def fake_server(model, raw=False, dev=True):
    """An in-memory vLLM server holding `model`: greedy completions with the log-probs of
    z/T over the allowed ids (raw: of z), and the development endpoints when `dev`."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "student"}]})
        if path in ("/collective_rpc", "/reset_prefix_cache", "/server_info"):
            return httpx.Response(200 if dev else 404, json={})
        body = json.loads(request.content)
        assert path == "/v1/completions"
        ids = list(body["prompt"])
        temperature = 1.0 if raw else body["temperature"]
        tokens, values = [], []
        for _ in range(body["max_tokens"]):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            if body.get("allowed_token_ids") is not None:  # masked before sampling
                logits = logits[body["allowed_token_ids"]]
            token = int(logits.argmax())
            tokens.append(token)
            values.append(float(torch.log_softmax(logits / temperature, -1)[token]))
            ids.append(token)
        choice = {"token_ids": tokens, "logprobs": {"token_logprobs": values}}
        return httpx.Response(200, json={"choices": [choice]})

    return httpx.MockTransport(handle)


def test_refusals_are_one_line(tmp_path, tokenizer):
    """Raw log-probs, other weights than the student's, no development endpoints for a
    full-weight push: each stops at start with one line saying what to change."""
    student = new_student(tokenizer, seed=3).eval()
    config = RolloutConfig(backend="vllm", server="http://h:1", server_dir=str(tmp_path))

    def open_with(transport):
        return VLLMServerRollout(student, tokenizer, config, transport=transport)

    engine = open_with(fake_server(student))
    assert engine.version == 0
    engine.close()
    cases = [
        (fake_server(student, raw=True), "--logprobs-mode processed_logprobs"),
        (fake_server(new_student(tokenizer, seed=4)), "does not sample with the student's"),
        (fake_server(student, dev=False), "VLLM_SERVER_DEV_MODE=1"),
    ]
    for transport, message in cases:
        with pytest.raises(OpdistillError, match=message) as error:
            open_with(transport)
        assert "\n" not in str(error.value)
