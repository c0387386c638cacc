"""What every loss shares: the loss-temperature check, the log-softmax at a temperature in at
least fp32, and the gather of the response tokens' values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError


def check_temperature(temperature: float) -> None:
    """Reject a loss temperature that is not a finite number > 0."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise OpdistillError(f"loss temperature must be a finite number > 0, got {temperature!r}")


def log_softmax_at(
    logits: Tensor, temperature: float = 1.0, dtype: torch.dtype | None = None
) -> Tensor:
    """log softmax(logits / τ) over the last dim, computed in `dtype` (default: the logits' dtype
    promoted to at least fp32, so fp16/bf16 are upcast and fp64 stays fp64)."""
    logits = logits.to(dtype or torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def gather_tokens(values: Tensor, ids: Tensor) -> Tensor:
    """values[..., ids] along the last dim: ``[..., V]`` and ``[...]`` ids → ``[...]``.

    Ids outside ``[0, V)`` (padding on masked positions) are clamped for the gather; mask those
    positions out downstream.
    """
    index = ids.long().clamp(0, values.shape[-1] - 1).unsqueeze(-1)
    return values.gather(-1, index).squeeze(-1)
