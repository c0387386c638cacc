"""Token divergences against a sparse teacher: its top-k log-probs plus one tail bucket.

The teacher gives, per position, k token ids S and their log-probs log P(v), v ∈ S, normalised
over the whole vocabulary. Both distributions are collapsed onto k + 1 buckets, the k tokens and
the tail V \\ S:

    P̃ = (P(v))_{v∈S} ⊕ (1 − Σ_{v∈S} P(v)),   Q̃ = (Q(v))_{v∈S} ⊕ Σ_{u∉S} Q(u)

and the divergence is taken between P̃ and Q̃ (the formulas of `token_divergence`). Student mass
outside the teacher's top-k lands in the tail bucket, where it is compared with the teacher's tail
mass.
With k = V (S the whole vocabulary) the tail is empty and the result is `token_divergence`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.chunked import CHUNK_ELEMENTS, row_reader
from opdistill.losses.divergence import (
    _divergence,
    _validate_kind,
    _validate_params,
    compute_dtype,
)
from opdistill.losses.logprobs import check_temperature

NEG_INF = float("-inf")


def topk_divergence(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    kind: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Divergence between the teacher's and the student's top-k + tail bucket distributions.

    Args:
        student_logits: ``[..., V]``; Q = softmax(student_logits / τ).
        teacher_indices: ``[..., k]`` distinct token ids in [0, V), 1 ≤ k ≤ V.
        teacher_logprobs: ``[..., k]`` teacher log-probs of those ids, already at temperature τ
            (not rescaled here).
        kind, beta, alpha: as in `token_divergence` (KL(P̃‖Q̃), KL(Q̃‖P̃), JSD, TVD, skew KLs).
        temperature: loss temperature τ > 0 applied to the student logits.

    Teacher buckets: the given log-probs and the tail log(1 − Σ_S P) = log1mexp(logsumexp(log
    P(S))), −inf when Σ_S P ≥ 1 up to rounding (8 machine epsilons of the compute dtype).
    Student buckets: log Q(v) = z_v − logsumexp(z), z = student_logits / τ, at the teacher's ids
    (no [..., V] log-softmax is kept), and the tail log Σ_{u∉S} Q(u). In exact arithmetic that
    is log1mexp(logsumexp(log Q(S))); it is summed over the complement instead, so that a
    confident student (Σ_S Q = 1 in floating point) keeps its small, finite tail. Gradient flows to
    ``student_logits`` through all k + 1 buckets; the teacher's inputs are constants. With k = V
    both tails are −inf (empty) and the result equals `token_divergence`.

    Returns:
        ``[...]`` tensor in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    _validate(student_logits, teacher_indices, teacher_logprobs, kind, beta, alpha, temperature)
    vocab, k = student_logits.shape[-1], teacher_indices.shape[-1]
    dtype = compute_dtype(student_logits, teacher_logprobs)
    log_q = _StudentBuckets.apply(
        student_logits,
        teacher_indices.reshape(-1, k).long(),
        temperature,
        dtype,
        max(1, CHUNK_ELEMENTS // vocab),
    ).reshape(*teacher_indices.shape[:-1], k + 1)
    log_p_top = teacher_logprobs.detach().to(dtype)
    if k == vocab:  # the indices are a permutation of the vocabulary: nothing is left over
        log_p_tail = torch.full_like(log_p_top[..., :1], NEG_INF)
    else:
        lse = torch.logsumexp(log_p_top, dim=-1, keepdim=True)
        log_p_tail = log1mexp(torch.where(lse >= -_rounding(dtype), 0.0, lse))
    log_p = torch.cat([log_p_top, log_p_tail], dim=-1)
    return _divergence(log_p, log_q, kind, beta, alpha)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 − exp(a)) for a < 0, stably; −inf for a ≥ 0 (no mass left).

    log(−expm1(a)) for a > −ln 2, log1p(−exp(a)) below (Mächler, 2012).
    """
    inside = a < 0
    safe = torch.where(inside, a, -1.0)  # keeps the unused branch finite
    value = torch.where(
        safe > -math.log(2.0), torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe))
    )
    return torch.where(inside, value, NEG_INF)


def _rounding(dtype: torch.dtype) -> float:
    """Below this, 1 − Σ of a distribution's probabilities is rounding, not tail mass."""
    return 8 * torch.finfo(dtype).eps


class _StudentBuckets(torch.autograd.Function):
    """[..., V] logits, [N, k] ids → [N, k + 1] log-probs: log Q(v) at the ids, then the tail.

    z = logits / τ, lse = logsumexp(z). Buckets: z_v − lse for v ∈ S, and the tail
    log Σ_{u∉S} exp(z_u) − lse, summed directly over the complement (1 − Σ_{v∈S} Q(v) loses a
    confident student's tail to rounding). Gradient of the tail: ∂/∂z_u = [u∉S]·Q_u/Q_tail − Q_u.
    Only the logits (an input), the ids and two numbers per position are saved; both passes walk
    the positions in chunks.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        indices: Tensor,
        temperature: float,
        dtype: torch.dtype,
        chunk_size: int,
    ) -> Tensor:
        n, k = indices.shape
        out = torch.empty(n, k + 1, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        rows = row_reader(logits)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            z = _scaled(rows(start, end), dtype, temperature)
            ids = indices[start:end]
            lse[start:end] = torch.logsumexp(z, dim=-1)
            out[start:end, :k] = z.gather(-1, ids) - lse[start:end, None]
            complement = torch.logsumexp(z.scatter(-1, ids, NEG_INF), dim=-1)
            out[start:end, k] = complement - lse[start:end]
        ctx.save_for_backward(logits, indices, lse, out[:, k].clone())
        ctx.temperature, ctx.dtype, ctx.chunk_size = temperature, dtype, chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple:
        logits, indices, lse, tail = ctx.saved_tensors
        temperature, dtype, k = ctx.temperature, ctx.dtype, indices.shape[-1]
        n, rows = indices.shape[0], row_reader(logits)
        grad = torch.empty(n, logits.shape[-1], dtype=dtype, device=logits.device)
        grad_out = grad_out.to(dtype)
        for start in range(0, n, ctx.chunk_size):
            end = min(n, start + ctx.chunk_size)
            z = _scaled(rows(start, end), dtype, temperature) - lse[start:end, None]  # log Q
            ids, g = indices[start:end], grad_out[start:end]
            t = tail[start:end, None]
            # Q_u / Q_tail off the ids (0 where the tail is empty), then −Q_u·Σ_b g_b everywhere.
            chunk = torch.where(t > NEG_INF, (z - t).exp(), 0.0).scatter_(-1, ids, 0.0)
            chunk.mul_(g[:, k:])
            chunk.sub_(z.exp_() * g.sum(-1, keepdim=True))
            chunk.scatter_add_(-1, ids, g[:, :k])
            if temperature != 1.0:
                chunk.div_(temperature)
            grad[start:end] = chunk
        return grad.view(logits.shape).to(logits.dtype), None, None, None, None


def _scaled(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    logits = logits.to(dtype)
    return logits / temperature if temperature != 1.0 else logits


def _validate(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
) -> None:
    _validate_kind(kind)
    if student_logits.dim() == 0 or not student_logits.is_floating_point():
        raise OpdistillError("student logits must be a floating-point tensor [..., V]")
    if teacher_indices.dtype not in (torch.int64, torch.int32) or not (
        teacher_logprobs.is_floating_point()
    ):
        raise OpdistillError(
            "teacher indices must be an integer tensor and teacher log-probs a floating-point one"
        )
    batch = tuple(student_logits.shape[:-1])
    shape = tuple(teacher_indices.shape)
    if (
        shape != tuple(teacher_logprobs.shape)
        or shape[:-1] != batch
        or len(shape) != len(batch) + 1
    ):
        raise OpdistillError(
            f"teacher indices {shape} and log-probs {tuple(teacher_logprobs.shape)} must both "
            f"have shape [..., k] with [...] = {batch}, the student logits' leading dimensions"
        )
    vocab, k = student_logits.shape[-1], shape[-1]
    if not 1 <= k <= vocab:
        raise OpdistillError(f"teacher top-k size k={k} must be in [1, V={vocab}]")
    check_temperature(temperature)
    _validate_params(kind, beta, alpha)
    if teacher_indices.numel() == 0:
        return
    out_of_range = (teacher_indices.min() < 0) | (teacher_indices.max() >= vocab)
    ordered = teacher_indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
    out_of_range, repeated = torch.stack([out_of_range, repeated]).tolist()
    if out_of_range:
        raise OpdistillError(f"teacher indices must lie in [0, V={vocab})")
    if repeated:
        raise OpdistillError("teacher indices must be distinct at every position")
