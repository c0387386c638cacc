"""Sampled-token distillation losses (``specs/objectives.md`` section 3).

These forms only need log-probabilities of the *sampled* response tokens y_t ~ Q. P = teacher,
Q = student (q_θ), ``sg`` = stop-gradient. Every function returns a per-token tensor ``[..., T]``
that the caller reduces with the masked token mean (``reduction.token_mean``). Positions where
``mask`` is 0 hold 0 and receive exactly zero gradient, even when padding ids or ``-inf`` logits
make the log-probs there infinite (``torch.where`` is applied before any multiplication).

Per-token reward: r_t = log P(y_t) − log Q(y_t) (the negative sampled reverse KL).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.divergence import _kl
from opdistill.losses.logprobs import check_temperature, gather_tokens, log_softmax_at


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits/τ)[ids] at every position: ``[..., V]`` logits, ``[...]`` ids → ``[...]``.

    Computed in fp32 (fp64 stays fp64). Ids outside ``[0, V)`` (padding on masked positions) are
    clamped for the gather; mask those positions out downstream.
    """
    check_temperature(temperature)
    if logits.dim() == 0 or ids.shape != logits.shape[:-1]:
        raise OpdistillError(
            f"ids {tuple(ids.shape)} must have the shape of logits {tuple(logits.shape)} "
            "without the vocabulary dim"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return gather_tokens(log_softmax_at(logits, temperature, dtype), ids)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{t' ≥ t, mask[t'] = 1} γ^{t'−t} r_{t'} along the last dim (time).

    ``rewards`` and ``mask`` are ``[..., T]``; γ ∈ [0, 1]. Rewards at masked-out positions are
    ignored (replaced by 0 before any arithmetic, so inf/NaN there cannot leak) and the returns
    there are 0; γ = 0 gives the masked rewards themselves. The exponent counts positions, so a
    masked-out position inside a response still discounts by one step. Computed exactly by the
    reverse recursion G_t = r_t + γ·G_{t+1}, differentiable in ``rewards``.
    """
    _check_gamma(gamma)
    _check_same_shape(rewards, mask, "rewards", "mask")
    keep = mask.bool()
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = torch.where(keep, rewards.to(dtype), 0.0)
    if gamma == 0.0:
        return r
    returns: list[Tensor] = []
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + gamma * running
        returns.append(running)
    return torch.where(keep, torch.stack(returns[::-1], dim=-1), 0.0)


def sampled_token_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    gamma: float = 0.0,
    is_cap: float = math.inf,
) -> Tensor:
    """Tinker form of on-policy distillation, per token.

        r_t = log P(y_t) − sg(log q_θ(y_t))
        A_t = sg(G_t),   G_t = Σ_{t'≥t} γ^{t'−t} r_{t'}        (γ = 0: A_t = r_t)
        ρ_t = exp(log q_θ(y_t) − sg(log q_sampler(y_t)))
        loss_t = −ρ_t · A_t

    All inputs are ``[..., T]`` log-probs of the sampled tokens; only ``student_logprobs``
    carries gradient (teacher and sampler are detached here). When the sampler is the learner,
    ρ_t = 1 in value and ∇loss_t = −A_t·∇log q_θ(y_t) (plain REINFORCE with reward r); otherwise
    ρ_t = q_θ/q_sampler corrects the sampler/learner mismatch.

    Stale samples (pipelined rollouts) use truncated importance sampling: with ρ_t > `is_cap`
    the token's weight is `is_cap`, loss_t = −is_cap · A_t · exp(log q_θ − sg(log q_θ)) (value
    −is_cap·A_t, gradient −is_cap·A_t·∇log q_θ); below the cap nothing changes.
    """
    _check_same_shape(student_logprobs, mask, "student_logprobs", "mask")
    _check_same_shape(teacher_logprobs, mask, "teacher_logprobs", "mask")
    _check_same_shape(sampler_logprobs, mask, "sampler_logprobs", "mask")
    keep = mask.bool()
    dtype = torch.promote_types(student_logprobs.dtype, torch.float32)
    log_q = student_logprobs.to(dtype)
    rewards = teacher_logprobs.detach().to(dtype) - log_q.detach()
    advantages = discounted_returns(rewards, keep, gamma).detach()
    log_ratio = torch.where(keep, log_q - sampler_logprobs.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    if math.isfinite(is_cap):
        capped = ratio.detach() > is_cap
        ratio = torch.where(capped, is_cap * torch.exp(log_q - log_q.detach()), ratio)
    return torch.where(keep, -ratio * advantages, 0.0)


def vopd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_ids: Tensor,
    mask: Tensor,
    top_k: int = 0,
    gamma: float = 0.0,
    temperature: float = 1.0,
) -> Tensor:
    """vOPD: REINFORCE on the sampled reverse KL with a closed-form value baseline, per token.

        r_t    = log P(y_t) − log Q(y_t)                       (full vocabulary, detached)
        V(s_t) = −KL_t(Q‖P) = E_{a~Q}[r_t(a)]                  (closed form, detached)
        A_t    = sg(G_t − V(s_t)),  G_t = Σ_{t'≥t} γ^{t'−t} r_{t'}
        loss_t = −A_t · log q_θ(y_t)

    With γ = 0, A_t = sg(log P(y_t) − log Q(y_t) + KL_t(Q‖P)) and E_{y~Q}[∇loss_t] = ∇KL_t(Q‖P).
    Any baseline that does not depend on y_t keeps the estimator unbiased, because
    E_{a~Q}[b·∇log Q(a)] = b·∇Σ_a Q(a) = 0; the baseline changes only the variance. It usually
    lowers it (clearly so when the student is flatter than the teacher), but a constant baseline
    is not guaranteed to: a peaked student against a flat teacher can see higher variance. With
    γ > 0, V(s_t) is still the expected *immediate* reward, not the value of the return.

    ``top_k > 0``: the baseline's KL is taken on the support of the student's top-k ids at each
    position — both models' full-vocabulary log-probs are gathered at those k ids, renormalised
    over them (log-softmax over the k values) and KL(Q_k‖P_k) is summed over the k entries. This
    is an approximation of −KL(Q‖P); the estimator stays unbiased since the approximate
    baseline still does not depend on y_t. The reward always uses full-vocabulary
    log-probs of the sampled token. ``top_k ≥ V`` is the full vocabulary.

    Args:
        student_logits: ``[..., T, V]``; gradient flows through log q_θ(y_t) only.
        teacher_logits: ``[..., T, V]`` (computed under no_grad; detached here).
        response_ids: ``[..., T]`` sampled tokens y_t (out-of-range padding ids are clamped).
        mask: ``[..., T]``, 1 on response tokens.
        temperature: loss temperature τ; both logits are divided by τ before log-softmax.
    """
    check_temperature(temperature)
    _check_gamma(gamma)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise OpdistillError(
            f"vopd top_k must be an integer >= 0 (0 = full vocabulary), got {top_k!r}"
        )
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise OpdistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., T, V]"
        )
    _check_same_shape(response_ids, mask, "response_ids", "mask")
    if response_ids.shape != student_logits.shape[:-1]:
        raise OpdistillError(
            f"response_ids {tuple(response_ids.shape)} must have the shape of the logits "
            f"{tuple(student_logits.shape)} without the vocabulary dim"
        )
    keep = mask.bool()
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    log_q = log_softmax_at(student_logits, temperature, dtype)
    with torch.no_grad():
        log_p = log_softmax_at(teacher_logits.detach(), temperature, dtype)
        log_q_sg = log_q.detach()
        rewards = gather_tokens(log_p, response_ids) - gather_tokens(log_q_sg, response_ids)
        returns = discounted_returns(rewards, keep, gamma)
        vocab = log_q_sg.shape[-1]
        if 0 < top_k < vocab:
            support = log_q_sg.topk(top_k, dim=-1).indices
            log_q_sg = torch.log_softmax(log_q_sg.gather(-1, support), dim=-1)
            log_p = torch.log_softmax(log_p.gather(-1, support), dim=-1)
        baseline = -_kl(log_q_sg, log_p)
        advantages = torch.where(keep, returns - baseline, 0.0)
    log_q_y = gather_tokens(log_q, response_ids)
    return torch.where(keep, -advantages * log_q_y, 0.0)


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise OpdistillError(f"discount gamma must be in [0, 1], got {gamma!r}")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape or a.dim() == 0:
        raise OpdistillError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same "
            "shape [..., T]"
        )
