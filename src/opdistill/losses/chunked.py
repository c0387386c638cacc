"""Full-vocabulary token divergences with a lean backward.

`chunked_token_divergence` has the values and student gradients of `token_divergence`, but walks
the positions in chunks and computes, per chunk and without autograd, both the divergence and its
analytic gradient with respect to the student logits. Only that gradient ([N, V], the compute
dtype) is kept for the backward, which scales it in place by the incoming gradient: the loss adds
one [N, V] tensor of memory beyond its inputs, plus the temporaries of one chunk.

Gradients. With Q = softmax(z), z = student_logits / τ, and g_u = ∂D/∂Q_u at fixed P,

    ∂D/∂z = Q ⊙ (g − Σ_u Q_u g_u),      ∂D/∂student_logits = (∂D/∂z) / τ

(constants added to g cancel). Per kind, with M the kind's mixture:

    forward_kl        KL(P‖Q)                 Q ⊙ g = −P, so ∂D/∂z = Q − P
    reverse_kl        KL(Q‖P)                 g = log Q − log P
    jsd               M = βP + (1−β)Q         g = (1−β)(log Q − log M)
    tvd               ½ Σ |P − Q|             g = ½ sign(Q − P)
    skew_forward_kl   KL(P‖M), M = αP+(1−α)Q  g = −(1−α) P / M
    skew_reverse_kl   KL(Q‖M), M = (1−α)P+αQ  g = log(Q / M) − α Q / M

Every Q ⊙ g term is set to 0 where its weight (Q, or P for the skew forward KL) is 0, so
zero-probability entries (logit −inf) get gradient 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from opdistill.errors import OpdistillError
from opdistill.losses.divergence import _divergence, _mixture, _validate, compute_dtype
from opdistill.losses.logprobs import log_softmax_at

# Automatic chunks hold about this many elements (chunk × V), 16 MiB per fp32 temporary.
CHUNK_ELEMENTS = 1 << 22


def chunked_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = 0,
) -> Tensor:
    """`token_divergence` computed in chunks of positions, with a precomputed gradient.

    Same arguments, validation, values and student gradients as `token_divergence`, including
    zero contribution from zero-probability entries and ``+inf`` where the true value is
    ``+inf``. Formulas (P = softmax(teacher_logits/τ), Q = softmax(student_logits/τ)):
    forward_kl KL(P‖Q), reverse_kl KL(Q‖P), jsd β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q,
    tvd ½ Σ|P − Q|, skew_forward_kl KL(P ‖ αP + (1−α)Q), skew_reverse_kl KL(Q ‖ (1−α)P + αQ).

    Args:
        chunk_size: positions per chunk; 0 picks about 2^22 / V positions.

    Gradient flows to ``student_logits`` only; the teacher logits are treated as constants
    (compute them under ``torch.no_grad()``). The backward scales the saved gradient in place,
    so the graph supports one backward pass (a second one, with ``retain_graph=True``, raises
    PyTorch's error about a saved tensor modified in place).

    Returns:
        ``[...]`` tensor, one divergence per position, in the compute dtype (fp32, or fp64 for
        fp64 inputs).
    """
    _validate(student_logits, teacher_logits, kind, beta, alpha, temperature)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise OpdistillError(
            f"chunk_size must be an integer >= 0 (0 = automatic), got {chunk_size!r}"
        )
    vocab = student_logits.shape[-1]
    if chunk_size == 0:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, vocab))
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    values = _ChunkedDivergence.apply(
        student_logits,
        teacher_logits.detach(),
        kind,
        beta,
        alpha,
        temperature,
        chunk_size,
        needs_grad,
    )
    return values.reshape(student_logits.shape[:-1])


class _ChunkedDivergence(torch.autograd.Function):
    """[..., V] student and teacher logits → [N] divergences (N positions, flattened).

    Saves only ∂D/∂student_logits, [N, V].
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student: Tensor,
        teacher: Tensor,
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        chunk_size: int,
        needs_grad: bool,
    ) -> Tensor:
        dtype = compute_dtype(student, teacher)
        vocab = student.shape[-1]
        n = student.numel() // max(1, vocab)
        values = torch.empty(n, dtype=dtype, device=student.device)
        grad = None
        if needs_grad:
            grad = torch.empty(n, vocab, dtype=dtype, device=student.device)
        student_rows, teacher_rows = row_reader(student), row_reader(teacher)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            log_q = log_softmax_at(student_rows(start, end), temperature, dtype)
            log_p = log_softmax_at(teacher_rows(start, end), temperature, dtype)
            log_m = _mixture(log_p, log_q, kind, beta, alpha)  # once, for value and gradient
            values[start:end] = _divergence(log_p, log_q, kind, beta, alpha, log_m)
            if grad is not None:
                chunk_grad = grad[start:end]
                _student_grad(log_p, log_q, log_m, kind, beta, alpha, out=chunk_grad)
                if temperature != 1.0:
                    chunk_grad.div_(temperature)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.student_dtype, ctx.student_shape = student.dtype, student.shape
        return values

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_values: Tensor) -> tuple:
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_values.to(grad.dtype).reshape(-1, 1))
        grad = grad.view(ctx.student_shape).to(ctx.student_dtype)
        return (grad, None, None, None, None, None, None, None)


def row_reader(x: Tensor) -> Callable[[int, int], Tensor]:
    """Rows [start, end) of ``x`` [..., V] with its leading dimensions flattened.

    A view when the leading dimensions flatten without a copy; otherwise (e.g. logits sliced to
    the tokenizer's vocabulary) only the requested rows are copied, never the whole tensor.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    try:
        flat = x.view(-1, x.shape[-1])
    except RuntimeError:
        lead = x.shape[:-1]

        def rows(start: int, end: int) -> Tensor:
            return x[torch.unravel_index(torch.arange(start, end, device=x.device), lead)]

        return rows
    return lambda start, end: flat[start:end]


def _student_grad(
    log_p: Tensor,
    log_q: Tensor,
    log_m: Tensor | None,
    kind: str,
    beta: float,
    alpha: float,
    out: Tensor,
) -> None:
    """Write ∂D/∂z (z = student logits / τ) into ``out``: Q ⊙ (g − Σ Q g), see the module doc.

    ``log_m`` is the mixture of the jsd and skew kinds (`_mixture`), None for the others.
    """
    q = log_q.exp()
    positive = q > 0
    if kind == "skew_forward_kl" and alpha == 0.0:
        kind = "forward_kl"  # the mixture is Q itself
    if kind == "skew_reverse_kl" and alpha == 0.0:
        kind = "reverse_kl"  # the mixture is P itself
    if kind == "forward_kl":
        qg = -log_p.exp()
    elif kind == "reverse_kl":
        qg = torch.where(positive, q * (log_q - log_p), 0.0)
    elif kind == "jsd":
        qg = torch.where(positive, (1.0 - beta) * q * (log_q - log_m), 0.0)
    elif kind == "tvd":
        qg = 0.5 * q * torch.sign(q - log_p.exp())
    elif kind == "skew_forward_kl":
        # Q ⊙ g = −(1−α)·P·Q/M; M ≥ αP > 0 wherever P > 0.
        both = positive & (log_p > float("-inf"))
        qg = -(1.0 - alpha) * torch.where(both, log_p + log_q - log_m, float("-inf")).exp()
    else:  # skew_reverse_kl; M ≥ αQ > 0 wherever Q > 0.
        log_ratio = torch.where(positive, log_q - log_m, 0.0)
        qg = torch.where(positive, q * (log_ratio - alpha * log_ratio.exp()), 0.0)
    torch.addcmul(qg, q, qg.sum(-1, keepdim=True), value=-1.0, out=out)
