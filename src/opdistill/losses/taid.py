"""TAID: temporally adaptive interpolated distillation (``specs/objectives.md`` section 7).

The target interpolates student and teacher in logit space,
p_t = softmax((1−t)·sg(z_S) + t·z_T), and the student minimises KL(p_t‖Q). The interpolation
weight t rises from t_start toward 1 by ``TaidSchedule``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.divergence import _kl
from opdistill.losses.logprobs import check_temperature, log_softmax_at


def taid_loss(
    student_logits: Tensor, teacher_logits: Tensor, t: float, temperature: float = 1.0
) -> Tensor:
    """KL(p_t ‖ Q) at every position: ``[..., V]`` logits → ``[...]``.

        p_t = softmax((1−t)·sg(z_S/τ) + t·z_T/τ),   loss = Σ_v p_t (log p_t − log Q)

    The student enters the target only through ``sg``, so the gradient flows through log Q alone.
    The interpolation uses the log-softmaxed logits (same softmax, since per-row shifts cancel).
    t = 1 gives forward KL(P‖Q); t = 0 gives 0. Computed in fp32 (fp64 stays fp64); entries with
    p_t = 0 (−inf logits) contribute exactly 0 to value and gradient. The teacher is not detached
    here (compute it under ``torch.no_grad()``).
    """
    if not 0.0 <= t <= 1.0:
        raise OpdistillError(f"TAID interpolation t must be in [0, 1], got {t!r}")
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() == 0:
        raise OpdistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., V] (same vocabulary)"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    log_q = log_softmax_at(student_logits, temperature, dtype)
    log_p = log_softmax_at(teacher_logits, temperature, dtype)
    # Branches at the end points avoid 0·(−inf) = NaN when one side has −inf logits.
    if t == 1.0:
        log_target = log_p
    elif t == 0.0:
        log_target = log_q.detach()
    else:
        log_target = torch.log_softmax((1.0 - t) * log_q.detach() + t * log_p, dim=-1)
    return _kl(log_target, log_q)


class TaidSchedule:
    """Adaptive interpolation weight t for ``taid_loss``.

    Each ``update(step, loss)``:

        t_target = t_start + (1 − t_start)·step/total_steps     (step clamped to [0, total])
        m ← β·m + (1−β)·(ℓ_prev − ℓ)/ℓ_prev
        t ← min(1, max(t_target, t + α·σ(m)·(1 − t)))

    t never decreases and equals 1 from ``step == total_steps`` on. The momentum update is
    skipped on the first call (no ℓ_prev), when ℓ_prev == 0, and for a non-finite loss (which is
    then not stored as ℓ_prev either).
    """

    def __init__(
        self, total_steps: int, t_start: float = 0.4, alpha: float = 5e-4, beta: float = 0.99
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise OpdistillError(f"TAID total_steps must be an integer >= 1, got {total_steps!r}")
        if not 0.0 <= t_start <= 1.0:
            raise OpdistillError(f"TAID t_start must be in [0, 1], got {t_start!r}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise OpdistillError(f"TAID alpha must be a finite number >= 0, got {alpha!r}")
        if not 0.0 <= beta <= 1.0:
            raise OpdistillError(f"TAID beta must be in [0, 1], got {beta!r}")
        self.total_steps = total_steps
        self.t_start = float(t_start)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self._t = float(t_start)
        self._momentum = 0.0
        self._prev_loss: float | None = None

    @property
    def t(self) -> float:
        """Current interpolation weight."""
        return self._t

    def update(self, step: int, loss: float) -> float:
        """Advance t after optimizer step ``step`` with training loss ``loss``; return the new t."""
        loss = float(loss)
        if math.isfinite(loss):
            prev = self._prev_loss
            if prev is not None and prev != 0.0:
                self._momentum = self.beta * self._momentum + (1.0 - self.beta) * (
                    (prev - loss) / prev
                )
            self._prev_loss = loss
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        t_target = self.t_start + (1.0 - self.t_start) * progress
        adaptive = self._t + self.alpha * _sigmoid(self._momentum) * (1.0 - self._t)
        self._t = min(1.0, max(t_target, adaptive))
        return self._t

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: ``t``, ``momentum`` (floats) and ``prev_loss`` (float or None)."""
        return {"t": self._t, "momentum": self._momentum, "prev_loss": self._prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by ``state_dict`` (resumes exactly)."""
        missing = {"t", "momentum", "prev_loss"} - set(state)
        if missing:
            raise OpdistillError(f"TAID schedule state is missing {', '.join(sorted(missing))}")
        self._t = float(state["t"])
        self._momentum = float(state["momentum"])
        prev = state["prev_loss"]
        self._prev_loss = None if prev is None else float(prev)


def _sigmoid(x: float) -> float:
    """σ(x) = 1/(1 + e^{−x}) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
