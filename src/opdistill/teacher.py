"""Teachers: whatever scores a student's responses token by token.

Every teacher implements `logits(batch) -> Tensor[B, R, V]`, the teacher's logits at the positions
that predict each response token, computed without gradient.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from opdistill.batch import Batch, batch_logits


class Teacher(Protocol):
    """Scores a batch of responses."""

    def logits(self, batch: Batch) -> Tensor: ...


class ModelTeacher:
    """A separate causal LM held in this process, frozen."""

    def __init__(self, model: PreTrainedModel, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size

    @torch.no_grad()  # not inference_mode: the result is saved for the student's backward
    def logits(self, batch: Batch) -> Tensor:
        device = next(self.model.parameters()).device
        return batch_logits(self.model, batch.to(device), self.vocab_size).float()
