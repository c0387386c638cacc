"""Per-token losses computed from hidden states through the output projection, chunk by chunk.

A student's logits [N, V] (N response positions) are `hidden @ Wᵀ + b`. `projected_token_loss`
evaluates any per-token loss of logits without ever holding them: the forward walks the positions
in chunks, projecting one chunk at a time under `no_grad`; the backward projects each chunk again
and back-propagates through it alone, accumulating ∂/∂hidden, ∂/∂W and ∂/∂b. Only the hidden
states [N, H] and the projection are kept between forward and backward, and the temporaries of
one chunk at a time, so a step never holds a [B, R, V] student tensor. Within a chunk the loss
function (and its autograd graph, a dozen [n, V] tensors for a divergence) runs on a few rows at
a time (`loss_rows`): the per-position values and gradients are the same, the projection's
matmuls keep the chunk's size, and a chunk holds its logits, their gradient and the loss
temporaries of those rows only.

The teacher side may be projected the same way (`ProjectedLogits` for the teacher too: its logits
are formed per chunk under no_grad), or be any tensor-like answer with positions first (full
logits [N, V], or the top-k indices and log-probs [N, k]).

Values equal `loss_fn(logits, teacher)` on the full logits and gradients equal autograd's through
the projection, up to float rounding (the chunks sum the weight gradient in another order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from opdistill.losses.chunked import CHUNK_ELEMENTS
from opdistill.losses.logprobs import gather_tokens, log_softmax_at

# The loss function sees about this many elements (rows × V) at once: 2 MiB per fp32 temporary.
LOSS_ELEMENTS = 1 << 19


@dataclass
class ProjectedLogits:
    """Logits kept as hidden states and the projection that forms them: hidden [..., H] @ Wᵀ + b,
    restricted to the first `vocab_size` columns (columns past the tokenizer are padding)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    vocab_size: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.vocab_size))

    def chunk(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The logits of a chunk of hidden rows (differentiable in all three inputs)."""
        logits = hidden @ weight[: self.vocab_size].T
        if bias is not None:
            logits = logits + bias[: self.vocab_size]
        return logits

    @torch.no_grad()
    def token_logprobs(self, ids: Tensor, temperature: float = 1.0, chunk_size: int = 0) -> Tensor:
        """log softmax(logits / τ) of the tokens `ids` [...], formed one chunk at a time."""
        hidden = self.hidden.reshape(-1, self.hidden.shape[-1])
        flat_ids = ids.reshape(-1)
        if chunk_size <= 0:
            chunk_size = max(1, CHUNK_ELEMENTS // max(1, self.vocab_size))
        out = torch.empty(flat_ids.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, len(flat_ids), chunk_size):
            end = start + chunk_size
            logprobs = log_softmax_at(
                self.chunk(hidden[start:end], self.weight, self.bias), temperature
            )
            out[start:end] = gather_tokens(logprobs, flat_ids[start:end])
        return out.reshape(ids.shape)

    def materialize(self) -> Tensor:
        """The full logits [..., V] (for reference and for the objectives that need them)."""
        return self.chunk(self.hidden, self.weight, self.bias)


# A per-token loss of a chunk: (student logits [n, V], teacher chunk) -> values [n].
ChunkLoss = Callable[[Tensor, object], Tensor]


def projected_token_loss(
    student: ProjectedLogits,
    teacher: ProjectedLogits | Sequence[Tensor] | Tensor,
    loss_fn: ChunkLoss,
    chunk_size: int = 0,
    loss_rows: int = 0,
) -> Tensor:
    """`loss_fn` of the student's logits and the teacher's answer, per position, in chunks.

    Args:
        student: the student's hidden states [..., H] and output projection.
        teacher: the teacher's logits as a `ProjectedLogits` (projected per chunk, no gradient),
            a tensor [..., V], or a sequence of tensors with the student's leading dimensions
            (e.g. top-k indices and log-probs), sliced per chunk and passed as a tuple.
        loss_fn: maps a chunk of student logits [n, V] and the matching teacher chunk (logits
            [n, V], or the tuple of slices) to per-position values [n], each row's value
            depending on that row alone.
        chunk_size: positions per chunk (one projection matmul); 0 picks about 2^22 / V.
        loss_rows: positions `loss_fn` sees at once within a chunk; 0 picks about 2^19 / V.

    Returns:
        values with the student's leading dimensions, in `loss_fn`'s dtype.
    """
    lead = student.hidden.shape[:-1]
    if chunk_size <= 0:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, student.vocab_size))
    if loss_rows <= 0:
        loss_rows = max(1, LOSS_ELEMENTS // max(1, student.vocab_size))
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    if isinstance(teacher, ProjectedLogits):
        flat_teacher: object = ProjectedLogits(
            teacher.hidden.reshape(-1, teacher.hidden.shape[-1]).detach(),
            teacher.weight.detach(),
            None if teacher.bias is None else teacher.bias.detach(),
            teacher.vocab_size,
        )
        teacher_tensors: tuple[Tensor, ...] = ()
    else:
        parts = (teacher,) if isinstance(teacher, Tensor) else tuple(teacher)
        teacher_tensors = tuple(
            p.detach().reshape(hidden.shape[0], *p.shape[len(lead) :]) for p in parts
        )
        flat_teacher = None if isinstance(teacher, Tensor) else len(teacher_tensors)
    bias = student.bias
    values = _ProjectedLoss.apply(
        hidden,
        student.weight,
        bias,
        student,
        flat_teacher,
        loss_fn,
        chunk_size,
        min(loss_rows, chunk_size),
        *teacher_tensors,
    )
    return values.reshape(lead)


def _teacher_chunk(teacher: object, tensors: tuple[Tensor, ...], start: int, end: int) -> object:
    if isinstance(teacher, ProjectedLogits):
        with torch.no_grad():
            return teacher.chunk(teacher.hidden[start:end], teacher.weight, teacher.bias)
    if teacher is None:  # one tensor: full logits
        return tensors[0][start:end]
    return tuple(t[start:end] for t in tensors)


def _rows(teacher_chunk: object, start: int, end: int) -> object:
    """Rows `start:end` of a teacher chunk (a tensor, or a tuple of tensors, positions first)."""
    if isinstance(teacher_chunk, tuple):
        return tuple(t[start:end] for t in teacher_chunk)
    return teacher_chunk[start:end]  # type: ignore[index]


class _ProjectedLoss(torch.autograd.Function):
    """hidden [N, H], weight [V', H], bias [V'] → loss values [N], recomputed per chunk."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        student: ProjectedLogits,
        teacher: object,
        loss_fn: ChunkLoss,
        chunk_size: int,
        loss_rows: int,
        *teacher_tensors: Tensor,
    ) -> Tensor:
        n = hidden.shape[0]
        pieces = []
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                end = min(n, start + chunk_size)
                logits = student.chunk(hidden[start:end], weight, bias)
                teacher_chunk = _teacher_chunk(teacher, teacher_tensors, start, end)
                for a in range(0, end - start, loss_rows):
                    b = min(end - start, a + loss_rows)
                    pieces.append(loss_fn(logits[a:b], _rows(teacher_chunk, a, b)))
                del logits, teacher_chunk
        values = torch.cat(pieces) if pieces else hidden.new_zeros(0)
        ctx.save_for_backward(hidden, weight, bias, *teacher_tensors)
        ctx.student, ctx.teacher, ctx.loss_fn = student, teacher, loss_fn
        ctx.chunk_size, ctx.loss_rows = chunk_size, loss_rows
        return values

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_values: Tensor) -> tuple:
        """Per chunk: the logits again (no graph), ∂loss/∂logits through `loss_fn` alone (a few
        rows at a time), then the linear layer's gradients by hand, summed in place into one
        accumulator per input (float32 for lower-precision weights): no [V, H] temporary per
        chunk."""
        hidden, weight, bias, *teacher_tensors = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        vocab = ctx.student.vocab_size
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if needs_weight else None
        grad_bias = None
        if bias is not None and needs_bias:
            grad_bias = torch.zeros_like(bias, dtype=accumulate)
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(n, start + ctx.chunk_size)
            rows = hidden[start:end].detach()
            with torch.no_grad():
                logits = ctx.student.chunk(rows, weight, bias)
                grad_logits = torch.empty_like(logits, dtype=weight.dtype)
            teacher = _teacher_chunk(ctx.teacher, tuple(teacher_tensors), start, end)
            for a in range(0, end - start, ctx.loss_rows):
                b = min(end - start, a + ctx.loss_rows)
                with torch.enable_grad():
                    part = logits[a:b].detach().requires_grad_(True)
                    values = ctx.loss_fn(part, _rows(teacher, a, b))
                    (grad_part,) = torch.autograd.grad(
                        values, part, grad_values[start + a : start + b].to(values.dtype)
                    )
                grad_logits[a:b] = grad_part
                del part, values, grad_part
            del logits, teacher
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight[:vocab]
            if grad_weight is not None:
                grad_weight[:vocab].addmm_(grad_logits.T.to(accumulate), rows.to(accumulate))
            if grad_bias is not None:
                grad_bias[:vocab] += grad_logits.sum(dim=0, dtype=accumulate)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            *(None for _ in teacher_tensors),
        )
