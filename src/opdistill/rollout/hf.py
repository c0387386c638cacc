"""Rollouts through transformers `generate`, MiniLLM's teacher-mixed sampling, and sampling from
a LoRA student's base model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opdistill.batch import Batch
from opdistill.losses.logprobs import gather_tokens, log_softmax_at
from opdistill.rollout.base import (
    PromptCache,
    RolloutBackend,
    all_finished,
    finish_batch,
    pure_generation_config,
    sampling_generation_config,
    synced_generation,
)
from opdistill.tasks.base import Example


class SampledTokenLogprobs(LogitsProcessor):
    """The last logits processor of a pure sampling `generate`: it applies the temperature (the
    config then samples at 1) and keeps log softmax(scores / τ) of the step in flight only,
    gathering the sampled token's log-prob at the next step, so no [B, V] score per step is
    kept (`output_scores` keeps all of them: [B, R, V] in all)."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.tokens: list[Tensor] = []
        self._pending: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self._pending is not None:  # the previous step's token is the last input id
            self.tokens.append(gather_tokens(self._pending, input_ids[:, -1]))
        self._pending = log_softmax_at(scores, 1.0, torch.float32)
        return scores

    def finish(self, sequences: Tensor) -> Tensor:
        """The log-probs [B, steps] of the generated tokens (`sequences` ends with them)."""
        if self._pending is not None:
            self.tokens.append(gather_tokens(self._pending, sequences[:, -1]))
            self._pending = None
        if not self.tokens:
            return torch.zeros(sequences.shape[0], 0, device=sequences.device)
        return torch.stack(self.tokens, dim=1)


class HFGenerateRollout:
    """Sampling with transformers `generate` (KV cache, stop at EOS, left-padded prompts).

    Pure ancestral sampling at `temperature` (`sampling_generation_config`: none of the model's
    own `generation_config` settings, such as a hub model's repetition penalty or min-p, apply),
    so the samples are the student's and the recorded sampler log-probs are those of the
    distribution the tokens were drawn from.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        record_logprobs: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.record_logprobs = record_logprobs  # the sampled tokens' log-probs, step by step
        self.prompts = PromptCache(tokenizer)

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
        # Columns of the logits past the tokenizer (padded embeddings) are never sampled.
        padded = range(len(tokenizer), self.model.get_output_embeddings().weight.shape[0])
        # Recording, the recorder applies the temperature as the last processor (greedy: none).
        recorder = SampledTokenLogprobs(1.0 if greedy else temperature)
        config = sampling_generation_config(
            max_new_tokens,
            1.0 if self.record_logprobs else temperature,
            greedy,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=padded,
        )
        with pure_generation_config(self.model, config):
            sequences = self.model.generate(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder] if self.record_logprobs else []),
                use_cache=True,
                synced_gpus=synced_generation(),
            )
        self.model.train(was_training)
        response_ids = sequences[:, prompt_ids.shape[1] :]
        if self.record_logprobs:
            token_logprobs = recorder.finish(sequences)
        else:
            token_logprobs = torch.zeros(response_ids.shape)
        batch = finish_batch(
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
        self.prompts = PromptCache(tokenizer)

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
                step_logits.append(out.logits[:, -1, :vocab])
            log_q, log_p = (log_softmax_at(x, temperature, torch.float32) for x in step_logits)
            log_mix = (
                log_q if self.teacher_mix == 0 else torch.logaddexp(log_a + log_p, log_b + log_q)
            )
            if greedy:
                chosen = log_mix.argmax(dim=-1)
            else:
                chosen = torch.multinomial(log_mix.exp(), 1).squeeze(-1)
            chosen = chosen.masked_fill(finished, tokenizer.pad_token_id)
            tokens.append(chosen)
            logprobs.append(gather_tokens(log_mix, chosen))
            finished |= chosen == tokenizer.eos_token_id
            if all_finished(finished, synced):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            inputs = {"input_ids": chosen.unsqueeze(-1), "position_ids": positions[:, -1:] + 1}
            positions = inputs["position_ids"]
        self.student.train(was_training)
        return finish_batch(
            prompt_ids,
            prompt_mask,
            torch.stack(tokens, dim=1).cpu(),
            torch.stack(logprobs, dim=1).cpu(),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            examples,
        )


class BaseModelRollout:
    """Samples from a LoRA student's base model (adapters disabled)."""

    def __init__(self, rollout: RolloutBackend, model: PeftModel):
        self.rollout = rollout
        self.model = model

    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
    ) -> Batch:
        with self.model.disable_adapter():
            return self.rollout.generate(examples, max_new_tokens, temperature, greedy)
