"""Distillation losses: token divergences and masked reductions."""

from opdistill.losses.divergence import DIVERGENCE_KINDS, token_divergence
from opdistill.losses.nll import token_nll
from opdistill.losses.reduction import (
    REDUCTIONS,
    masked_token_sum,
    reduce_loss,
    sequence_mean,
    token_mean,
)

__all__ = [
    "DIVERGENCE_KINDS",
    "REDUCTIONS",
    "masked_token_sum",
    "reduce_loss",
    "sequence_mean",
    "token_divergence",
    "token_mean",
    "token_nll",
]
