"""Distillation losses: pure functions of logits / log-probs and masks, one value per token."""

from opdistill.losses.chunked import chunked_token_divergence
from opdistill.losses.divergence import DIVERGENCE_KINDS, token_divergence
from opdistill.losses.logprobs import check_temperature, gather_tokens, log_softmax_at
from opdistill.losses.minillm import minillm_loss, mixture_weights
from opdistill.losses.nll import token_nll
from opdistill.losses.policy_gradient import (
    group_advantages,
    policy_gradient_loss,
    reward_mixed_loss,
)
from opdistill.losses.reduction import (
    REDUCTIONS,
    masked_token_sum,
    reduce_loss,
    sequence_mean,
    token_mean,
)
from opdistill.losses.sampled import (
    discounted_returns,
    sampled_token_loss,
    token_logprobs,
    vopd_loss,
)
from opdistill.losses.selection import position_weights, tip_weights, weighted_token_mean
from opdistill.losses.self_distill import base_anchor, tilted_teacher_logprobs
from opdistill.losses.taid import TaidSchedule, taid_loss
from opdistill.losses.topk import log1mexp, topk_divergence
from opdistill.losses.uld import uld_distance

__all__ = [
    "DIVERGENCE_KINDS",
    "REDUCTIONS",
    "TaidSchedule",
    "base_anchor",
    "check_temperature",
    "chunked_token_divergence",
    "discounted_returns",
    "gather_tokens",
    "group_advantages",
    "log1mexp",
    "log_softmax_at",
    "masked_token_sum",
    "minillm_loss",
    "mixture_weights",
    "policy_gradient_loss",
    "position_weights",
    "reduce_loss",
    "reward_mixed_loss",
    "sampled_token_loss",
    "sequence_mean",
    "taid_loss",
    "tilted_teacher_logprobs",
    "tip_weights",
    "token_divergence",
    "token_logprobs",
    "token_mean",
    "token_nll",
    "topk_divergence",
    "uld_distance",
    "vopd_loss",
    "weighted_token_mean",
]
