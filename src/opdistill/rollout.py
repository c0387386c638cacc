"""Rollout backends: turn prompts into sampled responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, chat_prompt, left_pad, response_mask_after_eos
from opdistill.tasks.base import Example


class RolloutBackend(Protocol):
    """Anything that samples responses for a list of prompts."""

    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float,
        greedy: bool = False,
    ) -> Batch: ...


class HFGenerateRollout:
    """Sampling with transformers `generate` (KV cache, stop at EOS, left-padded prompts)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer
        self._prompt_cache: dict[str, list[int]] = {}

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = chat_prompt(self.tokenizer, prompt)
        return self._prompt_cache[prompt]

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
        prompt_ids, prompt_mask = left_pad(
            [self._prompt_ids(e.prompt) for e in examples], tokenizer.pad_token_id
        )
        was_training = self.model.training
        self.model.eval()
        sampling = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": temperature,
                "top_k": 0,
                "top_p": 1.0,
            }
        )
        output = self.model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        ).cpu()
        self.model.train(was_training)
        response_ids = output[:, prompt_ids.shape[1] :]
        response_mask = response_mask_after_eos(response_ids, tokenizer.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
        longest = max(1, int(response_mask.sum(dim=1).max()))
        return Batch(
            prompt_ids,
            prompt_mask,
            response_ids[:, :longest].contiguous(),
            response_mask[:, :longest].contiguous(),
            list(examples),
        )


def decode_responses(tokenizer: PreTrainedTokenizerBase, batch: Batch) -> list[str]:
    """Response texts without padding and EOS."""
    texts = []
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        kept = [int(i) for i, m in zip(ids, mask, strict=True) if m]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts
