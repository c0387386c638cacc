"""MiniLLM: sequence-level reverse KL optimised by policy gradient (``specs/objectives.md`` §4).

P = teacher, Q = student. For a sampled response y (``response_ids``, logits at t predict y_t):

    r_t = log P(y_t) − log Q(y_t)                 (per-token reward, student side detached)
    R_{t+1} = Σ_{t' > t} r_{t'}                    (future return over masked-in positions)
    ∇L = ∇ Σ_t KL_t(Q‖P) − Σ_t w_t·R_{t+1}·∇log q_θ(y_t)

The immediate term is taken exactly over the vocabulary (single-step decomposition) and the future
part by the score-function estimator. With teacher-mixed sampling (ỹ ~ p̃ = αP + (1−α)Q) each
token carries the importance weight w_t = Q(y_t)/p̃(y_t) (``mixture_weights``; no product over
steps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.divergence import token_divergence
from opdistill.losses.logprobs import check_temperature, gather_tokens, log_softmax_at


def minillm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_ids: Tensor,
    mask: Tensor,
    length_norm: bool = True,
    importance_weights: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    clip: float = 0.0,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token MiniLLM loss ``[B, T]`` (0 on masked positions); the caller reduces.

    loss_t = KL_t(Q‖P) − sg(A_t)·log q_θ(y_t),   A_t = w_t·R_{t+1}

    - ``R_{t+1} = Σ_{t'>t} r_{t'}`` over masked-in positions, ``r_t = log P(y_t) − sg(log Q(y_t))``.
      With ``length_norm`` it is averaged instead: ``R^norm_{t+1} = (1/(L−t−1)) Σ_{t'>t} r_{t'}``
      (L = the row's response length, t 0-based; in general, divided by the number of masked-in
      future positions). Where there is no future token (t = L−1) the future term is 0.
    - ``importance_weights`` ``[B, T]``: w_t (detached), default 1.
    - ``clip`` = ε > 0 (needs ``old_logprobs`` = log q_old(y_t) ``[B, T]``): PPO-style surrogate
      ``max(−ρ·A, −clip(ρ, 1−ε, 1+ε)·A)`` with ρ = exp(log q_θ(y_t) − sg(old_logprobs)) replaces
      ``−A·log q_θ(y_t)``. At ρ = 1 its gradient equals the unclipped one (−A·∇log q_θ); its value
      is −A instead of −A·log q_θ (surrogate values are not comparable, gradients are). For A > 0
      and ρ > 1+ε (or A < 0 and ρ < 1−ε) the gradient is 0. ``old_logprobs`` is ignored when
      ``clip == 0``.
    - ``temperature`` τ divides both logits before log_softmax (for KL_t, r_t and log q_θ).

    Computed in fp32 (fp64 stays fp64). Padding ids on masked positions are clamped for the gather;
    masked positions (any finite logits there) get exactly 0 in value and gradient.
    """
    _check(student_logits, teacher_logits, response_ids, mask)
    if not (clip >= 0 and math.isfinite(clip)):
        raise OpdistillError(f"minillm clip epsilon must be a finite number >= 0, got {clip!r}")
    if clip > 0 and old_logprobs is None:
        raise OpdistillError(
            "minillm clip > 0 needs old_logprobs (log q_old of the sampled tokens)"
        )
    check_temperature(temperature)
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    keep = mask.bool()
    log_q = log_softmax_at(student_logits, temperature, dtype)
    log_p = log_softmax_at(teacher_logits, temperature, dtype)
    logq_y = gather_tokens(log_q, response_ids)
    logp_y = gather_tokens(log_p.detach(), response_ids)

    reward = torch.where(keep, logp_y - logq_y.detach(), 0.0)
    future = _exclusive_suffix_sum(reward)
    if length_norm:
        count = _exclusive_suffix_sum(keep.to(dtype))
        future = torch.where(count > 0, future / count.clamp(min=1.0), 0.0)

    advantage = future
    if importance_weights is not None:
        _check_same(importance_weights, mask, "importance_weights")
        weights = torch.where(keep, importance_weights.detach().to(dtype), 0.0)
        advantage = weights * advantage
    advantage = torch.where(keep, advantage, 0.0).detach()

    if clip > 0 and old_logprobs is not None:
        _check_same(old_logprobs, mask, "old_logprobs")
        old = torch.where(keep, old_logprobs.detach().to(dtype), logq_y.detach())
        ratio = torch.exp(torch.where(keep, logq_y - old, 0.0))
        pg = torch.maximum(-ratio * advantage, -ratio.clamp(1.0 - clip, 1.0 + clip) * advantage)
    else:
        pg = -advantage * logq_y

    kl = token_divergence(student_logits, teacher_logits, "reverse_kl", temperature=temperature)
    return torch.where(keep, kl + pg, 0.0)


def mixture_weights(
    student_logprobs_sampled: Tensor, teacher_logprobs_sampled: Tensor, alpha: float
) -> Tensor:
    """Per-token importance weights w_t = Q(y_t)/p̃(y_t) for samples from p̃ = α·P + (1−α)·Q.

    In log space: ``exp(log q − logaddexp(log α + log p, log(1−α) + log q))``, detached, in fp32
    (fp64 stays fp64). α ∈ [0, 1); α = 0 gives exactly 1 (pure student sampling).
    """
    if not 0.0 <= alpha < 1.0:
        raise OpdistillError(f"teacher-mixing alpha must be in [0, 1), got {alpha!r}")
    if student_logprobs_sampled.shape != teacher_logprobs_sampled.shape:
        raise OpdistillError(
            f"student log-probs {tuple(student_logprobs_sampled.shape)} and teacher log-probs "
            f"{tuple(teacher_logprobs_sampled.shape)} must have the same shape"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logprobs_sampled.dtype, teacher_logprobs_sampled.dtype),
        torch.float32,
    )
    log_q = student_logprobs_sampled.detach().to(dtype)
    if alpha == 0.0:
        return torch.ones_like(log_q)
    log_p = teacher_logprobs_sampled.detach().to(dtype)
    log_mix = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    return torch.exp(log_q - log_mix)


def _exclusive_suffix_sum(x: Tensor) -> Tensor:
    """out[..., t] = Σ_{t' > t} x[..., t'] (no subtraction, so an inf term cannot create NaN)."""
    inclusive = x.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([inclusive[..., 1:], torch.zeros_like(inclusive[..., :1])], dim=-1)


def _check(
    student_logits: Tensor, teacher_logits: Tensor, response_ids: Tensor, mask: Tensor
) -> None:
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise OpdistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [B, T, V]"
        )
    if response_ids.shape != student_logits.shape[:-1]:
        raise OpdistillError(
            f"response ids {tuple(response_ids.shape)} must match the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    _check_same(mask, response_ids, "mask")


def _check_same(x: Tensor, ref: Tensor, name: str) -> None:
    if x.shape != ref.shape:
        raise OpdistillError(f"{name} {tuple(x.shape)} must have shape {tuple(ref.shape)}")
