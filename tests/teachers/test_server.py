"""The served teacher: the HTTP server, the RemoteTeacher client and their use in training."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from safetensors.torch import load as load_tensors  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from opdistill.batch import dataset_batch  # noqa: E402
from opdistill.config import (  # noqa: E402
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    MiniLLMConfig,
    ModelConfig,
    TrainConfig,
    validate,
)
from opdistill.errors import OpdistillError  # noqa: E402
from opdistill.models.loading import check_model_paths, tiny_llama  # noqa: E402
from opdistill.models.tokenizers import tokenizer_fingerprint  # noqa: E402
from opdistill.teachers.base import ModelTeacher  # noqa: E402
from opdistill.teachers.http import RemoteTeacher  # noqa: E402
from opdistill.teachers.server import is_loopback, listen, teacher_app  # noqa: E402
from opdistill.trainer import Trainer, build_trainer  # noqa: E402

TOKEN = "s3cret-token"


@contextlib.contextmanager
def live_server(app):
    """`app` served by uvicorn on a free loopback port in a background thread."""
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_teacher(tokenizer):
    return tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)


def tiny_student(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)


@pytest.fixture(scope="module")
def teacher_model(tokenizer):
    return tiny_teacher(tokenizer).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def app(tokenizer, teacher_model):
    return teacher_app(
        copy.deepcopy(teacher_model),
        len(tokenizer),
        token=TOKEN,
        max_request_bytes=4096,
        max_batch_tokens=400,
        model_name="tiny",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


@pytest.fixture(scope="module")
def url(app):
    with live_server(app) as address:
        yield address


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as test_client:
        yield test_client


@pytest.fixture
def batch(tokenizer, graph_task):
    """Six rows whose prompts and responses differ in length (padding on both sides)."""
    examples = graph_task.examples("train", 6)
    examples[1] = dataclasses.replace(examples[1], completion="A")
    examples[4] = dataclasses.replace(examples[4], completion=f"{examples[4].completion} B C")
    return dataset_batch(tokenizer, examples)


def remote(url, tokenizer, **kwargs):
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("tokenizer_fingerprint", tokenizer_fingerprint(tokenizer))
    return RemoteTeacher(url, len(tokenizer), **kwargs)


def masked(tensor, mask):
    return tensor[mask.bool()]


def body(prompt_ids=([1, 2],), response_ids=([3],), **fields):
    return json.dumps(
        {"prompt_ids": list(prompt_ids), "response_ids": list(response_ids), **fields}
    ).encode()


# ----------------------------------------------------------------------------- equivalence
def test_training_against_the_served_teacher_matches_the_in_process_teacher(
    tmp_path, tokenizer, graph_task, url
):
    config = Config(
        model=ModelConfig(student="mem", teacher=url),
        data=DataConfig(task="graph"),
        loss=LossConfig(kind="forward_kl"),
        train=TrainConfig(
            steps=4,
            batch_size=4,
            lr=1e-2,
            max_new_tokens=6,
            student_data_fraction=0.5,  # on-policy rollouts and dataset batches
            output_dir=str(tmp_path / "run"),
            progress=False,
        ),
        eval=EvalConfig(num_prompts=4, num_samples=2, ks=[1, 2], max_new_tokens=6),
    )
    train, held_out = graph_task.examples("train", 8), graph_task.examples("eval", 4)

    def run(**teacher):
        trainer = Trainer(
            config, tiny_student(tokenizer), tokenizer, graph_task, train, held_out, **teacher
        )
        stats = [trainer.step() for _ in range(4)]
        return stats, trainer.evaluate()

    local, local_eval = run(teacher_model=tiny_teacher(tokenizer))
    with remote(url, tokenizer) as teacher:
        served, served_eval = run(teacher=teacher)
    assert {s.on_policy for s in local} == {True, False}
    assert [s.on_policy for s in served] == [s.on_policy for s in local]
    assert [s.num_tokens for s in served] == [s.num_tokens for s in local]
    for a, b in zip(local, served, strict=True):
        assert math.isclose(a.loss, b.loss, rel_tol=1e-6, abs_tol=1e-6), (a.loss, b.loss)
    assert math.isclose(
        local_eval["teacher_rkl"], served_eval["teacher_rkl"], rel_tol=1e-6, abs_tol=1e-6
    )


def test_remote_logits_and_topk_match_the_model_teacher(tokenizer, url, teacher_model, batch):
    local = ModelTeacher(copy.deepcopy(teacher_model), len(tokenizer))
    mask = batch.response_mask
    with remote(url, tokenizer) as teacher:
        logits = teacher.logits(batch)
        assert logits.shape == (*batch.response_ids.shape, len(tokenizer))
        assert logits.dtype == torch.float32
        torch.testing.assert_close(
            masked(logits, mask), masked(local.logits(batch), mask), atol=1e-6, rtol=1e-5
        )
        assert not logits[~mask.bool()].any()  # positions past a response are 0
        for k, temperature in ((5, 1.0), (3, 0.7), (len(tokenizer) + 10, 2.0)):
            got, want = teacher.topk(batch, k, temperature), local.topk(batch, k, temperature)
            assert got.indices.shape == want.indices.shape
            assert torch.equal(masked(got.indices, mask), masked(want.indices, mask))
            for name in ("logprobs", "token_logprobs"):
                torch.testing.assert_close(
                    masked(getattr(got, name), mask),
                    masked(getattr(want, name), mask),
                    atol=1e-5,
                    rtol=1e-5,
                )
            tail = 1 - got.logprobs[~mask.bool()].exp().sum(-1)  # padding: a proper distribution
            assert (tail >= -1e-6).all()
        tokens_only = teacher.topk(batch, 0, 1.5)
        assert tokens_only.indices.shape == (*batch.response_ids.shape, 0)
        torch.testing.assert_close(
            masked(tokens_only.token_logprobs, mask),
            masked(local.topk(batch, 1, 1.5).token_logprobs, mask),
            atol=1e-5,
            rtol=1e-5,
        )


def test_requests_split_under_a_small_max_batch_tokens(tokenizer, url, batch):
    class Counting(httpx.HTTPTransport):
        scores = 0

        def handle_request(self, request):
            Counting.scores += request.url.path == "/v1/score"
            return super().handle_request(request)

    with remote(url, tokenizer) as whole:
        want_logits = whole.logits(batch)
        want_top = whole.topk(batch, 4)
        assert Counting.scores == 0
    width = int(batch.prompt_mask.sum(1).max() + batch.response_mask.sum(1).max())
    with remote(url, tokenizer, max_batch_tokens=width, transport=Counting()) as split:
        assert split.max_batch_tokens == width
        got_logits = split.logits(batch)
        assert Counting.scores == len(batch.examples)  # one row per request
        got_top = split.topk(batch, 4)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=1e-5)
    assert torch.equal(got_top.indices, want_top.indices)
    torch.testing.assert_close(got_top.logprobs, want_top.logprobs, atol=1e-6, rtol=1e-5)


def test_the_server_limit_splits_requests_and_a_row_too_long_is_a_clear_error(
    tokenizer, url, batch
):
    with remote(url, tokenizer) as teacher:
        assert teacher.max_batch_tokens == 400 and teacher.max_request_bytes == 4096
        big = dataset_batch(tokenizer, list(batch.examples) * 8)  # over 400 tokens: split
        torch.testing.assert_close(
            teacher.logits(big)[: len(batch.examples)], teacher.logits(batch)
        )
        long = dataset_batch(tokenizer, list(batch.examples[:1]))
        long.prompt_ids = long.prompt_ids.repeat(1, 30)
        long.prompt_mask = long.prompt_mask.repeat(1, 30)
        with pytest.raises(OpdistillError, match=r"row 0 \(\d+ tokens.*exceeds the teacher server"):
            teacher.logits(long)


# ---------------------------------------------------------------------------- protocol
def test_info(client, tokenizer):
    info = client.get("/v1/info").json()
    assert info == {
        "model": "tiny",
        "vocab_size": len(tokenizer),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "modes": ["full", "topk", "token"],
        "max_batch_tokens": 400,
        "max_request_bytes": 4096,
        "context_window": 256,
    }


def test_score_answers_safetensors_padded_to_the_longest_response(client, tokenizer):
    response = client.post(
        "/v1/score",
        content=body([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]], mode="topk", k=3),
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    tensors = load_tensors(response.content)
    assert tensors["indices"].shape == (2, 4, 3) and tensors["indices"].dtype == torch.int32
    assert tensors["logprobs"].shape == (2, 4, 3) and tensors["logprobs"].dtype == torch.float32
    assert tensors["token_logprobs"].shape == (2, 4)
    full = load_tensors(client.post("/v1/score", content=body(mode="full")).content)
    assert full["logits"].shape == (1, 1, len(tokenizer))
    token = load_tensors(client.post("/v1/score", content=body(mode="token")).content)
    assert set(token) == {"token_logprobs"}


def test_a_bearer_token_is_required(app, url, tokenizer):
    with TestClient(app) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = anonymous.get("/v1/info", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in response.json()["error"]
        assert anonymous.post("/v1/score", content=body()).status_code == 401
    with pytest.raises(
        OpdistillError,
        match=r"refused the request: this server needs a bearer token.*\(HTTP 401\)$",
    ):
        remote(url, tokenizer, token=None)
    with pytest.raises(OpdistillError, match=r"wrong bearer token \(HTTP 401\)"):
        remote(url, tokenizer, token="wrong")


def test_an_oversized_body_is_refused_with_413(client):
    response = client.post("/v1/score", content=b"[" * 5000)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error == "request body of 5000 bytes exceeds the limit of 4096 bytes"

    def chunked():  # no Content-Length: the bytes read are counted
        for _ in range(10):
            yield b" " * 1000

    response = client.post("/v1/score", content=chunked())
    assert response.status_code == 413
    assert "exceeds the limit of 4096 bytes" in response.json()["error"]


def test_too_many_tokens_are_refused_with_413(client):
    response = client.post("/v1/score", content=body([[1] * 150] * 2, [[2] * 60] * 2))
    assert response.status_code == 413
    assert "420 tokens" in response.json()["error"]
    assert "max_batch_tokens=400" in response.json()["error"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt_ids": [[1]], "response_ids": [[2]], "temperature": NaN}', "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (body(extra=1), "unknown field 'extra'"),
        (b'{"response_ids": [[1]]}', "missing field 'prompt_ids'"),
        (body(prompt_ids=[]), "prompt_ids must be a non-empty list"),
        (body(prompt_ids=[3]), r"prompt_ids\[0\] must be a list"),
        (body(response_ids=[[]]), r"response_ids\[0\] is empty"),
        (body(response_ids=[[1.0]]), r"1\.0 is not a token id"),
        (body(response_ids=[[True]]), "True is not a token id"),
        (body(response_ids=[["a"]]), "'a' is not a token id"),
        (body(response_ids=[[99999]]), r"token id 99999 is outside the vocabulary \[0, \d+\)"),
        (body(prompt_ids=[[-1]]), r"token id -1 is outside the vocabulary"),
        (body(response_ids=[[1], [2]]), "prompt_ids has 1 rows but response_ids has 2"),
        (body(mode="logits"), "unknown mode 'logits' \\(valid: full, topk, token\\)"),
        (body(mode="topk", k=0), "k=0 is out of range"),
        (body(mode="topk", k=10**6), "is out of range"),
        (body(mode="topk", k="5"), "k must be an integer"),
        (body(temperature=0), "temperature must be a finite number > 0"),
        (body(temperature=-1.5), "temperature must be a finite number > 0"),
        (body(temperature="hot"), "temperature must be a number"),
        (body([[1] * 200], [[2] * 100]), "exceed the teacher's context window of 256"),
    ],
)
def test_bad_requests_get_400_with_one_line(client, content, message):
    response = client.post("/v1/score", content=content)
    assert response.status_code == 400
    error = response.json()["error"]
    assert re.search(message, error), error
    assert "\n" not in error and "Traceback" not in response.text


def test_unknown_paths_and_methods(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = client.get("/v1/score")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}


def test_a_failing_model_gives_a_generic_500_and_a_server_log(tokenizer, caplog):
    model = tiny_teacher(tokenizer)

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory at /secret/path")

    model.forward = types.MethodType(broken, model)
    with TestClient(teacher_app(model, len(tokenizer))) as failing:
        response = failing.post("/v1/score", content=body())
    assert response.status_code == 500
    assert response.json() == {
        "error": "the teacher failed to score the request; see the server log"
    }
    assert "secret" not in response.text
    assert "CUDA out of memory" in caplog.text


def test_app_checks_its_arguments(tokenizer):
    with pytest.raises(OpdistillError, match="does not fit the teacher's 64 embeddings"):
        teacher_app(tiny_teacher(tokenizer), 1000)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


# ----------------------------------------------------------------------- client failures
def forwarding(client, fail):
    """A transport answering through `client`, after the failures `fail` returns."""
    calls = []

    def handle(request):
        calls.append(request.url.path)
        failure = fail(request, len(calls))
        if failure is not None:
            return failure
        answer = client.request(
            request.method, request.url.path, content=request.content, headers=request.headers
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.MockTransport(handle), calls


def test_transient_failures_are_retried(client, tokenizer, batch):
    def fail(request, call):
        if request.url.path == "/v1/score" and call <= 3:
            return httpx.Response(503, json={"error": "busy"})
        if call == 4:
            raise httpx.ConnectError("connection reset")
        if call == 5:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return None

    transport, calls = forwarding(client, fail)
    with remote("http://teacher.test", tokenizer, transport=transport, timeout=30) as teacher:
        started = time.monotonic()
        got = teacher.logits(batch)
        assert time.monotonic() - started < 10
    assert calls == ["/v1/info", *["/v1/score"] * 5]
    transport, _ = forwarding(client, lambda request, call: None)
    with remote("http://teacher.test", tokenizer, transport=transport) as direct:
        torch.testing.assert_close(got, direct.logits(batch))


def test_a_client_error_is_not_retried(client, tokenizer, batch):
    def fail(request, call):
        if request.url.path == "/v1/score":
            return httpx.Response(400, json={"error": "k=0 is out of range"})
        return None

    transport, calls = forwarding(client, fail)
    teacher = remote("http://teacher.test", tokenizer, transport=transport)
    with pytest.raises(OpdistillError) as error:
        teacher.logits(batch)
    assert str(error.value) == (
        "teacher server at http://teacher.test refused the request: k=0 is out of range (HTTP 400)"
    )
    assert calls == ["/v1/info", "/v1/score"]


def test_a_dead_server_fails_within_the_timeout(tokenizer):
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    started = time.monotonic()
    with pytest.raises(OpdistillError) as error:
        RemoteTeacher(f"http://127.0.0.1:{port}", len(tokenizer), timeout=0.5)
    assert time.monotonic() - started < 3
    message = str(error.value)
    assert message.startswith(
        f"teacher server at http://127.0.0.1:{port} did not answer within 0.5 s: ConnectError"
    )
    assert "\n" not in message


def test_a_server_that_stays_busy_fails_within_the_timeout(tokenizer, client):
    transport, calls = forwarding(client, lambda r, c: httpx.Response(503, json={"error": "busy"}))
    with pytest.raises(OpdistillError, match=r"did not answer within 0.3 s: HTTP 503: busy$"):
        remote("http://teacher.test", tokenizer, transport=transport, timeout=0.3)
    assert len(calls) >= 2


def test_a_tokenizer_or_vocabulary_mismatch_is_refused(client, tokenizer):
    transport, _ = forwarding(client, lambda request, call: None)
    with pytest.raises(OpdistillError, match="uses a different tokenizer than the student"):
        remote("http://t.test", tokenizer, transport=transport, tokenizer_fingerprint="0" * 64)
    with pytest.raises(OpdistillError, match=r"has a vocabulary of \d+ tokens, the student's"):
        RemoteTeacher("http://t.test", len(tokenizer) + 1, token=TOKEN, transport=transport)


def test_something_else_at_the_address_is_refused(tokenizer):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text="<html>hi</html>"))
    with pytest.raises(OpdistillError, match="does not look like an opdistill teacher server"):
        RemoteTeacher("http://t.test", len(tokenizer), transport=transport)
    with pytest.raises(OpdistillError, match="must start with http"):
        RemoteTeacher("t.test:8000", len(tokenizer))


# ------------------------------------------------------------------------ configuration
def test_config_refuses_teacher_sampling_from_a_served_teacher():
    def config(**changes):
        base = Config(model=ModelConfig(student="s", teacher="http://127.0.0.1:8000"))
        for section, values in changes.items():
            setattr(base, section, values)
        return base

    validate(config())
    validate(config(loss=LossConfig(kind="minillm", minillm=MiniLLMConfig(teacher_mix=0.0))))
    for bad in (
        config(train=TrainConfig(student_data_fraction=0.5, off_policy_source="teacher")),
        config(loss=LossConfig(kind="minillm")),  # teacher_mix defaults to 0.2
    ):
        with pytest.raises(OpdistillError, match="a served teacher, which only scores"):
            validate(bad)
    with pytest.raises(OpdistillError, match=r"model\.teacher_timeout must be > 0"):
        validate(Config(model=ModelConfig(student="s", teacher="t", teacher_timeout=0)))
    check_model_paths("gpt2", "https://teacher.example:8443", None)  # no local path check


def test_build_trainer_connects_to_a_served_teacher(tmp_path, saved_pair, url, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_TOKEN", TOKEN)
    config = Config(
        model=ModelConfig(
            student=str(saved_pair / "student"),
            teacher=url,
            teacher_token_env="MY_TEACHER_TOKEN",
            teacher_timeout=5,
        ),
        data=DataConfig(task="graph", train_size=8, eval_size=0),
        train=TrainConfig(steps=1, batch_size=2, max_new_tokens=4, output_dir=str(tmp_path)),
    )
    trainer = build_trainer(config)
    assert isinstance(trainer.teacher, RemoteTeacher) and trainer.teacher_sampler is None
    assert trainer.teacher.timeout == 5
    assert math.isfinite(trainer.step().loss)
    monkeypatch.delenv("MY_TEACHER_TOKEN")
    with pytest.raises(OpdistillError, match="HTTP 401"):
        build_trainer(config)


def test_eval_and_train_commands_with_a_served_teacher(
    tmp_path, saved_pair, url, monkeypatch, capsys
):
    from opdistill.cli import main

    monkeypatch.setenv("OPDISTILL_TEACHER_TOKEN", TOKEN)
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {saved_pair / "teacher"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 20, eval_size: 4}}
train: {{steps: 1, batch_size: 2, max_new_tokens: 4, output_dir: {tmp_path / "out"},
         progress: false}}
eval: {{num_prompts: 4, num_samples: 2, ks: [1, 2], max_new_tokens: 4}}
""")
    # the saved teacher is the served one (same size and seed)
    assert main(["eval", str(path)]) == 0
    local = json.loads(capsys.readouterr().out)["teacher_rkl"]
    assert main(["eval", str(path), "--set", f"model.teacher={url}"]) == 0
    served = json.loads(capsys.readouterr().out)["teacher_rkl"]
    assert math.isclose(local, served, rel_tol=1e-6, abs_tol=1e-6)

    argv = ["train", str(path), "--set", f"model.teacher={url}"]
    seqkd = ["--set", "train.student_data_fraction=0.5", "--set", "train.off_policy_source=teacher"]
    assert main([*argv, *seqkd]) == 2
    error = capsys.readouterr().err
    assert "model.teacher is a served teacher, which only scores" in error
    assert error.count("\n") == 1
    assert main(argv) == 0
    assert "teacher_rkl" in json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_the_serve_teacher_command(saved_pair, tokenizer):
    env = {**os.environ, "OPDISTILL_TEACHER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "opdistill.cli", "serve-teacher", str(saved_pair / "teacher")),
            *("--port", "0", "--max-batch-tokens", "1000"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "serve-teacher exited"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+) with a bearer token", line).group(1))
        with RemoteTeacher(
            f"http://127.0.0.1:{port}",
            len(tokenizer),
            token=TOKEN,
            timeout=30,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        ) as teacher:
            assert teacher.info["max_batch_tokens"] == 1000
            assert teacher.info["model"] == str(saved_pair / "teacher")
    finally:
        process.terminate()
        process.wait(30)


# ------------------------------------------------------------------- what training asks for
@pytest.mark.parametrize(
    ("loss", "modes"),
    [
        (LossConfig(kind="sampled_token"), {"token"}),
        (LossConfig(kind="sampled_token", teacher_top_k=4), {"token"}),
        (LossConfig(kind="forward_kl", teacher_top_k=4), {"topk"}),
        (LossConfig(kind="forward_kl"), {"full"}),
    ],
)
def test_training_asks_the_served_teacher_for_the_cheapest_answer(
    client, tokenizer, graph_task, tmp_path, loss, modes
):
    """Every score request of a training step uses the cheapest mode the objective needs; the
    token mode's answers are a small fraction of the full logits' bytes."""
    asked, answered = [], []

    def spy(request, call):
        if request.url.path == "/v1/score":
            asked.append(json.loads(request.content)["mode"])
        return None

    transport, _ = forwarding(client, spy)

    class Measuring(httpx.BaseTransport):
        def handle_request(self, request):
            response = transport.handle_request(request)
            if request.url.path == "/v1/score":
                answered.append(len(response.content))
            return response

    config = Config(
        model=ModelConfig(student="mem", teacher="http://teacher.test"),
        data=DataConfig(task="graph"),
        loss=loss,
        train=TrainConfig(
            steps=2, batch_size=4, max_new_tokens=6, output_dir=str(tmp_path), progress=False
        ),
    )
    validate(config)
    with remote("http://teacher.test", tokenizer, transport=Measuring()) as teacher:
        trainer = Trainer(
            config,
            tiny_student(tokenizer),
            tokenizer,
            graph_task,
            graph_task.examples("train", 8),
            teacher=teacher,
        )
        tokens = sum(trainer.step().num_tokens for _ in range(2))
    assert asked and set(asked) == modes
    if modes == {"token"}:  # float32 per response token, plus the safetensors header
        assert sum(answered) < 4 * tokens + 200 * len(answered)
        assert sum(answered) < 4 * tokens * len(tokenizer) / 10
