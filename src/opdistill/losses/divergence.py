"""Token-level divergences between teacher P and student Q (one number per position).

Notation follows ``specs/objectives.md`` section 1: P = teacher, Q = student, both are
softmax distributions over the same vocabulary (last dimension of the logits).

All work is done in log space after ``log_softmax`` in at least fp32 (fp16/bf16 inputs are upcast,
fp64 stays fp64). Vocabulary entries with probability 0 (logit -inf, e.g. banned tokens or padded
vocabulary columns) contribute exactly 0 to the value and the gradient of every kind.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.logprobs import check_temperature, log_softmax_at

DIVERGENCE_KINDS: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Divergence between teacher P and student Q at every position.

    Args:
        student_logits: ``[..., V]`` student logits (Q = softmax(student_logits / temperature)).
        teacher_logits: ``[..., V]`` teacher logits (P = softmax(teacher_logits / temperature)).
            The caller computes them under ``torch.no_grad()`` (or detaches them); they are not
            detached here, so gradient flows to the student only when the teacher has no graph.
        kind: one of ``DIVERGENCE_KINDS``:

            - ``forward_kl``:      KL(P‖Q) = Σ_v P (log P − log Q)
            - ``reverse_kl``:      KL(Q‖P) = Σ_v Q (log Q − log P)
            - ``jsd``:             β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q, β ∈ (0, 1)
            - ``tvd``:             ½ Σ_v |P − Q|
            - ``skew_forward_kl``: KL(P ‖ αP + (1−α)Q), α ∈ [0, 1)
            - ``skew_reverse_kl``: KL(Q ‖ (1−α)P + αQ), α ∈ [0, 1)
        beta: JSD mixing weight of the teacher.
        alpha: skew weight for the two skew kinds.
        temperature: loss temperature τ > 0; both logits are divided by τ before log_softmax.

    Returns:
        ``[...]`` tensor, one divergence per position, in the compute dtype (fp32, or fp64 for
        fp64 inputs).

    Terms whose weighting probability is 0 contribute exactly 0 (value and gradient). A term
    whose weighting probability is > 0 while the other side is 0 (e.g. P(v) > 0, Q(v) = 0 for
    ``forward_kl``) makes the value ``+inf``, which is the true value; its gradient is then not
    meaningful. Probabilities that underflow to 0 in the compute dtype count as 0.
    """
    _validate(student_logits, teacher_logits, kind, beta, alpha, temperature)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = log_softmax_at(student_logits, temperature, dtype)
    log_p = log_softmax_at(teacher_logits, temperature, dtype)
    return _divergence(log_p, log_q, kind, beta, alpha)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the divergences are computed in: the inputs' promoted dtype, at least fp32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _mixture(log_p: Tensor, log_q: Tensor, kind: str, beta: float, alpha: float) -> Tensor | None:
    """log M of the kinds that compare with a mixture (jsd, the skew KLs); None for the others."""
    if kind == "jsd":
        return _log_mix(log_p, log_q, beta)
    if kind == "skew_forward_kl":
        return _log_mix(log_p, log_q, alpha)
    if kind == "skew_reverse_kl":
        return _log_mix(log_p, log_q, 1.0 - alpha)
    return None


def _divergence(
    log_p: Tensor,
    log_q: Tensor,
    kind: str,
    beta: float,
    alpha: float,
    log_m: Tensor | None = None,
) -> Tensor:
    """The divergence of `kind` per position; `log_m` is `_mixture`'s result when already known."""
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if log_m is None:
        log_m = _mixture(log_p, log_q, kind, beta, alpha)
    if kind == "jsd":
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "skew_forward_kl":
        return _kl(log_p, log_m)
    # skew_reverse_kl
    return _kl(log_q, log_m)


def _validate(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
) -> None:
    _validate_kind(kind)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() == 0:
        raise OpdistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., V] (same vocabulary)"
        )
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise OpdistillError("student and teacher logits must be floating-point tensors")
    check_temperature(temperature)
    _validate_params(kind, beta, alpha)


def _validate_kind(kind: str) -> None:
    if kind not in DIVERGENCE_KINDS:
        raise OpdistillError(
            f"unknown divergence kind {kind!r}; valid kinds: {', '.join(DIVERGENCE_KINDS)}"
        )


def _validate_params(kind: str, beta: float, alpha: float) -> None:
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise OpdistillError(
            f"jsd needs beta strictly inside (0, 1), got {beta!r}: at beta = 0 or 1 the value is "
            "identically 0; use forward_kl (the small-beta behaviour) or reverse_kl instead"
        )
    if kind in ("skew_forward_kl", "skew_reverse_kl") and not 0.0 <= alpha < 1.0:
        raise OpdistillError(
            f"{kind} needs alpha in [0, 1), got {alpha!r}: at alpha = 1 the value is "
            "identically 0 (alpha = 0 gives the plain KL)"
        )


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_v a (log a − log b) over the last dim, with entries where a == 0 contributing exactly 0.

    The log difference is replaced by 0 where a == 0 *before* multiplying, so neither the value
    (0·(−inf)) nor the backward of the product (grad·(−inf)) can produce NaN.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w·P + (1−w)·Q) for w ∈ [0, 1].

    Entries where both P and Q are 0 get the placeholder 0 instead of −inf: ``logaddexp``'s
    backward is NaN at (−inf, −inf), and every caller weights those entries by P or Q (= 0).
    """
    if w == 0.0:
        return log_q
    if w == 1.0:
        return log_p
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    a = torch.where(both_zero, 0.0, log_p + math.log(w))
    b = torch.where(both_zero, 0.0, log_q + math.log1p(-w))
    return torch.logaddexp(a, b)
