"""Teachers: whatever scores a student's responses token by token.

Every teacher implements `logits(batch) -> Tensor[B, R, V]`, the teacher's logits at the positions
that predict each response token, computed without gradient. Teachers that can also give a sparse
answer implement `topk(batch, k, temperature) -> TopKLogprobs`: the k most probable tokens per
position with their log-probabilities (normalised over the whole vocabulary), and the log-prob of
each response token; the losses add the tail bucket log(1 − Σ top-k) themselves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, batch_logits, chat_prompt, left_pad, sequence_logits
from opdistill.context import ContextSource
from opdistill.lora import adapters_disabled
from opdistill.tasks.base import Example


@dataclass
class TopKLogprobs:
    """A teacher's sparse answer for a batch of responses.

    indices: [B, R, k] token ids, most probable first.
    logprobs: [B, R, k] float32 log-probabilities of those tokens under softmax(logits / τ) over
        the whole vocabulary (so Σ exp < 1 unless k covers the support).
    token_logprobs: [B, R] float32 log-probability of each response token under the same
        distribution (the sampled-token objectives need only this).
    """

    indices: Tensor
    logprobs: Tensor
    token_logprobs: Tensor

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @classmethod
    def uniform(cls, rows: int, width: int, k: int, vocab_size: int) -> TopKLogprobs:
        """A [rows, width] answer of the uniform distribution: finite filler for padding positions,
        which a sparse teacher overwrites where it has real answers."""
        fill = -math.log(vocab_size)
        return cls(
            torch.arange(k).expand(rows, width, k).clone(),
            torch.full((rows, width, k), fill, dtype=torch.float32),
            torch.full((rows, width), fill, dtype=torch.float32),
        )

    def to(self, device: torch.device | str) -> TopKLogprobs:
        return TopKLogprobs(
            self.indices.to(device), self.logprobs.to(device), self.token_logprobs.to(device)
        )


def topk_from_logits(
    logits: Tensor, response_ids: Tensor, k: int, temperature: float = 1.0
) -> TopKLogprobs:
    """`TopKLogprobs` of full logits [B, R, V] at temperature τ (k is capped at V)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    ids = response_ids.clamp(0, logprobs.shape[-1] - 1).unsqueeze(-1)
    return TopKLogprobs(top.indices, top.values, logprobs.gather(-1, ids)[..., 0])


class Teacher(Protocol):
    """Scores a batch of responses: full logits, or (`SparseTeacher`) the top-k log-probs."""

    def logits(self, batch: Batch) -> Tensor: ...


class SparseTeacher(Teacher, Protocol):
    """A teacher that can answer with its top-k log-probs (served, cached, or any model)."""

    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs: ...


class ModelTeacher:
    """A separate causal LM held in this process, frozen."""

    def __init__(self, model: PreTrainedModel, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size

    @torch.no_grad()  # not inference_mode: the result is saved for the student's backward
    def logits(self, batch: Batch) -> Tensor:
        device = next(self.model.parameters()).device
        return batch_logits(self.model, batch.to(device), self.vocab_size).float()

    @torch.no_grad()
    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs:
        return topk_from_logits(self.logits(batch), batch.response_ids, k, temperature)


class PrivilegedContextTeacher:
    """The student's own network reading privileged context (on-policy self-distillation).

    The teacher's prompt is `template.format(prompt=x, context=c)` with `c` from `source`
    (the plain prompt when there is no context for an example); it scores the same response
    tokens as the student. `model` is a frozen copy of the initial student, an EMA copy (see
    `ema_update`) or the live student itself; it is evaluated without gradient, in eval mode.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        source: ContextSource,
        template: str,
        base_weights: bool = False,
    ):
        self.model = model
        self.base_weights = base_weights  # a LoRA student scoring with its adapters disabled
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.source = source
        self.template = template
        self.rows = 0
        self.rows_with_context = 0

    def prompt_ids(self, examples: Sequence[Example]) -> list[list[int]]:
        """Chat-formatted teacher prompts, with the context where there is one."""
        contexts = self.source.contexts(examples)
        self.rows += len(examples)
        self.rows_with_context += sum(c is not None for c in contexts)
        return [
            chat_prompt(
                self.tokenizer,
                e.prompt if c is None else self.template.format(prompt=e.prompt, context=c),
            )
            for e, c in zip(examples, contexts, strict=True)
        ]

    @torch.no_grad()
    def logits(self, batch: Batch) -> Tensor:
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = left_pad(
            self.prompt_ids(batch.examples), self.tokenizer.pad_token_id
        )
        was_training = self.model.training
        self.model.eval()  # the live student is in train mode during the step
        try:
            with adapters_disabled(self.model) if self.base_weights else nullcontext():
                logits = sequence_logits(
                    self.model,
                    prompt_ids.to(device),
                    prompt_mask.to(device),
                    batch.response_ids.to(device),
                    batch.response_mask.to(device),
                    self.vocab_size,
                )
        finally:
            self.model.train(was_training)
        return logits.float()

    def context_fraction(self, reset: bool = True) -> float:
        """Share of scored rows that had context since the last reset."""
        fraction = self.rows_with_context / max(1, self.rows)
        if reset:
            self.rows = self.rows_with_context = 0
        return fraction


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A gradient-free copy of `model` in eval mode (the frozen or EMA teacher's weights)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(target: PreTrainedModel, source: PreTrainedModel, decay: float) -> None:
    """target ← decay·target + (1 − decay)·source, parameter by parameter."""
    for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
        mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - decay)
