"""The vLLM-served teacher against an in-memory server speaking vLLM's OpenAI-compatible API
(answers computed from a tiny model), and against a real vLLM server where vLLM is installed."""

import json

import httpx
import pytest
import torch
from tests.vllm_server import vllm_server

from opdistill.batch import batch_logits
from opdistill.config import LossConfig, ModelConfig
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.rollout import HFGenerateRollout
from opdistill.teachers import check_answers, open_teacher, topk_from_logits
from opdistill.teachers.vllm_server import VLLMServedTeacher


def fake_vllm(model, tokenizer, max_logprobs=20, requests=None, fail_first=0):
    """A MockTransport answering /v1/models, /tokenize, /detokenize and /v1/completions with
    prompt_logprobs the way vLLM does (a dict per position: top-k plus the actual token)."""
    state = {"failures": fail_first}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if state["failures"] > 0:
            state["failures"] -= 1
            return httpx.Response(503, json={"error": {"message": "loading"}})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "teacher", "max_model_len": 256}]})
        body = json.loads(request.content)
        if path == "/tokenize":
            ids = tokenizer(body["prompt"], add_special_tokens=False).input_ids
            return httpx.Response(200, json={"tokens": ids, "count": len(ids)})
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": tokenizer.decode(body["tokens"])})
        assert path == "/v1/completions" and body["max_tokens"] == 1
        k = body["prompt_logprobs"]
        if k > max_logprobs:
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed"
            return httpx.Response(400, json={"error": {"message": message, "code": 400}})
        if requests is not None:
            requests.append(len(body["prompt"]))
        choices = []
        for index, ids in enumerate(body["prompt"]):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1)
            positions = [None]
            for t in range(1, len(ids)):
                row = logprobs[t - 1]
                ranks = (row > row[ids[t]]).sum() + 1
                entry = {str(ids[t]): {"logprob": float(row[ids[t]]), "rank": int(ranks)}}
                top = row.topk(k) if k else None
                for r, (v, i) in enumerate(zip(*top, strict=True) if k else []):
                    entry[str(int(i))] = {"logprob": float(v), "rank": r + 1}
                positions.append(entry)
            choices.append({"index": index, "text": "", "prompt_logprobs": positions})
        return httpx.Response(200, json={"choices": choices[::-1]})  # any order

    return httpx.MockTransport(handle)


def teacher_and_batch(tokenizer, graph_task):
    teacher = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=7)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=8)
    torch.manual_seed(0)
    batch = HFGenerateRollout(student, tokenizer).generate(graph_task.examples("eval", 5), 6)
    return teacher.eval(), batch


def test_topk_and_token_logprobs_match_the_model(tokenizer, graph_task):
    """Same numbers as the teacher's own top-k over the tokenizer's vocabulary (the tiny model
    has no padded columns here), batched into several requests."""
    teacher = tiny_llama(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=7, pad_vocab_to_multiple_of=1
    ).eval()
    _, batch = teacher_and_batch(tokenizer, graph_task)
    requests = []
    served = VLLMServedTeacher(
        "vllm+http://127.0.0.1:8000",
        tokenizer,
        transport=fake_vllm(teacher, tokenizer, requests=requests),
        max_batch_tokens=40,
    )
    assert served.context_window == 256
    with torch.no_grad():
        logits = batch_logits(teacher, batch, len(tokenizer))
    expected = topk_from_logits(logits, batch.response_ids, 4)
    answer = served.topk(batch, 4)
    mask = batch.response_mask.bool()
    assert torch.equal(answer.indices[mask], expected.indices[mask])
    assert torch.allclose(answer.logprobs[mask], expected.logprobs[mask], atol=1e-5)
    assert torch.allclose(answer.token_logprobs[mask], expected.token_logprobs[mask], atol=1e-5)
    tokens = served.token_logprobs(batch)
    assert torch.allclose(tokens[mask], expected.token_logprobs[mask], atol=1e-5)
    assert len(requests) > 2 and sum(requests) == 2 * len(batch.examples)  # topk, then tokens


def test_answers_and_one_line_errors(tokenizer, graph_task):
    teacher, batch = teacher_and_batch(tokenizer, graph_task)
    served = VLLMServedTeacher(
        "vllm+http://h:1", tokenizer, transport=fake_vllm(teacher, tokenizer, max_logprobs=2)
    )
    assert served.answers == {"topk", "token_logprobs"}
    with pytest.raises(OpdistillError, match=r"loss.kind='reverse_kl' needs full logits"):
        check_answers(served, "logits", "loss.kind='reverse_kl'")
    with pytest.raises(OpdistillError, match="temperature 1 only"):
        served.topk(batch, 2, temperature=0.5)
    with pytest.raises(OpdistillError, match="greater than max allowed") as error:
        served.topk(batch, 5)
    assert "\n" not in str(error.value)


def test_retries_transient_failures(tokenizer, graph_task):
    teacher, batch = teacher_and_batch(tokenizer, graph_task)
    served = VLLMServedTeacher(
        "vllm+http://h:1", tokenizer, transport=fake_vllm(teacher, tokenizer, fail_first=2)
    )
    assert served.token_logprobs(batch).shape == batch.response_ids.shape


def test_refuses_another_tokenizer(tokenizer, graph_task):
    from opdistill.models.tokenizers import build_word_tokenizer

    other = build_word_tokenizer(["completely different words here"] * 3)
    teacher, _ = teacher_and_batch(tokenizer, graph_task)
    with pytest.raises(OpdistillError, match="different tokenizer"):
        VLLMServedTeacher("vllm+http://h:1", tokenizer, transport=fake_vllm(teacher, other))


def test_config_addresses(tokenizer):
    from opdistill.config import Config, DataConfig, TrainConfig, validate

    config = Config(
        model=ModelConfig(student="s", teacher="vllm+http://127.0.0.1:1"),
        data=DataConfig(task="graph"),
        loss=LossConfig(kind="sampled_token"),
        train=TrainConfig(student_data_fraction=1.0),
    )
    validate(config)
    config.train = TrainConfig(student_data_fraction=0.5, off_policy_source="teacher")
    config.loss = LossConfig(kind="forward_kl", teacher_top_k=4)
    with pytest.raises(OpdistillError, match="served teacher, which only scores"):
        validate(config)
    config.model.teacher_timeout = 0.3
    config.train = TrainConfig()
    with pytest.raises(OpdistillError, match="did not answer within"):
        open_teacher(config, tokenizer)  # nothing listens on port 1


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory, tokenizer):
    """A real vLLM server on 127.0.0.1 serving a tiny teacher; stopped after the module."""
    root = tmp_path_factory.mktemp("vllm-teacher")
    teacher = tiny_llama(
        tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=7, pad_vocab_to_multiple_of=1
    )
    teacher.save_pretrained(root)
    tokenizer.save_pretrained(root)
    with vllm_server(root, "--max-logprobs", "8") as url:
        yield f"vllm+{url}", teacher.eval()


def test_real_vllm_server_scores_like_the_model(served_teacher, tokenizer, graph_task):
    url, teacher = served_teacher
    _, batch = teacher_and_batch(tokenizer, graph_task)
    served = VLLMServedTeacher(url, tokenizer)
    with torch.no_grad():
        logits = batch_logits(teacher, batch, len(tokenizer))
    expected = topk_from_logits(logits, batch.response_ids, 4)
    answer = served.topk(batch, 4)
    mask = batch.response_mask.bool()
    assert torch.allclose(answer.token_logprobs[mask], expected.token_logprobs[mask], atol=1e-4)
    assert torch.allclose(answer.logprobs[mask], expected.logprobs[mask], atol=1e-4)
