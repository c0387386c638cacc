"""Reducing per-token loss values ``[..., T]`` to a scalar under a response mask.

The mask is bool or float with the same shape as the values. A float mask acts as per-token
weights; positions where it is 0 (or False) are excluded with ``torch.where``, so inf/NaN held
there (e.g. a divergence at padding) never reaches the result or its gradient. Sums run in at
least fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opdistill.errors import OpdistillError

REDUCTIONS: tuple[str, ...] = ("token", "sequence")


def masked_token_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ values·mask over all positions, ignoring (not multiplying) positions where mask == 0."""
    return _masked(values, mask).sum()


def token_mean(values: Tensor, mask: Tensor, num_tokens: Tensor | int | None = None) -> Tensor:
    """Σ values·mask / num_tokens.

    ``num_tokens`` defaults to ``mask.sum()`` (the local count). Under gradient accumulation or
    data parallelism pass the *global* count of response tokens of the whole optimizer step (all
    micro-batches, all processes): the micro-batch results then add up to the full-batch mean.
    ``num_tokens == 0`` gives 0, still connected to the graph (zero gradient).
    """
    total = masked_token_sum(values, mask)
    count = mask.sum() if num_tokens is None else num_tokens
    return _safe_divide(total, count)


def sequence_mean(
    values: Tensor, mask: Tensor, num_sequences: Tensor | int | None = None
) -> Tensor:
    """GKD-style mean: each sequence's mean over its own masked tokens (1/L_y), summed over
    sequences and divided by ``num_sequences``.

    The last dim is time; every leading index is one sequence. ``num_sequences`` defaults to the
    local number of sequences; under gradient accumulation / data parallelism pass the global
    count of the optimizer step. A sequence with no masked tokens contributes 0 but still counts
    in the denominator, so the denominator is known up front (it does not depend on the masks)
    and micro-batch results add up to the full-batch result.
    """
    _check_shapes(values, mask)
    per_token = _masked(values, mask)
    lengths = mask.sum(-1).to(per_token.dtype)
    per_sequence = torch.where(
        lengths > 0, per_token.sum(-1) / lengths.clamp(min=torch.finfo(lengths.dtype).tiny), 0.0
    )
    if num_sequences is None:
        num_sequences = per_sequence.numel()
    return _safe_divide(per_sequence.sum(), num_sequences)


def reduce_loss(
    values: Tensor,
    mask: Tensor,
    reduction: str,
    num_tokens: Tensor | int | None = None,
    num_sequences: Tensor | int | None = None,
) -> Tensor:
    """Dispatch to ``token_mean`` ("token") or ``sequence_mean`` ("sequence")."""
    if reduction == "token":
        return token_mean(values, mask, num_tokens)
    if reduction == "sequence":
        return sequence_mean(values, mask, num_sequences)
    raise OpdistillError(
        f"unknown loss reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}"
    )


def _check_shapes(values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape or values.dim() == 0:
        raise OpdistillError(
            f"loss values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same "
            "shape [..., T]"
        )


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """values·mask with masked-out positions set to exactly 0 (no NaN in value or gradient), in
    at least fp32: bf16/fp16 values are summed in fp32."""
    _check_shapes(values, mask)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    keep = mask.bool()
    selected = torch.where(keep, values, 0.0)
    if mask.dtype == torch.bool:
        return selected
    return selected * mask


def _safe_divide(total: Tensor, count: Tensor | int) -> Tensor:
    """total / count, or 0 (attached to the graph) when count == 0; no host sync for tensors."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return torch.where(count > 0, total / count.clamp(min=1e-12), torch.zeros_like(total))
