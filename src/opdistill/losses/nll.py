"""Negative log-likelihood of the given tokens (SFT, SeqKD)."""

from __future__ import annotations

import torch
from torch import Tensor


def token_nll(logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """−log softmax(logits/τ)[y_t] at every position: [..., V] logits, [...] ids → [...].

    Computed in fp32 (fp64 stays fp64). Ids outside the vocabulary (e.g. padding ids on masked
    positions) are clamped for the gather; mask those positions out in the reduction.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    index = target_ids.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1)
