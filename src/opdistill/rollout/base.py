"""The rollout protocol and what every backend shares: prompt batching, EOS masking, decoding,
and the generation settings of pure ancestral sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DistributedType
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, chat_prompt, left_pad, response_mask_after_eos
from opdistill.losses.projected import ProjectedLogits
from opdistill.tasks.base import Example


class RolloutBackend(Protocol):
    """Anything that samples responses for a list of prompts."""

    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
    ) -> Batch: ...


def sampling_generation_config(
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    suppress_tokens: Sequence[int] = (),
) -> GenerationConfig:
    """A fresh `GenerationConfig` for pure ancestral sampling at `temperature` (or greedy).

    Nothing of a model's own `generation_config` applies: no top-k / top-p / min-p / typical-p /
    ε- or η-cutoff truncation, no repetition penalties, n-gram bans, bad-word lists, minimum
    lengths or forced tokens. Every such field is set to its neutral value here; those whose
    neutral value is None are only kept neutral when `model.generation_config` is this config
    too, which `pure_generation_config` arranges. `suppress_tokens` are logit columns that are
    never sampled (embedding rows past the tokenizer).
    """
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature}
    return GenerationConfig(
        **sampling,
        max_new_tokens=max_new_tokens,
        min_length=0,
        num_beams=1,
        num_return_sequences=1,
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        renormalize_logits=False,
        remove_invalid_values=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        suppress_tokens=list(suppress_tokens) or None,
    )


@contextmanager
def pure_generation_config(model: PreTrainedModel, config: GenerationConfig) -> Iterator[None]:
    """Within the block, `config` is the model's own `generation_config`.

    `generate` fills every unset (None) field of the config it is given from the model's
    `generation_config` (`min_p`, `bad_words_ids`, `min_new_tokens`, `sequence_bias`, forced
    tokens, ...), so passing a fresh config is not enough to keep a hub model's settings out.
    A PEFT wrapper's base model is the one whose config `generate` reads.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


def synced_generation() -> bool:
    """Whether every process must run the same number of decoding steps.

    Under DeepSpeed ZeRO-3 and FSDP each forward pass gathers parameter shards from all
    processes, so a process whose responses all ended early has to keep stepping until the
    others are done, or the collectives deadlock.
    """
    if not is_initialized():
        return False
    state = AcceleratorState()
    if state.num_processes <= 1:
        return False
    if state.distributed_type == DistributedType.FSDP:
        return True
    return (
        state.distributed_type == DistributedType.DEEPSPEED
        and state.deepspeed_plugin.zero_stage == 3
    )


def all_finished(finished: Tensor, synced: bool) -> bool:
    """Every row ended; with `synced`, on every process."""
    done = bool(finished.all())
    if not synced:
        return done
    unfinished = torch.tensor(0.0 if done else 1.0, device=finished.device)
    torch.distributed.all_reduce(unfinished)
    return float(unfinished) == 0.0


class PromptCache:
    """Chat-formatted prompt ids, computed once per prompt text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def batch(self, examples: Sequence[Example]) -> tuple[Tensor, Tensor]:
        for e in examples:
            if e.prompt not in self._ids:
                self._ids[e.prompt] = chat_prompt(self.tokenizer, e.prompt)
        return left_pad([self._ids[e.prompt] for e in examples], self.tokenizer.pad_token_id)


def finish_batch(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    token_logprobs: Tensor,
    eos_id: int,
    pad_id: int,
    examples: Sequence[Example],
) -> Batch:
    """Mask everything after the first EOS, trim to the longest response, build the batch."""
    response_mask = response_mask_after_eos(response_ids, eos_id)
    response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
    token_logprobs = token_logprobs.masked_fill(response_mask == 0, 0.0)
    longest = max(1, int(response_mask.sum(dim=1).max()))
    return Batch(
        prompt_ids,
        prompt_mask,
        response_ids[:, :longest].contiguous(),
        response_mask[:, :longest].contiguous(),
        list(examples),
        token_logprobs[:, :longest].contiguous(),
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, batch: Batch) -> list[str]:
    """Response texts without padding and EOS."""
    texts = []
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        kept = [int(i) for i, m in zip(ids, mask, strict=True) if m]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


def push_weights(sampler: RolloutBackend, student: torch.nn.Module) -> None:
    """After an optimizer step: hand the student's weights to a sampler holding its own copy
    (`load_weights`, e.g. a vLLM engine); samplers that run the student itself need nothing."""
    load_weights = getattr(sampler, "load_weights", None)
    if load_weights is not None:
        load_weights(student)


class SamplerMismatch:
    """Mean |log π_learner(y_t) − log π_sampler(y_t)| over the response tokens of a step.

    The learner's log-probs are those of the training forward at the sampling temperature; with
    no staleness the two agree within float tolerance, whatever engine sampled (a larger value
    is a sampler bug or stale weights).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.total = 0.0
        self.tokens = 0

    @torch.no_grad()
    def add(self, student_logits: Tensor | ProjectedLogits, batch: Batch) -> None:
        if batch.sampler_logprobs is None:
            return
        if isinstance(student_logits, ProjectedLogits):  # formed per chunk, never whole
            learner = student_logits.token_logprobs(batch.response_ids, self.temperature)
        else:
            scaled = student_logits.detach().float() / self.temperature
            ids = batch.response_ids.unsqueeze(-1)
            learner = scaled.gather(-1, ids).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
        mask = batch.response_mask.bool()
        self.total += float((learner - batch.sampler_logprobs.float())[mask].abs().sum())
        self.tokens += int(mask.sum())

    def mean(self) -> float | None:
        return self.total / self.tokens if self.tokens else None
