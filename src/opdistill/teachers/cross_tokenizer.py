"""A teacher with another tokenizer than the student's, on the student's own samples.

Each student response is decoded to text and retokenised for the teacher, with the character
span of every token on both sides (the student's by incremental decoding, the teacher's from
its offset mapping); the teacher scores its own tokens of that text after its own chat-formatted
prompt. Two ways then bring its scores back to the student's tokens:

- `span` (answers token log-probs): both token sequences are cut into blocks at the character
  positions where a student token and a teacher token end together. A block holding one student
  token gets the teacher's merged log-probability of its text, Σ log p_T over the teacher tokens
  of the block (exact: the chain rule over the teacher's tokens). Where spans do not match (a
  teacher token crosses a student boundary) the block's merged log-prob is the fallback, split
  evenly over its student tokens, so each block's summed reward log p_T − log q_S stays exact.
  The student's EOS is scored with the teacher's EOS.
- `uld` (answers teacher-vocabulary logits): each student position gets the teacher's
  distribution at the teacher token holding the first non-space character of the student token
  (the teacher's EOS for the student's EOS), for the ULD loss (`opdistill.losses.uld`).

With identical tokenizers and canonically tokenised responses both reduce to the plain teacher.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, chat_prompt, left_pad, right_pad, sequence_logits
from opdistill.losses.logprobs import log_softmax_at
from opdistill.teachers.base import Answer, Teacher

Method = Literal["span", "uld"]


def token_ends(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The decoded text of `ids` and the character offset where each token's text ends
    (incremental decoding: what the student's tokens spell, whatever their segmentation)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ends, last = [], 0
    for i in range(len(ids)):
        last = min(
            len(text), max(last, len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)))
        )
        ends.append(last)
    return text, ends


def span_blocks(
    student_ends: Sequence[int], teacher_ends: Sequence[int], length: int
) -> tuple[list[int], list[int]]:
    """The block of every student and every teacher token: blocks end at the character
    positions where both a student and a teacher token end (and at `length`)."""
    common = sorted((set(student_ends) & set(teacher_ends)) | {length})
    return (
        [bisect.bisect_left(common, end) for end in student_ends],
        [bisect.bisect_left(common, end) for end in teacher_ends],
    )


def merged_token_logprobs(
    student_blocks: Sequence[int], teacher_blocks: Sequence[int], teacher_logprobs: Sequence[float]
) -> tuple[list[float], list[bool]]:
    """Each student token's teacher log-prob: its block's Σ log p_T split evenly over the block's
    student tokens; and whether the token is a block on its own (an exact span match)."""
    block_logprob: dict[int, float] = {}
    for block, logprob in zip(teacher_blocks, teacher_logprobs, strict=True):
        block_logprob[block] = block_logprob.get(block, 0.0) + float(logprob)
    size: dict[int, int] = {}
    for block in student_blocks:
        size[block] = size.get(block, 0) + 1
    merged = [block_logprob.get(b, 0.0) / size[b] for b in student_blocks]
    return merged, [size[b] == 1 and b in block_logprob for b in student_blocks]


def aligned_positions(
    text: str, student_ends: Sequence[int], teacher_ends: Sequence[int]
) -> list[int]:
    """For each student token, the teacher token holding its first non-space character (the
    last teacher token for a token without one)."""
    out, start = [], 0
    for end in student_ends:
        first = start
        while first < end and text[first].isspace():
            first += 1
        first = min(first, end - 1) if end > start else start
        j = bisect.bisect_right(teacher_ends, first)
        out.append(min(j, max(0, len(teacher_ends) - 1)))
        start = end
    return out


@dataclass
class _Row:
    """One response seen from both sides."""

    student_length: int  # response tokens (EOS included) under the mask
    has_eos: bool
    text: str
    student_ends: list[int]
    teacher_ids: list[int]  # response tokens of the teacher (its EOS appended when the student's)
    teacher_ends: list[int]


class CrossTokenizerTeacher(Teacher):
    """A causal LM whose tokenizer differs from the student's; see the module docstring."""

    reports_distance: ClassVar[bool] = False  # no token-level KL across vocabularies

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_tokenizer: PreTrainedTokenizerBase,
        student_tokenizer: PreTrainedTokenizerBase,
        method: Method,
    ):
        if not teacher_tokenizer.is_fast:
            from opdistill.errors import OpdistillError

            raise OpdistillError(
                "loss.cross_tokenizer needs the teacher's fast tokenizer (character offsets); "
                f"{type(teacher_tokenizer).__name__} has none"
            )
        self.model = model.eval().requires_grad_(False)
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.method = method
        self._matched = [0, 0]  # student tokens scored by an exact span match, all scored

    @property
    def answers(self) -> frozenset[Answer]:  # type: ignore[override]
        return frozenset({"token_logprobs"} if self.method == "span" else {"logits"})

    @property
    def name(self) -> str:
        return f"the teacher with its own tokenizer ({self.method} alignment)"

    def _rows(self, batch: Batch) -> list[_Row]:
        rows = []
        eos = self.student_tokenizer.eos_token_id
        for ids, mask in zip(
            batch.response_ids.tolist(), batch.response_mask.tolist(), strict=True
        ):
            ids = [i for i, m in zip(ids, mask, strict=True) if m]
            has_eos = bool(ids) and ids[-1] == eos
            body = ids[:-1] if has_eos else ids
            text, ends = token_ends(self.student_tokenizer, body)
            encoded = self.teacher_tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True
            )
            teacher_ids = list(encoded.input_ids)
            teacher_ends = [end for _, end in encoded.offset_mapping]
            if has_eos:
                teacher_ids.append(self.teacher_tokenizer.eos_token_id)
            rows.append(_Row(len(ids), has_eos, text, ends, teacher_ids, teacher_ends))
        return rows

    @torch.no_grad()
    def _teacher_logprobs(
        self, batch: Batch, rows: list[_Row], temperature: float
    ) -> tuple[Tensor, Tensor]:
        """log softmax(z_T / τ) [B, R_T, V_T] at the teacher's response positions, and the
        teacher's response ids [B, R_T]."""
        tok = self.teacher_tokenizer
        prompts = [chat_prompt(tok, e.prompt) for e in batch.examples]
        prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
        response_ids, response_mask = right_pad([r.teacher_ids for r in rows], tok.pad_token_id)
        device = next(self.model.parameters()).device
        logits = sequence_logits(
            self.model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            response_ids.to(device),
            response_mask.to(device),
            len(tok),
        )
        return log_softmax_at(logits, temperature), response_ids.to(device)

    def token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        if self.method != "span":
            raise self.cannot("token_logprobs")
        rows = self._rows(batch)
        logprobs, teacher_ids = self._teacher_logprobs(batch, rows, temperature)
        token_lp = logprobs.gather(-1, teacher_ids.unsqueeze(-1))[..., 0].cpu()
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
        for b, row in enumerate(rows):
            n_text = len(row.teacher_ends)
            student_blocks, teacher_blocks = span_blocks(
                row.student_ends, row.teacher_ends, len(row.text)
            )
            merged, exact = merged_token_logprobs(
                student_blocks, teacher_blocks, token_lp[b, :n_text].tolist()
            )
            if row.has_eos:
                merged.append(float(token_lp[b, n_text]))
                exact.append(True)
            out[b, : len(merged)] = torch.tensor(merged)
            self._matched[0] += sum(exact)
            self._matched[1] += len(exact)
        return out.to(batch.response_ids.device)

    def logits(self, batch: Batch) -> Tensor:
        if self.method != "uld":
            raise self.cannot("logits")
        rows = self._rows(batch)
        logprobs, _ = self._teacher_logprobs(batch, rows, 1.0)
        index = torch.zeros(batch.response_ids.shape, dtype=torch.long)
        for b, row in enumerate(rows):
            positions = aligned_positions(row.text, row.student_ends, row.teacher_ends)
            if row.has_eos:
                positions.append(len(row.teacher_ends))
            index[b, : len(positions)] = torch.tensor(positions, dtype=torch.long)
        index = index.to(logprobs.device)
        gathered = logprobs.gather(1, index.unsqueeze(-1).expand(-1, -1, logprobs.shape[-1]))
        return gathered.to(batch.response_ids.device)

    def metrics(self) -> dict[str, float]:
        matched, total = self._matched
        self._matched = [0, 0]
        return {"span_match_fraction": matched / total} if total else {}
