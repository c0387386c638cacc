"""A teacher served by vLLM's OpenAI-compatible server, scored through `prompt_logprobs`.

`model.teacher: vllm+http://HOST:PORT` (or `vllm+https://`). Each batch's rows (prompt followed
by response, as token ids) go to `/v1/completions` with `max_tokens: 1` and `prompt_logprobs: k`;
per prompt position vLLM answers the top-k log-probs and the actual token's log-prob, which give
the `topk` answer (the token divergences add the tail bucket log(1 − Σ top-k)) and the
`token_logprobs` answer (sampled_token, vOPD's teacher term). Full logits are not available from
vLLM, so objectives needing them stop with the protocol's one-line error.

vLLM's prompt log-probs are those of the raw logits (temperature 1): another `loss.temperature`
is refused. At construction the served model's tokenizer is checked against the student's
(`/tokenize` of a probe made of the student's vocabulary, `/detokenize` of its last id). Rows are
batched into requests of at most `max_batch_tokens` tokens; requests retry transient failures
until `timeout` seconds have passed (`teachers.http.request_with_retries`). The server must be
started with `--max-logprobs` ≥ `loss.teacher_top_k`.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from opdistill.batch import Batch
from opdistill.errors import OpdistillError
from opdistill.teachers.base import Answer, Teacher, TopKLogprobs
from opdistill.teachers.http import _one_line, httpx, request_with_retries

PROBE_TOKENS = 64  # vocabulary entries in the tokenizer probe


def server_address(spec: str) -> str:
    """`vllm+http://HOST:PORT[/]` → `http://HOST:PORT`."""
    if not spec.lower().startswith(("vllm+http://", "vllm+https://")):
        raise OpdistillError(f"vLLM teacher address {spec!r} must start with vllm+http(s)://")
    return spec.split("+", 1)[1].rstrip("/")


class VLLMServedTeacher(Teacher):
    """Top-k and sampled-token log-probs from a vLLM server (see the module docstring)."""

    answers = frozenset[Answer]({"topk", "token_logprobs"})

    def __init__(
        self,
        spec: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        max_batch_tokens: int = 16384,
        transport: httpx.BaseTransport | None = None,
    ):
        if httpx is None:
            raise OpdistillError(f"the vLLM teacher {spec!r} needs httpx: pip install httpx")
        self.url = server_address(spec)
        self.vocab_size = len(tokenizer)
        self.timeout = timeout
        self.max_batch_tokens = max_batch_tokens
        self._rng = random.Random()  # retry jitter only
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(
            base_url=self.url, headers=headers, transport=transport, timeout=timeout
        )
        try:
            self.model, self._context_window = self._served_model()
            self._check_tokenizer(tokenizer)
        except BaseException:
            self.client.close()
            raise

    @property
    def name(self) -> str:
        return f"the vLLM server at {self.url}"

    @property
    def context_window(self) -> int | None:
        return self._context_window

    def close(self) -> None:
        self.client.close()

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        response = request_with_retries(
            self.client, self.url, self.timeout, self._rng, "POST", path, json=payload
        )
        try:
            return response.json()
        except ValueError:
            raise self._malformed(f"{path} did not answer JSON") from None

    def _served_model(self) -> tuple[str, int | None]:
        response = request_with_retries(
            self.client, self.url, self.timeout, self._rng, "GET", "/v1/models"
        )
        try:
            (model,) = response.json()["data"][:1]
            return str(model["id"]), model.get("max_model_len")
        except (ValueError, KeyError, TypeError):
            raise OpdistillError(
                f"{self.url} does not look like a vLLM server (/v1/models answered "
                f"{_one_line(response.text, 80)!r})"
            ) from None

    def _check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Stop unless the server tokenizes like the student and knows its last token id."""
        step = max(1, self.vocab_size // PROBE_TOKENS)
        ids = list(range(0, self.vocab_size, step))[:PROBE_TOKENS]
        special = set(tokenizer.all_special_ids)
        probe = tokenizer.decode([i for i in ids if i not in special])
        ours = tokenizer(probe, add_special_tokens=False).input_ids
        theirs = self._post(
            "/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False}
        ).get("tokens")
        last = self.vocab_size - 1
        text = self._post("/detokenize", {"model": self.model, "tokens": [last]}).get("prompt")
        if theirs != ours or text != tokenizer.decode([last]):
            raise OpdistillError(
                f"the vLLM server at {self.url} serves {self.model!r} with a different tokenizer "
                f"than the student's ({len(ours)} probe tokens here, "
                f"{len(theirs or [])} there, last id {last} decodes to {text!r}); serve the "
                "teacher with the student's tokenizer (vllm ... --tokenizer DIR)"
            )

    def _malformed(self, what: str) -> OpdistillError:
        return OpdistillError(f"the vLLM server at {self.url} sent a malformed answer: {what}")

    # ------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs:
        if temperature != 1.0:
            raise OpdistillError(
                f"{self.name} gives log-probs at temperature 1 only (vLLM's prompt_logprobs); "
                f"set loss.temperature=1 (got {temperature})"
            )
        k = min(k, self.vocab_size)
        prompt_mask = batch.prompt_mask.bool().cpu()
        lengths = [int(n) for n in batch.response_mask.cpu().sum(dim=1).tolist()]
        rows = [
            (batch.prompt_ids[i].cpu()[prompt_mask[i]].tolist(), batch.response_ids[i, :n].tolist())
            for i, n in enumerate(lengths)
        ]
        result = TopKLogprobs.uniform(len(rows), batch.response_ids.shape[1], k, self.vocab_size)
        for chunk in self._chunks(rows, lengths):
            answer = self._post(
                "/v1/completions",
                {
                    "model": self.model,
                    "prompt": [rows[i][0] + rows[i][1] for i in chunk],
                    "max_tokens": 1,
                    "temperature": 1.0,
                    "prompt_logprobs": k,
                    "logprobs": None,
                },
            )
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise self._malformed(f"{len(choices)} choices for {len(chunk)} prompts")
            for i, choice in zip(chunk, choices, strict=True):
                self._fill(result, i, rows[i], choice.get("prompt_logprobs"), k)
        return result.to(batch.response_ids.device)

    def _fill(
        self, result: TopKLogprobs, row: int, ids: tuple[list[int], list[int]], positions, k: int
    ) -> None:
        prompt, response = ids
        if not isinstance(positions, list) or len(positions) != len(prompt) + len(response):
            raise self._malformed(f"prompt_logprobs of row {row} do not cover its tokens")
        for t, token in enumerate(response):
            entry = positions[len(prompt) + t]
            try:
                scored = {
                    int(tid): (float(v["logprob"]), int(v["rank"])) for tid, v in entry.items()
                }
                result.token_logprobs[row, t] = scored[token][0]
            except (AttributeError, KeyError, TypeError, ValueError):
                raise self._malformed(f"row {row}, response token {t}: {entry!r:.80}") from None
            if k:
                top = sorted((v for v in scored.items() if v[1][1] <= k), key=lambda v: -v[1][0])
                if len(top) < k:
                    raise self._malformed(f"{len(top)} top log-probs for k={k} (--max-logprobs?)")
                result.indices[row, t] = torch.tensor([tid for tid, _ in top[:k]])
                result.logprobs[row, t] = torch.tensor([lp for _, (lp, _) in top[:k]])

    def _chunks(
        self, rows: list[tuple[list[int], list[int]]], lengths: list[int]
    ) -> list[list[int]]:
        """Rows with a response, grouped into requests of at most `max_batch_tokens` tokens."""
        chunks: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i, (prompt, response) in enumerate(rows):
            if lengths[i] == 0:
                continue
            tokens = len(prompt) + len(response)
            if current and size + tokens > self.max_batch_tokens:
                chunks.append(current)
                current, size = [], 0
            current.append(i)
            size += tokens
        if current:
            chunks.append(current)
        return chunks

    def token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        return self.topk(batch, 0, temperature).token_logprobs
