"""A teacher served over HTTP: `opdistill serve-teacher MODEL`, read by `RemoteTeacher`.

Endpoints (JSON errors are `{"error": "one line"}`):

- `GET /v1/info`: the model name, vocabulary size, tokenizer fingerprint, scoring modes, limits
  and context window.
- `POST /v1/score` with a JSON body `{"prompt_ids": [[int]], "response_ids": [[int]],
  "mode": "full" | "topk" | "token", "k": int, "temperature": float}`: unpadded token ids per
  row. The answer is a safetensors file (`application/octet-stream`) whose float32 tensors are
  right-padded to the longest response of the request: `logits` [B, R, V] (full); `indices`
  (int32), `logprobs` [B, R, k] and `token_logprobs` [B, R] (topk); `token_logprobs` (token).
  Log-probs are taken under softmax(logits / temperature); full logits ignore the temperature.

A request's size is `rows × (longest prompt + longest response)` tokens, the batch the model
runs; requests over `max_batch_tokens`, or bodies over `max_request_bytes`, are refused (413).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import torch
import uvicorn
from safetensors.torch import save as save_tensors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import PreTrainedModel

from opdistill.batch import left_pad, right_pad, sequence_logits
from opdistill.config import BOUNDS
from opdistill.errors import OpdistillError
from opdistill.losses.logprobs import gather_tokens, log_softmax_at
from opdistill.prompts import context_window
from opdistill.teachers.base import topk_from_logits

MODES = ("full", "topk", "token")
TEMPERATURE_RANGE = BOUNDS["loss.temperature"]
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_MAX_BATCH_TOKENS = 16384
FIELDS = ("prompt_ids", "response_ids", "mode", "k", "temperature")

logger = logging.getLogger("opdistill.teachers.server")


class _Refused(Exception):
    """A request the server will not run: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ScoreRequest:
    """A validated `/v1/score` request."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    mode: str
    k: int
    temperature: float


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_score_request(
    body: bytes, vocab_size: int, max_batch_tokens: int, window: int | None = None
) -> ScoreRequest:
    """Check a `/v1/score` body; raise `_Refused` (400, or 413 for too many tokens)."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise _Refused(400, f"the request body is not valid JSON ({reason[:80]})") from None
    if not isinstance(payload, dict):
        raise _Refused(400, "the request body must be a JSON object")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise _Refused(400, f"unknown field {_short(unknown[0])} (valid: {', '.join(FIELDS)})")
    prompts = _id_rows(payload, "prompt_ids", vocab_size)
    responses = _id_rows(payload, "response_ids", vocab_size)
    if len(prompts) != len(responses):
        raise _Refused(
            400, f"prompt_ids has {len(prompts)} rows but response_ids has {len(responses)}"
        )
    mode = payload.get("mode", "full")
    if mode not in MODES:
        raise _Refused(400, f"unknown mode {_short(mode)} (valid: {', '.join(MODES)})")
    k = payload.get("k", 0)
    if isinstance(k, bool) or not isinstance(k, int):
        raise _Refused(400, f"k must be an integer, got {_short(k)}")
    if mode == "topk" and not 1 <= k <= vocab_size:
        raise _Refused(400, f"k={k} is out of range: topk needs 1 <= k <= {vocab_size}")
    temperature = payload.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise _Refused(400, f"temperature must be a number, got {_short(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise _Refused(400, f"temperature must be a finite number > 0, got {temperature!r}")
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:  # beyond, log-softmax overflows to NaN / inf
        raise _Refused(400, f"temperature={temperature!r} is out of range [{low:g}, {high:g}]")
    longest_prompt = max(len(row) for row in prompts)
    longest_response = max(len(row) for row in responses)
    tokens = len(prompts) * (longest_prompt + longest_response)
    if tokens > max_batch_tokens:
        raise _Refused(
            413,
            f"the request holds {tokens} tokens (rows × (longest prompt + longest response)), "
            f"over this server's max_batch_tokens={max_batch_tokens}; send fewer rows",
        )
    if window is not None:
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if len(p) + len(r) > window:
                raise _Refused(
                    400,
                    f"row {row}: {len(p)} prompt + {len(r)} response tokens exceed the "
                    f"teacher's context window of {window} tokens",
                )
    return ScoreRequest(prompts, responses, mode, k, float(temperature))


def _id_rows(payload: dict[str, Any], name: str, vocab_size: int) -> list[list[int]]:
    """`payload[name]` as non-empty rows of token ids inside the vocabulary."""
    rows = payload.get(name)
    if rows is None:
        raise _Refused(400, f"missing field {name!r}")
    if not isinstance(rows, list) or not rows:
        raise _Refused(400, f"{name} must be a non-empty list of lists of token ids")
    for index, row in enumerate(rows):
        if not isinstance(row, list):
            raise _Refused(400, f"{name}[{index}] must be a list of token ids, got {_short(row)}")
        if not row:
            raise _Refused(400, f"{name}[{index}] is empty")
        if not all(type(token) is int for token in row):
            bad = next(token for token in row if type(token) is not int)
            raise _Refused(400, f"{name}[{index}]: {_short(bad)} is not a token id (an integer)")
        low, high = min(row), max(row)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise _Refused(
                400, f"{name}[{index}]: token id {bad} is outside the vocabulary [0, {vocab_size})"
            )
    return rows


def score(
    model: PreTrainedModel, vocab_size: int, request: ScoreRequest
) -> dict[str, torch.Tensor]:
    """The tensors that answer `request` (on the CPU, right-padded to the longest response)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(request.prompt_ids, 0)
    response_ids, response_mask = right_pad(request.response_ids, 0)
    response_ids = response_ids.to(device)
    logits = sequence_logits(
        model,
        prompt_ids.to(device),
        prompt_mask.to(device),
        response_ids,
        response_mask.to(device),
        vocab_size,
    ).float()
    if request.mode == "full":
        tensors = {"logits": logits}
    elif request.mode == "topk":
        top = topk_from_logits(logits, response_ids, request.k, request.temperature)
        tensors = {
            "indices": top.indices.to(torch.int32),
            "logprobs": top.logprobs,
            "token_logprobs": top.token_logprobs,
        }
    else:
        logprobs = log_softmax_at(logits, request.temperature, torch.float32)
        tensors = {"token_logprobs": gather_tokens(logprobs, response_ids)}
    return {name: tensor.contiguous().cpu() for name, tensor in tensors.items()}


def teacher_app(
    model: PreTrainedModel,
    vocab_size: int,
    *,
    token: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    model_name: str = "teacher",
    tokenizer_fingerprint: str | None = None,
) -> Starlette:
    """A Starlette app that scores responses with `model` (frozen, in eval mode).

    `vocab_size` is the tokenizer's size: ids at or beyond it are refused and logit columns past
    it (embedding padding) are dropped. With `token`, every request needs the header
    `Authorization: Bearer TOKEN`. One request runs on the model at a time.
    """
    embeddings = model.get_input_embeddings().num_embeddings
    if not 1 <= vocab_size <= embeddings:
        raise OpdistillError(
            f"vocab_size={vocab_size} does not fit the teacher's {embeddings} embeddings"
        )
    if max_request_bytes < 1 or max_batch_tokens < 1:
        raise OpdistillError("max_request_bytes and max_batch_tokens must be >= 1")
    model.eval().requires_grad_(False)
    window = context_window(model)
    lock = threading.Lock()
    expected = f"Bearer {token}".encode() if token else None
    info = {
        "model": model_name,
        "vocab_size": vocab_size,
        "tokenizer": tokenizer_fingerprint,
        "modes": list(MODES),
        "max_batch_tokens": max_batch_tokens,
        "max_request_bytes": max_request_bytes,
        "context_window": window,
    }

    def run(request: ScoreRequest) -> bytes:
        with lock, torch.inference_mode():
            tensors = score(model, vocab_size, request)
        return save_tensors(tensors)

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if expected is not None:
                given = request.headers.get("authorization", "").encode("utf-8", "replace")
                if not given:
                    return _error(
                        401,
                        "this server needs a bearer token: send 'Authorization: Bearer TOKEN'",
                        {"WWW-Authenticate": "Bearer"},
                    )
                if not hmac.compare_digest(given, expected):
                    return _error(401, "wrong bearer token", {"WWW-Authenticate": "Bearer"})
            try:
                return await handler(request)
            except _Refused as refused:
                return _error(refused.status, refused.message)
            except ClientDisconnect:  # nobody left to answer
                logger.warning("a client disconnected before its request arrived in full")
                return Response(status_code=400)
            except Exception:
                logger.exception("scoring failed")
                return _error(500, "the teacher failed to score the request; see the server log")

        return endpoint

    async def get_info(request: Request) -> Response:
        return JSONResponse(info)

    async def post_score(request: Request) -> Response:
        body = await _read_body(request, max_request_bytes)
        parsed = parse_score_request(body, vocab_size, max_batch_tokens, window)
        data = await anyio.to_thread.run_sync(run, parsed)
        return Response(data, media_type="application/octet-stream")

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return _error(error.status_code, str(error.detail), error.headers)

    async def server_error(request: Request, error: Exception) -> Response:
        logger.error("unhandled error", exc_info=error)
        return _error(500, "internal server error; see the server log")

    return Starlette(
        routes=[
            Route("/v1/info", guarded(get_info), methods=["GET"]),
            Route("/v1/score", guarded(post_score), methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, 500: server_error},
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _Refused(400, f"invalid Content-Length {_short(declared)}")
        if int(declared) > limit:
            raise _Refused(
                413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OpdistillError(f"cannot listen on {host}:{port}: {reason}") from None


def serve_teacher(
    model: PreTrainedModel,
    vocab_size: int,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    model_name: str = "teacher",
    tokenizer_fingerprint: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve `teacher_app(model, ...)` with uvicorn on host:port until interrupted."""
    app = teacher_app(
        model,
        vocab_size,
        token=token,
        max_request_bytes=max_request_bytes,
        max_batch_tokens=max_batch_tokens,
        model_name=model_name,
        tokenizer_fingerprint=tokenizer_fingerprint,
    )
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("opdistill: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"opdistill: serving {model_name} (vocabulary {vocab_size}) on http://{shown}:{bound}"
        f"{' with a bearer token' if token else ''}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
