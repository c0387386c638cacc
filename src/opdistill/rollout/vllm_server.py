"""Student rollouts on a vLLM server started separately (`rollout.backend: vllm` with
`rollout.server: http://HOST:PORT`), through its OpenAI-compatible API.

Sampling: one `/v1/completions` request per row (each its own seed), sent concurrently, with the
prompt as token ids, pure ancestral sampling at the requested temperature (top-k/top-p/min-p
and penalties off, only the tokenizer's ids allowed when the model has padded columns),
`logprobs: 0` and `return_token_ids`. The server must run with
`--logprobs-mode processed_logprobs`, so that the log-prob of each sampled token is
log softmax(z/T)[y], the sampler log-prob of the rollout contract (vLLM's default,
`raw_logprobs`, is that of the raw logits).

Weights, after every optimizer step, through files in a fresh directory inside
`rollout.server_dir` (which the server reads under the same path: the same machine, or a shared
file system), removed by `close()`:
- a LoRA student: the adapter, saved with peft into a fresh directory and loaded with
  `POST /v1/load_lora_adapter` under a fresh name (the server runs with `--enable-lora` and
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); requests name that adapter as their model;
- full weights: saved as safetensors and reloaded in place with
  `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}`, then
  `POST /reset_prefix_cache` (development endpoints: the server runs with
  `VLLM_SERVER_DEV_MODE=1`).
At start the student's weights (a LoRA student: its base weights too, when the development
endpoints are on) are pushed, and a probe checks that the server samples with them: the
log-probs of a few tokens it samples at temperature 0.5 must be the student's.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch
from opdistill.config import RolloutConfig
from opdistill.errors import OpdistillError
from opdistill.models.lora import base_state_dict, is_lora, save_adapter
from opdistill.rollout.base import PromptCache, finish_batch
from opdistill.rollout.vllm import response_tensors
from opdistill.tasks.base import Example
from opdistill.teachers.http import _one_line, httpx, request_with_retries

PROBE_TEMPERATURE = 0.5  # processed and raw log-probs differ at T ≠ 1
PROBE_TOKENS = 4
MAX_CONCURRENT_REQUESTS = 64


class VLLMServerRollout:
    """Samples the student's responses on a vLLM server (see the module docstring)."""

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: RolloutConfig,
        *,
        transport: httpx.BaseTransport | None = None,
    ):
        if httpx is None:
            raise OpdistillError("rollout.server needs httpx: pip install httpx")
        self.url = config.server.rstrip("/")
        self.timeout = config.server_timeout
        self.tokenizer = tokenizer
        self.prompts = PromptCache(tokenizer)
        self.vocab = len(tokenizer)
        self.version = 0  # optimizer steps of the weights on the server
        self.lora = student if is_lora(student) else None
        output_columns = student.get_output_embeddings().weight.shape[0]
        self.allowed = list(range(self.vocab)) if output_columns > self.vocab else None
        self._rng = random.Random()  # retry jitter only
        self._pushes = 0
        self._pushed: Path | None = None  # the adapter in use (full weights are read at once)
        # A fresh directory of our own (inside rollout.server_dir when set: without it the
        # server reads it only when it runs on this machine); only its files are ever deleted.
        parent = None
        if config.server_dir:
            parent = Path(config.server_dir)
            parent.mkdir(parents=True, exist_ok=True)
        self._temporary = tempfile.TemporaryDirectory(prefix="opdistill-vllm-push-", dir=parent)
        self.directory = Path(self._temporary.name)
        self.client = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, "opdistill-vllm-requests")
        try:
            self.base_model = self._served_model()
            self.model = self.base_model  # the name requests use (a LoRA student: its adapter)
            if self.lora is not None and self._has_dev_endpoints():
                self._reload_full(base_state_dict(self.lora))
            self.load_state(student.state_dict())
            self._check_sampler(student)
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return f"the vLLM server at {self.url}"

    def close(self) -> None:
        """Close the connection; the server keeps running."""
        self._pool.shutdown(wait=False)
        self.client.close()
        self._temporary.cleanup()

    # ------------------------------------------------------------------------- requests
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return request_with_retries(
            self.client,
            self.url,
            self.timeout,
            self._rng,
            method,
            path,
            server="rollout.server: the vLLM server",
            **kwargs,
        )

    def _json(self, path: str, payload: dict[str, Any]) -> Any:
        response = self._request("POST", path, json=payload)
        try:
            return response.json()
        except ValueError:
            raise self._malformed(f"{path} did not answer JSON") from None

    def _malformed(self, what: str) -> OpdistillError:
        return OpdistillError(f"{self.name} sent a malformed answer: {what}")

    def _served_model(self) -> str:
        response = self._request("GET", "/v1/models")
        try:
            return str(response.json()["data"][0]["id"])
        except (ValueError, KeyError, TypeError, IndexError):
            raise OpdistillError(
                f"rollout.server={self.url} does not look like a vLLM server (/v1/models "
                f"answered {_one_line(response.text, 80)!r})"
            ) from None

    def _has_dev_endpoints(self) -> bool:
        """Whether the server runs with VLLM_SERVER_DEV_MODE=1 (`/server_info` is one of its
        development endpoints)."""
        try:
            return self.client.get("/server_info").status_code == 200
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------------- weights
    def load_weights(self, student: PreTrainedModel) -> None:
        """Push the student's weights (a LoRA student: its adapter) after an optimizer step."""
        self.load_state(student.state_dict())
        self.version += 1

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Push a snapshot of the student's `state_dict()` to the server."""
        if self.lora is None:
            self._reload_full(state)
        else:
            self._load_adapter(state)

    def _reload_full(self, state: dict[str, torch.Tensor]) -> None:
        self._pushes += 1
        directory = self.directory / f"weights-{self._pushes}"
        directory.mkdir(parents=True, exist_ok=True)
        weights = {name: t.detach().cpu().contiguous() for name, t in state.items()}
        save_file(_untied(weights), directory / "model.safetensors")
        try:
            response = self.client.post(
                "/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(directory)}},
                timeout=self.timeout,
            )
            if response.status_code == 404:
                raise OpdistillError(
                    f"{self.name} has no /collective_rpc: full-weight updates need the server "
                    "started with VLLM_SERVER_DEV_MODE=1 (or train LoRA adapters: model.lora.r > 0)"
                )
            if response.status_code != 200:
                raise OpdistillError(
                    f"{self.name} could not reload the weights from {directory}: "
                    f"{_one_line(response.text, 200)} (HTTP {response.status_code}); the server "
                    "must read rollout.server_dir under the same path"
                )
            self._request("POST", "/reset_prefix_cache")
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # read in full by reload_weights

    def _load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        assert self.lora is not None
        self._pushes += 1
        adapter = save_adapter(self.lora, self.directory / f"adapter-{self._pushes}", state)
        name = f"opdistill-student-{self._pushes}"
        response = self.client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(adapter)},
            timeout=self.timeout,
        )
        if response.status_code == 404:
            shutil.rmtree(adapter, ignore_errors=True)
            raise OpdistillError(
                f"{self.name} has no /v1/load_lora_adapter: start it with --enable-lora "
                f"--max-lora-rank R and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            )
        if response.status_code != 200:
            shutil.rmtree(adapter, ignore_errors=True)
            raise OpdistillError(
                f"{self.name} could not load the adapter {adapter}: "
                f"{_one_line(response.text, 200)} (HTTP {response.status_code}); the server "
                "must run with --enable-lora and read rollout.server_dir under the same path"
            )
        previous, self.model = self.model, name
        if previous != self.base_model:
            self.client.post("/v1/unload_lora_adapter", json={"lora_name": previous})
        if self._pushed is not None:
            shutil.rmtree(self._pushed, ignore_errors=True)
        self._pushed = adapter

    def _check_sampler(self, student: PreTrainedModel) -> None:
        """Stop unless the server samples with the student's weights and reports processed
        log-probs (those of z/T), checked on a few tokens sampled at T = 0.5."""
        prompt = [i % self.vocab for i in range(1, 9)]
        tokens, served = self._sample(prompt, PROBE_TOKENS, PROBE_TEMPERATURE, seed=0)
        if not tokens:
            return
        device = next(student.parameters()).device
        training = student.training
        with torch.no_grad():
            logits = student.eval()(torch.tensor([prompt + tokens], device=device)).logits[0]
        student.train(training)
        logits = logits[len(prompt) - 1 : -1, : self.vocab].float().cpu()
        ids = torch.tensor(tokens).unsqueeze(-1)
        processed = torch.log_softmax(logits / PROBE_TEMPERATURE, -1).gather(-1, ids)[:, 0]
        raw = torch.log_softmax(logits, -1).gather(-1, ids)[:, 0]
        got = torch.tensor(served)
        tolerance = 1e-3 if next(student.parameters()).dtype == torch.float32 else 5e-2
        difference = float((got - processed).abs().max())
        if difference <= tolerance:
            return
        if float((got - raw).abs().max()) <= tolerance:
            raise OpdistillError(
                f"{self.name} reports raw log-probs: start it with "
                "--logprobs-mode processed_logprobs (the sampler log-probs are those of z/T)"
            )
        raise OpdistillError(
            f"{self.name} does not sample with the student's weights (max |Δ log p| = "
            f"{difference:.3g} on a probe): serve the student's model (a LoRA student: its base "
            "model) with the student's dtype"
        )

    # ------------------------------------------------------------------------- sampling
    def _sample(
        self, prompt: list[int], max_new_tokens: int, temperature: float, seed: int
    ) -> tuple[list[int], list[float]]:
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": seed,
            "stop_token_ids": self._stop(),
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if self.allowed is not None:
            payload["allowed_token_ids"] = self.allowed
        answer = self._json("/v1/completions", payload)
        try:
            (choice,) = answer["choices"]
            tokens = [int(t) for t in choice["token_ids"]]
            logprobs = [float(v) for v in choice["logprobs"]["token_logprobs"]]
        except (KeyError, TypeError, ValueError):
            raise self._malformed(f"{_one_line(str(answer), 120)!r}") from None
        return tokens, logprobs

    def _stop(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None and 0 <= eos < self.vocab else []

    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Sample responses; each row's seed is drawn from `generator` (default: torch's global
        generator)."""
        tokenizer = self.tokenizer
        prompt_ids, prompt_mask = self.prompts.batch(examples)
        seeds = torch.randint(0, 2**31 - 1, (len(examples),), generator=generator).tolist()
        rows = [
            ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        temperature = 0.0 if greedy else temperature
        sampled = list(
            self._pool.map(
                lambda job: self._sample(job[0], max_new_tokens, temperature, job[1]),
                zip(rows, seeds, strict=True),
            )
        )
        response_ids, logprobs = response_tensors(sampled, max_new_tokens, tokenizer.pad_token_id)
        return finish_batch(
            prompt_ids,
            prompt_mask,
            response_ids,
            logprobs,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            examples,
        )

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        """The server's log-probs log softmax(z)[y_t] (temperature 1) of a fixed response after
        a prompt (`prompt_logprobs`): the weight-sync check."""
        answer = self._json(
            "/v1/completions",
            {
                "model": self.model,
                "prompt": prompt_ids + response_ids,
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": 0,
            },
        )
        try:
            entries = answer["choices"][0]["prompt_logprobs"][len(prompt_ids) :]
            values = [
                entry[str(t)]["logprob"] for entry, t in zip(entries, response_ids, strict=True)
            ]
        except (KeyError, TypeError, IndexError, ValueError):
            raise self._malformed(f"{_one_line(str(answer), 120)!r}") from None
        return torch.tensor(values)


def _untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out
