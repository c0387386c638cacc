"""The teacher protocol: whatever scores a student's responses token by token.

Every teacher can be asked for three answers, from the richest to the cheapest (a model held in
this process also answers "projected": its hidden states and output projection, from which the
losses form the logits one chunk of positions at a time):

- `logits(batch)`: its logits [B, R, V] at the positions that predict each response token;
- `topk(batch, k, τ)`: the k most probable tokens per position with their log-probabilities
  (normalised over the whole vocabulary) and the log-prob of each response token
  (`TopKLogprobs`; the losses add the tail bucket log(1 − Σ top-k) themselves);
- `token_logprobs(batch, τ)`: the log-prob of each response token only [B, R].

`answers` names the ones a teacher can give; asking for another raises `TeacherCannotAnswer`, and
`check_answers` turns a mismatch with an objective into a one-line error before any compute.
All answers are computed without gradient. Teachers with state that belongs in checkpoints
(a demonstration sampler's RNG, an EMA copy's weights) expose it through `state_dict` /
`load_state_dict` (weights in `networks()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from opdistill.batch import Batch, batch_logits, batch_projected, projectable_head
from opdistill.errors import OpdistillError
from opdistill.losses.logprobs import gather_tokens, log_softmax_at
from opdistill.losses.projected import ProjectedLogits

Answer = Literal["logits", "projected", "topk", "token_logprobs"]
ALL_ANSWERS: frozenset[Answer] = frozenset(("logits", "topk", "token_logprobs"))
_ANSWER_WORDS = {
    "logits": "full logits",
    "projected": "hidden states with the output projection",
    "topk": "top-k log-probs",
    "token_logprobs": "the log-probs of the sampled tokens",
}


class TeacherCannotAnswer(OpdistillError):
    """A teacher was asked for an answer it cannot give (e.g. full logits from a top-k cache)."""


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

    @classmethod
    def tokens(cls, token_logprobs: Tensor) -> TopKLogprobs:
        """An answer with the response tokens' log-probs [B, R] only (k = 0)."""
        rows, width = token_logprobs.shape
        empty = token_logprobs.new_zeros(rows, width, 0)
        return cls(empty.long(), empty.float(), token_logprobs)

    def to(self, device: torch.device | str) -> TopKLogprobs:
        return TopKLogprobs(
            self.indices.to(device), self.logprobs.to(device), self.token_logprobs.to(device)
        )


def topk_from_logits(
    logits: Tensor, response_ids: Tensor, k: int, temperature: float = 1.0
) -> TopKLogprobs:
    """`TopKLogprobs` of full logits [B, R, V] at temperature τ (k is capped at V)."""
    logprobs = log_softmax_at(logits, temperature, torch.float32)
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopKLogprobs(top.indices, top.values, gather_tokens(logprobs, response_ids))


class Teacher(Protocol):
    """Scores a batch of responses; see the module docstring for the answers.

    Implementations subclass this protocol to inherit the defaults: `topk` and `token_logprobs`
    computed from `logits`, no state, no per-step metrics.
    """

    answers: ClassVar[frozenset[Answer]] = ALL_ANSWERS
    # Whether evaluation reports the student's divergence to this teacher (not for a teacher that
    # only knows the dataset's completions, or the student itself reading privileged context).
    reports_distance: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """How errors refer to this teacher."""
        return "the teacher"

    @property
    def context_window(self) -> int | None:
        """The longest prompt + response it can score, when it declares one."""
        return None

    def logits(self, batch: Batch) -> Tensor:
        raise self.cannot("logits")

    def base_logits(self, batch: Batch) -> Tensor:
        """Logits [B, R, V] of the base distribution the student started from, on the student's
        own prompt (the anchor of `self_distill.anchor_weight`); only self-distillation has one."""
        raise OpdistillError(f"{self.name} has no base distribution to anchor to")

    def projected_logits(self, batch: Batch) -> ProjectedLogits:
        """The logits as hidden states [B, R, H] and the output projection, formed per chunk by
        the losses (only teachers whose `answers` include "projected")."""
        raise self.cannot("projected")

    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs:
        return topk_from_logits(self.logits(batch), batch.response_ids, k, temperature)

    def token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        return self.topk(batch, 0, temperature).token_logprobs

    def observe(self, batch: Batch, per_token: Tensor, student_logits: Tensor) -> None:
        """Called with each micro-batch's per-token loss [B, R] and the student's logits after
        this teacher scored it (a multi-teacher splits its statistics by teacher here)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Per-step statistics for the training log (reset when read)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state that belongs in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def networks(self) -> dict[str, torch.nn.Module]:
        """Named networks besides the student (a frozen or EMA copy) whose weights are state."""
        return {}

    def after_optimizer_step(self, student: PreTrainedModel) -> None:
        """Called after every optimizer step (an EMA teacher follows the student here)."""
        return None

    def cannot(self, answer: Answer) -> TeacherCannotAnswer:
        given = [words for answer, words in _ANSWER_WORDS.items() if answer in self.answers]
        gives = " and ".join(given) or "nothing"
        return TeacherCannotAnswer(f"{self.name} answers {gives}, not {_ANSWER_WORDS[answer]}")


def check_answers(teacher: Teacher, answer: Answer | None, needed_by: str) -> None:
    """Stop unless `teacher` can give `answer`; the message names what needs it."""
    if answer is not None and answer not in teacher.answers:
        raise TeacherCannotAnswer(
            f"{needed_by} needs {_ANSWER_WORDS[answer]}, but {teacher.cannot(answer)}"
        )


class ModelTeacher(Teacher):
    """A separate causal LM held in this process, frozen."""

    def __init__(self, model: PreTrainedModel, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size

    @property
    def name(self) -> str:
        return "the in-process teacher model"

    @property
    def answers(self) -> frozenset[Answer]:  # type: ignore[override]
        if projectable_head(self.model) is None:
            return ALL_ANSWERS
        return ALL_ANSWERS | {"projected"}

    @torch.no_grad()
    def projected_logits(self, batch: Batch) -> ProjectedLogits:
        device = next(self.model.parameters()).device
        return batch_projected(self.model, self.model, batch.to(device), self.vocab_size)

    @torch.no_grad()  # not inference_mode: the result is saved for the student's backward
    def logits(self, batch: Batch) -> Tensor:
        device = next(self.model.parameters()).device
        return batch_logits(self.model, batch.to(device), self.vocab_size).float()
