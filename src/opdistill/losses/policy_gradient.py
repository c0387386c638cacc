"""Policy-gradient pieces: GRPO-style group advantages and GKD + RL mixing (GKD paper, eq. 5).

GKD + RL maximises (1−α)·E_{y~q_θ}[r(y)] − α·E[D(y|x)]; ``reward_mixed_loss`` is its negation per
token, α·D_t + (1−α)·PG_t, with PG_t = −sg(A)·log q_θ(y_t) (``policy_gradient_loss``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> Tensor:
    """GRPO advantages ``[N]`` (detached) for rewards ``[N]``, N = num_prompts × group_size.

    Consecutive blocks of ``group_size`` samples share a prompt:
    A_i = (r_i − mean_g) / (std_g + eps) with the population std of the group, or
    A_i = r_i − mean_g when ``normalize_std`` is False. A group whose rewards are all equal gets 0.
    ``group_size == 1`` would make every advantage 0, so it falls back to a batch baseline:
    A_i = r_i − mean(r) over the whole batch (no std normalisation).
    Computed in fp32 (fp64 stays fp64); integer/bool rewards are accepted.
    """
    if rewards.dim() != 1:
        raise OpdistillError(f"rewards must be a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise OpdistillError(f"group_size must be an integer >= 1, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise OpdistillError(
            f"number of rewards {rewards.numel()} is not a multiple of group_size {group_size}"
        )
    if not (eps >= 0 and math.isfinite(eps)):
        raise OpdistillError(f"advantage eps must be a finite number >= 0, got {eps!r}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.detach().to(dtype)
    if r.numel() == 0:
        return r
    if group_size == 1:
        return r - r.mean()
    groups = r.reshape(-1, group_size)
    # Exact 0 for constant groups (the float mean of equal values can be off by one ulp).
    constant = groups.amax(-1, keepdim=True) == groups.amin(-1, keepdim=True)
    centred = torch.where(constant, 0.0, groups - groups.mean(-1, keepdim=True))
    if normalize_std:
        std = groups.std(-1, unbiased=False, keepdim=True)
        centred = torch.where(constant, 0.0, centred / torch.where(constant, 1.0, std + eps))
    return centred.reshape(-1)


def policy_gradient_loss(student_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token REINFORCE loss ``[B, T]``: −sg(A)·log q_θ(y_t), 0 on masked positions.

    ``student_logprobs`` ``[B, T]`` = log q_θ(y_t) (with graph); ``advantages`` ``[B]`` (one per
    sequence, broadcast over its tokens) or ``[B, T]`` (per token). Its gradient is −A·∇log q_θ.
    """
    if student_logprobs.shape != mask.shape or student_logprobs.dim() != 2:
        raise OpdistillError(
            f"student log-probs {tuple(student_logprobs.shape)} and mask {tuple(mask.shape)} "
            "must have the same shape [B, T]"
        )
    if advantages.shape == student_logprobs.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != student_logprobs.shape:
        raise OpdistillError(
            f"advantages {tuple(advantages.shape)} must have shape [B] or [B, T] with "
            f"[B, T] = {tuple(student_logprobs.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logprobs.dtype, advantages.dtype), torch.float32
    )
    keep = mask.bool()
    adv = advantages.detach().to(dtype).expand_as(student_logprobs)
    adv = torch.where(keep, adv, 0.0)
    logq = torch.where(keep, student_logprobs.to(dtype), 0.0)
    return torch.where(keep, -adv * logq, 0.0)


def reward_mixed_loss(
    distill_per_token: Tensor, pg_per_token: Tensor, distill_weight: float
) -> Tensor:
    """α·D_t + (1−α)·PG_t with α = ``distill_weight`` ∈ [0, 1], per token.

    This is the negation of GKD eq. 5's objective (1−α)·E[r] − α·E[D]: α = 1 is pure
    distillation, α = 0 pure RL. At the endpoints the unused term is dropped entirely (so inf/NaN
    in it cannot leak through 0·inf).
    """
    if not 0.0 <= distill_weight <= 1.0:
        raise OpdistillError(f"distill_weight must be in [0, 1], got {distill_weight!r}")
    if distill_per_token.shape != pg_per_token.shape:
        raise OpdistillError(
            f"distillation loss {tuple(distill_per_token.shape)} and policy-gradient loss "
            f"{tuple(pg_per_token.shape)} must have the same shape"
        )
    if distill_weight == 1.0:
        return distill_per_token
    if distill_weight == 0.0:
        return pg_per_token
    return distill_weight * distill_per_token + (1.0 - distill_weight) * pg_per_token
