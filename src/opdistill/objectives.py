"""From a config to per-token losses: every objective behind one call.

`per_token_loss` returns the loss of each response token and `token_weights` the weight each token
gets in the mean (the response mask, times TIP selection and position weights when configured).
The trainer reduces them with `reduce_weighted`. The formulas live in `opdistill.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opdistill.batch import Batch
from opdistill.config import Config
from opdistill.errors import OpdistillError
from opdistill.losses import (
    DIVERGENCE_KINDS,
    chunked_token_divergence,
    minillm_loss,
    mixture_weights,
    policy_gradient_loss,
    position_weights,
    reduce_loss,
    reward_mixed_loss,
    sampled_token_loss,
    taid_loss,
    tip_weights,
    token_logprobs,
    token_nll,
    topk_divergence,
    vopd_loss,
    weighted_token_mean,
)
from opdistill.teacher import TopKLogprobs


@dataclass
class StepInputs:
    """What a step knows besides logits: TAID's t and, with a reward, per-sequence advantages."""

    taid_t: float = 1.0
    advantages: Tensor | None = None


def distillation_loss(
    config: Config,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogprobs | None,
    batch: Batch,
    t: float,
) -> Tensor:
    """The configured distillation objective per response token, [B, T].

    The teacher's scores are its full logits [B, T, V], or its top-k log-probs (`TopKLogprobs`,
    `loss.teacher_top_k` > 0), which serve the divergences (over the top-k tokens plus a tail
    bucket) and `sampled_token` (the response tokens' log-probs).
    """
    lc = config.loss
    kind, tau, ids, mask = lc.kind, lc.temperature, batch.response_ids, batch.response_mask
    if kind == "nll":
        return token_nll(student_logits, ids, temperature=tau)
    sparse = isinstance(teacher_logits, TopKLogprobs)
    if sparse and kind in DIVERGENCE_KINDS:
        return topk_divergence(
            student_logits,
            teacher_logits.indices,
            teacher_logits.logprobs,
            kind,
            beta=lc.beta,
            alpha=lc.alpha,
            temperature=tau,
        )
    if sparse and kind != "sampled_token":
        raise OpdistillError(
            f"loss.kind={kind!r} needs the teacher's full logits; top-k teacher log-probs "
            f"(loss.teacher_top_k > 0) serve {', '.join(DIVERGENCE_KINDS)} and sampled_token"
        )
    if kind in DIVERGENCE_KINDS:
        return chunked_token_divergence(
            student_logits,
            teacher_logits,
            kind,
            beta=lc.beta,
            alpha=lc.alpha,
            temperature=tau,
            chunk_size=lc.chunk_size,
        )
    if kind == "taid":
        return taid_loss(student_logits, teacher_logits, t, temperature=tau)
    if kind == "vopd":
        return vopd_loss(
            student_logits,
            teacher_logits,
            ids,
            mask,
            top_k=lc.top_k,
            gamma=lc.gamma,
            temperature=tau,
        )
    student_lp = token_logprobs(student_logits, ids, temperature=tau)
    teacher_lp = (  # a sparse teacher's log-probs of the response tokens are already at τ
        teacher_logits.token_logprobs
        if sparse
        else token_logprobs(teacher_logits, ids, temperature=tau)
    )
    sampler_lp = batch.sampler_logprobs
    if kind == "sampled_token":
        sampler_lp = student_lp.detach() if sampler_lp is None else sampler_lp
        return sampled_token_loss(student_lp, teacher_lp, sampler_lp, mask, gamma=lc.gamma)
    if kind == "minillm":
        mix = lc.minillm.teacher_mix
        weights = mixture_weights(student_lp.detach(), teacher_lp, mix) if mix > 0 else None
        # PPO clip compares with the student at sampling time; with a mixed sampler the recorded
        # log-probs are the mixture's, so the ratio is taken against the detached student.
        old = sampler_lp if (mix == 0 and sampler_lp is not None) else student_lp.detach()
        return minillm_loss(
            student_logits,
            teacher_logits,
            ids,
            mask,
            length_norm=lc.minillm.length_norm,
            importance_weights=weights,
            old_logprobs=old,
            clip=lc.minillm.clip,
            temperature=tau,
        )
    raise AssertionError(f"unhandled loss kind {kind}")  # config validation lists every kind


def per_token_loss(
    config: Config,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogprobs | None,
    batch: Batch,
    inputs: StepInputs,
) -> Tensor:
    """Distillation loss, mixed with the verifier reward's policy gradient when configured."""
    weight = config.reward.distill_weight
    if inputs.advantages is None or weight == 1.0:
        return distillation_loss(config, student_logits, teacher_logits, batch, inputs.taid_t)
    student_lp = token_logprobs(student_logits, batch.response_ids)
    pg = policy_gradient_loss(student_lp, inputs.advantages, batch.response_mask)
    if weight == 0.0:
        return pg
    distill = distillation_loss(config, student_logits, teacher_logits, batch, inputs.taid_t)
    return reward_mixed_loss(distill, pg, weight)


def uses_token_weights(config: Config) -> bool:
    """Whether TIP selection or position weights change the per-token weights."""
    return config.loss.tip.mode != "off" or config.loss.position_weights.enabled


def token_weights(
    config: Config,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogprobs | None,
    mask: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-token weights: the mask, times TIP's keep-mask and PW-OPSD's position weights."""
    tip, pw = config.loss.tip, config.loss.position_weights
    weights = mask.float()
    if tip.mode != "off":
        if isinstance(teacher_logits, TopKLogprobs):
            raise OpdistillError(
                "loss.tip needs the teacher's full logits: set loss.teacher_top_k=0 or "
                "loss.tip.mode=off"
            )
        with torch.no_grad():
            weights = weights * tip_weights(
                student_logits.detach(),
                teacher_logits,
                mask,
                keep_fraction=tip.keep_fraction,
                mode=tip.mode,
                entropy_power=tip.entropy_power,
                divergence_power=tip.divergence_power,
                entropy_threshold=tip.entropy_threshold,
                divergence_threshold=tip.divergence_threshold,
                generator=generator,
            )
    if pw.enabled:
        weights = weights * position_weights(mask, w_min=pw.w_min, tau=pw.tau, s=pw.s)
    return weights


def reduce_weighted(
    config: Config,
    per_token: Tensor,
    weights: Tensor | None,
    mask: Tensor,
    num_tokens: int,
    num_sequences: int,
) -> Tensor:
    """This micro-batch's share of the step loss.

    Without token weights: the configured reduction with global token / sequence counts, exact
    under gradient accumulation and across processes. With weights (TIP, position weights), the
    weighted mean Σ w·ℓ / Σ w over the micro-batch, scaled by its share of the step's tokens (exact
    for one micro-batch; a token-weighted average of micro-batch means otherwise).
    """
    if weights is None:
        return reduce_loss(
            per_token,
            mask,
            config.loss.reduction,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )
    share = float(mask.sum()) / max(1, num_tokens)
    return weighted_token_mean(per_token, weights) * share
