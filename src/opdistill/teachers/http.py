"""A teacher behind an `opdistill serve-teacher` server, scored over HTTP (`teachers.server`)."""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from opdistill.batch import Batch
from opdistill.errors import OpdistillError
from opdistill.models.tokenizers import tokenizer_fingerprint
from opdistill.teachers.base import Teacher, TopKLogprobs

try:
    import httpx
except ImportError:  # the 'serve' extra
    httpx = None

RETRY_STATUSES = (429, 502, 503, 504)
REQUEST_OVERHEAD_BYTES = 200  # the JSON object's keys, mode, k and temperature


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def _describe(error: Exception) -> str:
    text = _one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _server_message(response: httpx.Response) -> str:
    """The server's one-line `{"error": ...}` message, else the start of the body."""
    try:
        message = response.json().get("error")
        if isinstance(message, dict):  # OpenAI-style servers (vLLM): {"error": {"message": ...}}
            message = message.get("message") or message
    except (ValueError, AttributeError):
        message = None
    return _one_line(str(message) if message else response.text or response.reason_phrase)


class RemoteTeacher(Teacher):
    """The teacher behind an `opdistill serve-teacher` server.

    Sends each batch's unpadded rows (split into several requests when they exceed the server's
    `max_batch_tokens` or `max_request_bytes`, or this side's `max_batch_tokens`) and reassembles
    float32 tensors as wide as the batch's responses. Connection errors, timeouts and HTTP
    429/502/503/504 are retried with exponential backoff and jitter for up to `timeout` seconds
    per request; any other refusal is an `OpdistillError` with the server's message. At
    construction the server's vocabulary size and tokenizer fingerprint are checked.

    Positions past a row's response carry the answer for zero logits: 0 in `logits`, a uniform
    distribution (log-prob −log V) in `topk`.
    """

    def __init__(
        self,
        url: str,
        vocab_size: int,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        max_batch_tokens: int | None = None,
        tokenizer_fingerprint: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        if httpx is None:
            raise OpdistillError(
                f"the served teacher {url!r} needs httpx: pip install 'opdistill[serve]'"
            )
        if not url.lower().startswith(("http://", "https://")):
            raise OpdistillError(f"teacher server address {url!r} must start with http(s)://")
        if timeout <= 0:
            raise OpdistillError(f"teacher timeout must be > 0 seconds, got {timeout}")
        self.url = url.rstrip("/")
        self.vocab_size = vocab_size
        self.timeout = timeout
        self._rng = random.Random()  # jitter only; leaves the global RNGs alone
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.client = httpx.Client(
                base_url=self.url, headers=headers, transport=transport, timeout=timeout
            )
        except (httpx.InvalidURL, ValueError) as error:
            raise OpdistillError(f"teacher server address {url!r} is not valid ({error})") from None
        try:
            self.info = self._get_info()
            self._check_tokenizer(tokenizer_fingerprint)
        except BaseException:
            self.client.close()
            raise
        limits = [n for n in (self.info.get("max_batch_tokens"), max_batch_tokens) if n]
        self.max_batch_tokens = min(limits) if limits else None
        self.max_request_bytes: int | None = self.info.get("max_request_bytes")

    def _check_tokenizer(self, fingerprint: str | None) -> None:
        """Stop unless the server's vocabulary size and tokenizer fingerprint are ours."""
        served = self.info.get("vocab_size")
        if served != self.vocab_size:
            raise OpdistillError(
                f"teacher server at {self.url} has a vocabulary of {served} tokens, the "
                f"student's tokenizer {self.vocab_size}; serve a teacher of the student's "
                "tokenizer family"
            )
        theirs = self.info.get("tokenizer")
        if fingerprint and theirs and theirs != fingerprint:
            raise OpdistillError(
                f"teacher server at {self.url} uses a different tokenizer than the student "
                f"(fingerprint {str(theirs)[:12]} vs {fingerprint[:12]}: the vocabulary or "
                "the special tokens differ); serve the teacher with the student's tokenizer "
                "(--tokenizer) if it was trained with it"
            )

    @property
    def name(self) -> str:
        return f"the served teacher at {self.url}"

    @property
    def context_window(self) -> int | None:
        """The served model's context window in tokens, when it declares one."""
        return self.info.get("context_window")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def logits(self, batch: Batch) -> Tensor:
        """The teacher's logits [B, R, V] (float32) at the positions predicting each token."""
        rows, lengths = self._rows(batch)
        width = batch.response_ids.shape[1]
        out = torch.zeros(len(lengths), width, self.vocab_size, dtype=torch.float32)
        for chunk in self._chunks(rows, lengths):
            answer = self._score(rows, chunk, "full", 0, 1.0)
            logits = self._tensor(answer, "logits", (len(chunk), None, self.vocab_size))
            for j, i in enumerate(chunk):
                out[i, : lengths[i]] = logits[j, : lengths[i]]
        return out.to(batch.response_ids.device)

    @torch.no_grad()
    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs:
        """The teacher's top-k log-probs at temperature τ (k = 0: the response tokens' only)."""
        if not (math.isfinite(temperature) and temperature > 0):
            raise OpdistillError(f"teacher temperature must be > 0, got {temperature}")
        if k < 0:
            raise OpdistillError(f"k must be >= 0, got {k}")
        k = min(k, self.vocab_size)
        rows, lengths = self._rows(batch)
        result = TopKLogprobs.uniform(len(lengths), batch.response_ids.shape[1], k, self.vocab_size)
        mode = "topk" if k > 0 else "token"
        for chunk in self._chunks(rows, lengths):
            answer = self._score(rows, chunk, mode, k, temperature)
            tokens = self._tensor(answer, "token_logprobs", (len(chunk), None))
            if k > 0:
                top_ids = self._tensor(answer, "indices", (len(chunk), tokens.shape[1], k))
                top = self._tensor(answer, "logprobs", (len(chunk), tokens.shape[1], k))
            for j, i in enumerate(chunk):
                n = lengths[i]
                result.token_logprobs[i, :n] = tokens[j, :n]
                if k > 0:
                    result.indices[i, :n] = top_ids[j, :n].long()
                    result.logprobs[i, :n] = top[j, :n]
        return result.to(batch.response_ids.device)

    @torch.no_grad()
    def token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        """The response tokens' log-probs [B, R] at τ (the server's cheapest answer)."""
        return self.topk(batch, 0, temperature).token_logprobs

    # ------------------------------------------------------------------------- requests
    def _rows(self, batch: Batch) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        """Each row's unpadded prompt and response ids, and its response length."""
        prompt_mask = batch.prompt_mask.bool().cpu()
        prompt_ids = batch.prompt_ids.cpu()
        response_ids = batch.response_ids.cpu()
        lengths = batch.response_mask.cpu().sum(dim=1).tolist()
        rows = [
            (prompt_ids[i][prompt_mask[i]].tolist(), response_ids[i, :n].tolist())
            for i, n in enumerate(lengths)
        ]
        return rows, [int(n) for n in lengths]

    def _chunks(
        self, rows: list[tuple[list[int], list[int]]], lengths: list[int]
    ) -> list[list[int]]:
        """Row indices grouped into requests within the limits (rows without tokens left out)."""
        chunks: list[list[int]] = []
        current: list[int] = []
        longest_prompt = longest_response = size = 0
        for i, (prompt, response) in enumerate(rows):
            if lengths[i] == 0:
                continue
            tokens = len(prompt) + len(response)
            row_bytes = len(json.dumps(prompt)) + len(json.dumps(response)) + 4
            self._check_fits(i, tokens, row_bytes)
            p, r = max(longest_prompt, len(prompt)), max(longest_response, len(response))
            if current and not self._fits(len(current) + 1, p + r, size + row_bytes):
                chunks.append(current)
                current, p, r, size = [], len(prompt), len(response), 0
            current.append(i)
            longest_prompt, longest_response, size = p, r, size + row_bytes
        if current:
            chunks.append(current)
        return chunks

    def _fits(self, num_rows: int, width: int, size: int) -> bool:
        tokens_ok = self.max_batch_tokens is None or num_rows * width <= self.max_batch_tokens
        limit = self.max_request_bytes
        return tokens_ok and (limit is None or size + REQUEST_OVERHEAD_BYTES <= limit)

    def _check_fits(self, row: int, tokens: int, size: int) -> None:
        if not self._fits(1, tokens, size):
            raise OpdistillError(
                f"row {row} ({tokens} tokens, {size} bytes of JSON) exceeds the teacher server's "
                f"limits (max_batch_tokens={self.max_batch_tokens}, max_request_bytes="
                f"{self.max_request_bytes}); start the server with larger --max-batch-tokens / "
                "--max-request-mb"
            )

    def _score(
        self,
        rows: list[tuple[list[int], list[int]]],
        chunk: list[int],
        mode: str,
        k: int,
        temperature: float,
    ) -> dict[str, Tensor]:
        payload = {
            "prompt_ids": [rows[i][0] for i in chunk],
            "response_ids": [rows[i][1] for i in chunk],
            "mode": mode,
            "k": k,
            "temperature": temperature,
        }
        body = json.dumps(payload, separators=(",", ":")).encode()
        response = self._request(
            "POST", "/v1/score", content=body, headers={"Content-Type": "application/json"}
        )
        try:
            return load_tensors(response.content)
        except Exception as error:  # safetensors raises its own error types
            raise self._malformed(f"not a safetensors file ({_describe(error)})") from None

    def _tensor(
        self, answer: dict[str, Tensor], name: str, shape: tuple[int | None, ...]
    ) -> Tensor:
        """`answer[name]` checked against `shape` (None: any size)."""
        tensor = answer.get(name)
        if tensor is None:
            raise self._malformed(f"no tensor {name!r}")
        if tensor.dim() != len(shape) or any(
            want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True)
        ):
            raise self._malformed(f"{name!r} has shape {list(tensor.shape)}")
        return tensor.float() if tensor.is_floating_point() else tensor

    def _malformed(self, what: str) -> OpdistillError:
        return OpdistillError(f"teacher server at {self.url} sent a malformed answer: {what}")

    def _get_info(self) -> dict[str, Any]:
        response = self._request("GET", "/v1/info")
        try:
            info = response.json()
        except ValueError:
            info = None
        if not isinstance(info, dict) or "vocab_size" not in info:
            raise OpdistillError(
                f"{self.url} does not look like an opdistill teacher server (/v1/info answered "
                f"{_one_line(response.text, 80)!r})"
            )
        return info

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return request_with_retries(
            self.client, self.url, self.timeout, self._rng, method, path, **kwargs
        )


def request_with_retries(
    client: httpx.Client,
    url: str,
    timeout: float,
    rng: random.Random,
    method: str,
    path: str,
    *,
    server: str = "teacher server",
    **kwargs: Any,
) -> httpx.Response:
    """Send one request, retrying connection errors, timeouts and HTTP 429/502/503/504 with
    exponential backoff and jitter until `timeout` seconds have passed; any other refusal is a
    one-line `OpdistillError` with the server's message (`server`: what the messages call it)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        remaining = deadline - time.monotonic()
        retry_after = None
        try:
            response = client.request(
                method, path, timeout=httpx.Timeout(max(remaining, 0.01)), **kwargs
            )
        except httpx.TransportError as error:
            last = _describe(error)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise OpdistillError(f"{server} at {url}: {_describe(error)}") from None
        else:
            if response.status_code == 200:
                return response
            message = _server_message(response)
            if response.status_code not in RETRY_STATUSES:
                raise OpdistillError(
                    f"{server} at {url} refused the request: {message} "
                    f"(HTTP {response.status_code})"
                )
            last = f"HTTP {response.status_code}: {message}"
            retry_after = _retry_after(response)
        delay = min(0.1 * 2**attempt, 5.0) * rng.uniform(0.5, 1.5)
        if retry_after is not None:
            delay = max(delay, retry_after)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OpdistillError(f"{server} at {url} did not answer within {timeout:g} s: {last}")
        time.sleep(min(delay, remaining))
        attempt += 1


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def remote_teacher_for(
    url: str,
    tokenizer: PreTrainedTokenizerBase,
    token_env: str,
    timeout: float,
) -> RemoteTeacher:
    """A `RemoteTeacher` for the student's `tokenizer`, its token read from `$token_env`."""
    return RemoteTeacher(
        url,
        len(tokenizer),
        token=(os.environ.get(token_env) or None) if token_env else None,
        timeout=timeout,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
