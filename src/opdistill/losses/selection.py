"""Token selection and weighting (``specs/objectives.md`` §6), composable with any per-token loss.

- ``tip_weights``: TIP keep-mask from student entropy and teacher–student divergence.
- ``position_weights``: PW-OPSD sigmoid weights over the relative position in the response.
- ``weighted_token_mean``: Σ w·v / Σ w, with a global total weight under accumulation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.divergence import token_divergence
from opdistill.losses.logprobs import log_softmax_at

TIP_MODES: tuple[str, ...] = ("weighted", "quadrant", "top")

_SAMPLING_EPS = 1e-12


def tip_weights(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    keep_fraction: float = 0.5,
    mode: str = "weighted",
    entropy_power: float = 1.0,
    divergence_power: float = 1.0,
    entropy_threshold: float = 0.5,
    divergence_threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TIP keep-mask ``[B, T]`` of 0/1 floats, a subset of ``mask``; no gradient.

    Per token: normalised student entropy H_t = −Σ_v Q log Q / ln|V| ∈ [0, 1] and normalised
    divergence D_t = JSD_{β=0.5}(P, Q) / ln 2 ∈ [0, 1]. Score s_t = H_t^a · D_t^b
    (a = ``entropy_power``, b = ``divergence_power``).

    - ``weighted``: keep k = round(keep_fraction · N) of the N valid tokens of the whole batch
      (at least 1 if N > 0), sampled without replacement with probability ∝ s_t + 1e-12
      (``torch.multinomial`` with ``generator``).
    - ``quadrant``: keep tokens with H_t < ``entropy_threshold`` and D_t > ``divergence_threshold``
      ("confident and wrong"); ``keep_fraction`` is unused.
    - ``top``: keep the k valid tokens with the largest s_t (deterministic).

    Average the loss over the kept tokens, e.g. ``token_mean(loss, keep)``.
    """
    _validate_tip(
        student_logits,
        teacher_logits,
        mask,
        keep_fraction,
        mode,
        entropy_power,
        divergence_power,
        entropy_threshold,
        divergence_threshold,
    )
    with torch.no_grad():
        entropy, divergence = token_entropy_divergence(student_logits, teacher_logits)
        valid = mask.bool()
        if mode == "quadrant":
            keep = valid & (entropy < entropy_threshold) & (divergence > divergence_threshold)
            return keep.to(entropy.dtype)

        score = entropy.pow(entropy_power) * divergence.pow(divergence_power)
        flat_valid = valid.reshape(-1)
        num_valid = int(flat_valid.sum().item())
        keep = torch.zeros_like(flat_valid)
        if num_valid > 0:
            k = min(num_valid, max(1, math.floor(keep_fraction * num_valid + 0.5)))
            valid_idx = flat_valid.nonzero().squeeze(-1)
            valid_score = score.reshape(-1)[valid_idx]
            if mode == "weighted":
                probs = torch.nan_to_num(valid_score, nan=0.0).clamp(min=0.0) + _SAMPLING_EPS
                chosen = torch.multinomial(probs, k, replacement=False, generator=generator)
            else:  # top
                chosen = torch.topk(torch.nan_to_num(valid_score, nan=-1.0), k).indices
            keep[valid_idx[chosen]] = True
        return keep.reshape(valid.shape).to(entropy.dtype)


def token_entropy_divergence(
    student_logits: Tensor, teacher_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """(H_t / ln|V|, JSD_{0.5}(P, Q)_t / ln 2), both ``[...]`` clamped to [0, 1], no gradient."""
    vocab = student_logits.shape[-1]
    if vocab < 2:
        raise OpdistillError(f"token entropy needs a vocabulary of at least 2, got {vocab}")
    with torch.no_grad():
        log_q = log_softmax_at(student_logits)
        dtype = log_q.dtype
        q = log_q.exp()
        entropy = -torch.where(q > 0, q * log_q, 0.0).sum(-1) / math.log(vocab)
        divergence = token_divergence(student_logits, teacher_logits, "jsd", beta=0.5)
        divergence = divergence.to(dtype) / math.log(2.0)
        return entropy.clamp(0.0, 1.0), divergence.clamp(0.0, 1.0)


def position_weights(
    mask: Tensor, w_min: float = 0.25, tau: float = 0.30, s: float = 0.10
) -> Tensor:
    """PW-OPSD weights ``[B, T]``: w_t = w_min + (1 − w_min)·σ((f_t − τ)/s), 0 on masked positions.

    f_t = (i − 0.5)/L_seq with i the 1-based position among the row's masked-in tokens (= t + 1
    for right-padded rows) and L_seq the row's own response length. Float (fp32, or the mask's
    dtype if it is fp64).
    """
    if not 0.0 <= w_min <= 1.0:
        raise OpdistillError(f"position weight w_min must be in [0, 1], got {w_min!r}")
    if not (s > 0 and math.isfinite(s)):
        raise OpdistillError(f"position weight slope s must be a finite number > 0, got {s!r}")
    if not math.isfinite(tau):
        raise OpdistillError(f"position weight tau must be finite, got {tau!r}")
    if mask.dim() == 0:
        raise OpdistillError("position weights need a mask of shape [..., T]")
    dtype = mask.dtype if mask.dtype == torch.float64 else torch.float32
    valid = mask.bool()
    ones = valid.to(dtype)
    position = ones.cumsum(-1)
    length = ones.sum(-1, keepdim=True).clamp(min=1.0)
    frac = (position - 0.5) / length
    weights = w_min + (1.0 - w_min) * torch.sigmoid((frac - tau) / s)
    return torch.where(valid, weights, 0.0)


def weighted_token_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Σ w·v / Σ w.

    Σ w == 0 gives 0, still connected to the graph. Positions with w == 0 are excluded with
    ``torch.where`` (NaN/inf there never leaks).
    """
    if values.shape != weights.shape or values.dim() == 0:
        raise OpdistillError(
            f"loss values {tuple(values.shape)} and weights {tuple(weights.shape)} must have the "
            "same shape [..., T]"
        )
    dtype = torch.promote_types(values.dtype, torch.float32)
    w = weights.to(dtype) if weights.is_floating_point() else weights.bool().to(dtype)
    nonzero = w != 0
    total = (torch.where(nonzero, values.to(dtype), 0.0) * torch.where(nonzero, w, 0.0)).sum()
    denom = w.sum()
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    return torch.where(denom != 0, total / safe, torch.zeros_like(total))


def _validate_tip(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    keep_fraction: float,
    mode: str,
    entropy_power: float,
    divergence_power: float,
    entropy_threshold: float,
    divergence_threshold: float,
) -> None:
    if mode not in TIP_MODES:
        raise OpdistillError(f"unknown TIP mode {mode!r}; valid modes: {', '.join(TIP_MODES)}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise OpdistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [B, T, V]"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise OpdistillError(
            f"mask {tuple(mask.shape)} must match the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if mode != "quadrant" and not 0.0 < keep_fraction <= 1.0:
        raise OpdistillError(f"TIP keep_fraction must be in (0, 1], got {keep_fraction!r}")
    for name, value in (("entropy_power", entropy_power), ("divergence_power", divergence_power)):
        if not (value >= 0 and math.isfinite(value)):
            raise OpdistillError(f"TIP {name} must be a finite number >= 0, got {value!r}")
    for name, value in (
        ("entropy_threshold", entropy_threshold),
        ("divergence_threshold", divergence_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise OpdistillError(f"TIP {name} must be in [0, 1], got {value!r}")
