"""Negative log-likelihood of the given tokens (SFT, SeqKD)."""

from __future__ import annotations

from torch import Tensor

from opdistill.losses.logprobs import check_temperature, gather_tokens, log_softmax_at


def token_nll(logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """−log softmax(logits/τ)[y_t] at every position: [..., V] logits, [...] ids → [...].

    Computed in fp32 (fp64 stays fp64). Ids outside the vocabulary (e.g. padding ids on masked
    positions) are clamped for the gather; mask those positions out in the reduction.
    """
    check_temperature(temperature)
    return -gather_tokens(log_softmax_at(logits, temperature), target_ids)
