"""Rollout backends: turn prompts into sampled responses (and the sampler's log-probs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DistributedType
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, chat_prompt, left_pad, response_mask_after_eos
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


def _all_finished(finished: Tensor, synced: bool) -> bool:
    """Every row ended; with `synced`, on every process."""
    done = bool(finished.all())
    if not synced:
        return done
    unfinished = torch.tensor(0.0 if done else 1.0, device=finished.device)
    torch.distributed.all_reduce(unfinished)
    return float(unfinished) == 0.0


class _PromptCache:
    """Chat-formatted prompt ids, computed once per prompt text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def batch(self, examples: Sequence[Example]) -> tuple[Tensor, Tensor]:
        for e in examples:
            if e.prompt not in self._ids:
                self._ids[e.prompt] = chat_prompt(self.tokenizer, e.prompt)
        return left_pad([self._ids[e.prompt] for e in examples], self.tokenizer.pad_token_id)


def _finish(
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


class HFGenerateRollout:
    """Sampling with transformers `generate` (KV cache, stop at EOS, left-padded prompts).

    Pure ancestral sampling at `temperature` (no top-k/top-p), so the recorded sampler log-probs
    are those of the distribution the tokens were drawn from.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        record_logprobs: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.record_logprobs = record_logprobs  # keeps one [B, V] score per step while sampling
        self.prompts = _PromptCache(tokenizer)

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
    ) -> Batch:
        tokenizer = self.tokenizer
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = self.prompts.batch(examples)
        was_training = self.model.training
        self.model.eval()
        sampling = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        )
        # Columns of the logits past the tokenizer (padded embeddings) are never sampled.
        padded = range(len(tokenizer), self.model.get_output_embeddings().weight.shape[0])
        if len(padded):
            sampling["suppress_tokens"] = list(padded)
        if synced_generation():
            sampling["synced_gpus"] = True
        output = self.model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            output_scores=self.record_logprobs,
            return_dict_in_generate=True,
            **sampling,
        )
        self.model.train(was_training)
        response_ids = output.sequences[:, prompt_ids.shape[1] :]
        if self.record_logprobs:  # scores are the sampler's logits after temperature, per step
            token_logprobs = torch.stack(
                [
                    torch.log_softmax(score.float(), dim=-1).gather(-1, ids.unsqueeze(-1))[:, 0]
                    for score, ids in zip(output.scores, response_ids.unbind(1), strict=True)
                ],
                dim=1,
            )
        else:
            token_logprobs = torch.zeros(response_ids.shape)
        batch = _finish(
            prompt_ids,
            prompt_mask,
            response_ids.cpu(),
            token_logprobs.cpu(),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            examples,
        )
        if not self.record_logprobs:
            batch.sampler_logprobs = None
        return batch


class TeacherMixedRollout:
    """Samples each token from the mixture α·P + (1−α)·Q of teacher and student (MiniLLM).

    Both models decode in lockstep with their own KV caches; the recorded sampler log-probs are
    log(α·P(y_t) + (1−α)·Q(y_t)), from which the loss forms the weights Q(y_t)/p̃(y_t).
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        teacher_mix: float,
    ):
        if not 0.0 <= teacher_mix < 1.0:
            raise ValueError(f"teacher_mix must be in [0, 1), got {teacher_mix}")
        self.student, self.teacher = student, teacher
        self.tokenizer = tokenizer
        self.teacher_mix = teacher_mix
        self.prompts = _PromptCache(tokenizer)

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
    ) -> Batch:
        tokenizer, vocab = self.tokenizer, len(self.tokenizer)
        device = next(self.student.parameters()).device
        prompt_ids, prompt_mask = self.prompts.batch(examples)
        was_training = self.student.training
        self.student.eval()
        mask = prompt_mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        inputs = {"input_ids": prompt_ids.to(device), "position_ids": positions}
        caches: list = [None, None]
        finished = torch.zeros(len(examples), dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        log_a, log_b = math.log(max(self.teacher_mix, 1e-30)), math.log1p(-self.teacher_mix)
        synced = synced_generation()
        for _ in range(max_new_tokens):
            step_logits = []
            for index, model in enumerate((self.student, self.teacher)):
                out = model(
                    **inputs, attention_mask=mask, past_key_values=caches[index], use_cache=True
                )
                caches[index] = out.past_key_values
                step_logits.append(out.logits[:, -1, :vocab].float() / temperature)
            log_q, log_p = (torch.log_softmax(x, dim=-1) for x in step_logits)
            log_mix = (
                log_q if self.teacher_mix == 0 else torch.logaddexp(log_a + log_p, log_b + log_q)
            )
            if greedy:
                chosen = log_mix.argmax(dim=-1)
            else:
                chosen = torch.multinomial(log_mix.exp(), 1).squeeze(-1)
            chosen = chosen.masked_fill(finished, tokenizer.pad_token_id)
            tokens.append(chosen)
            logprobs.append(log_mix.gather(-1, chosen.unsqueeze(-1)).squeeze(-1))
            finished |= chosen == tokenizer.eos_token_id
            if _all_finished(finished, synced):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            inputs = {"input_ids": chosen.unsqueeze(-1), "position_ids": positions[:, -1:] + 1}
            positions = inputs["position_ids"]
        self.student.train(was_training)
        return _finish(
            prompt_ids,
            prompt_mask,
            torch.stack(tokens, dim=1).cpu(),
            torch.stack(logprobs, dim=1).cpu(),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            examples,
        )


def decode_responses(tokenizer: PreTrainedTokenizerBase, batch: Batch) -> list[str]:
    """Response texts without padding and EOS."""
    texts = []
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        kept = [int(i) for i, m in zip(ids, mask, strict=True) if m]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts
