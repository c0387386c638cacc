from __future__ import annotations

import math

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses.divergence import token_divergence
from opdistill.losses.minillm import minillm_loss, mixture_weights


def _logits(*shape: int, seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, v = 3, 5, 4
    student = _logits(b, t, v, seed=seed)
    teacher = _logits(b, t, v, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ids = torch.where(mask, ids, -100)  # padding ids out of range
    return student, teacher, ids, mask


def _future(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    length_norm: bool,
) -> list[list[float]]:
    """R_{t+1} (or its length-normalised form) with explicit loops over plain floats."""
    b_size, t_size, _ = student.shape
    out = [[0.0] * t_size for _ in range(b_size)]
    for b in range(b_size):
        length = int(mask[b].sum())
        r = []
        for t in range(length):
            y = int(ids[b, t])
            r.append(
                math.log(torch.softmax(teacher[b, t], -1)[y].item())
                - math.log(torch.softmax(student[b, t], -1)[y].item())
            )
        for t in range(length):
            future = sum(r[t + 1 :])
            if length_norm:
                future = future / (length - t - 1) if length - t - 1 > 0 else 0.0
            out[b][t] = future
    return out


def _reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    length_norm: bool = True,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL_t − w_t·R_{t+1}·log q(y_t) per position, built with loops and plain autograd ops."""
    future = _future(student, teacher, ids, mask, length_norm)
    rows = []
    for b in range(student.shape[0]):
        row = []
        for t in range(student.shape[1]):
            if not mask[b, t]:
                row.append(torch.zeros((), dtype=torch.float64))
                continue
            q = torch.softmax(student[b, t], -1)
            p = torch.softmax(teacher[b, t], -1)
            kl = sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(q.shape[0]))
            w = 1.0 if weights is None else float(weights[b, t])
            row.append(kl - w * future[b][t] * torch.log(q[int(ids[b, t])]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("length_norm", [True, False])
@pytest.mark.parametrize("with_weights", [False, True])
def test_matches_brute_force_value_and_gradient(length_norm: bool, with_weights: bool) -> None:
    student, teacher, ids, mask = _batch()
    weights = None
    if with_weights:
        weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    s1 = student.clone().requires_grad_(True)
    got = minillm_loss(s1, teacher, ids, mask, length_norm=length_norm, importance_weights=weights)
    s2 = student.clone().requires_grad_(True)
    ref = _reference(s2, teacher, ids, mask, length_norm, weights)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_gradient_is_kl_gradient_minus_future_score() -> None:
    # ∇Σ loss = ∇Σ KL_t − Σ_t R_{t+1}·∇log q(y_t), with ∇_z log q(y) = onehot(y) − q.
    student, teacher, ids, mask = _batch(seed=3)
    s = student.clone().requires_grad_(True)
    minillm_loss(s, teacher, ids, mask, length_norm=False).sum().backward()

    k = student.clone().requires_grad_(True)
    kl = token_divergence(k, teacher, "reverse_kl")
    torch.where(mask, kl, 0.0).sum().backward()
    future = torch.tensor(_future(student, teacher, ids, mask, False), dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(ids.clamp(min=0), 4).double()
    score = onehot - torch.softmax(student, -1)
    expected = k.grad - (future * mask).unsqueeze(-1) * score
    torch.testing.assert_close(s.grad, expected)


def test_length_norm_by_hand() -> None:
    student, teacher, ids, mask = _batch(seed=5)
    log_q = torch.log_softmax(student, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    log_p = torch.log_softmax(teacher, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    r = (log_p - log_q)[0]  # first row, L = 5
    kl = token_divergence(student, teacher, "reverse_kl")
    got = minillm_loss(student, teacher, ids, mask, length_norm=True)
    pg = got[0] - kl[0]  # = −R^norm_{t+1}·log q(y_t)
    expected_future = [
        (r[1] + r[2] + r[3] + r[4]) / 4,
        (r[2] + r[3] + r[4]) / 3,
        (r[3] + r[4]) / 2,
        r[4] / 1,
        torch.zeros((), dtype=torch.float64),
    ]
    for t in range(5):
        torch.testing.assert_close(pg[t], -expected_future[t] * log_q[0, t])
    # Row 1 has L = 3: t = 1 uses r_2 / 1, t = 2 (last token) is the pure KL.
    r1 = (log_p - log_q)[1]
    torch.testing.assert_close(got[1, 1] - kl[1, 1], -r1[2] * log_q[1, 1])
    torch.testing.assert_close(got[1, 2], kl[1, 2])


def test_last_token_future_term_is_zero() -> None:
    student, teacher, ids, mask = _batch(seed=7)
    kl = token_divergence(student, teacher, "reverse_kl")
    for length_norm in (True, False):
        got = minillm_loss(student, teacher, ids, mask, length_norm=length_norm)
        last = mask.sum(-1) - 1
        rows = torch.arange(3)
        torch.testing.assert_close(got[rows, last], kl[rows, last])


def test_masked_positions_contribute_nothing() -> None:
    student, teacher, ids, mask = _batch(seed=11)
    # Padded positions hold arbitrary finite logits and out-of-range ids.
    garbage_s = student.clone()
    garbage_t = teacher.clone()
    garbage_s[~mask] = 1e4 * torch.randn_like(garbage_s[~mask])
    garbage_t[~mask] = 1e4 * torch.randn_like(garbage_t[~mask])
    a = student.clone().requires_grad_(True)
    b = garbage_s.clone().requires_grad_(True)
    out_a = minillm_loss(a, teacher, ids, mask)
    out_b = minillm_loss(b, garbage_t, ids, mask)
    torch.testing.assert_close(out_a, out_b)
    assert (out_b[~mask] == 0).all()
    out_a.sum().backward()
    out_b.sum().backward()
    assert torch.isfinite(b.grad).all()
    torch.testing.assert_close(a.grad, b.grad)
    assert (b.grad[~mask] == 0).all()


def test_fp32_output_and_temperature() -> None:
    student, teacher, ids, mask = _batch(seed=13)
    out = minillm_loss(student.float(), teacher.float(), ids, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), minillm_loss(student, teacher, ids, mask), atol=1e-5, rtol=1e-5
    )
    tau = 2.0
    torch.testing.assert_close(
        minillm_loss(student, teacher, ids, mask, temperature=tau),
        minillm_loss(student / tau, teacher / tau, ids, mask),
    )


def _current_logprobs(student: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(student, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]


def test_clip_at_ratio_one_matches_unclipped_gradient() -> None:
    student, teacher, ids, mask = _batch(seed=17)
    old = _current_logprobs(student, ids).detach()
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    unclipped = minillm_loss(a, teacher, ids, mask)
    clipped = minillm_loss(b, teacher, ids, mask, old_logprobs=old, clip=0.2)
    # Value: ρ = 1, so the surrogate is −A instead of −A·log q.
    kl = torch.where(mask, token_divergence(student, teacher, "reverse_kl"), 0.0)
    advantage = torch.tensor(_future(student, teacher, ids, mask, True), dtype=torch.float64)
    torch.testing.assert_close(clipped, torch.where(mask, kl - advantage, 0.0))
    torch.testing.assert_close(unclipped, torch.where(mask, kl - advantage * old, 0.0))
    unclipped.sum().backward()
    clipped.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_clip_zeroes_gradient_beyond_upper_bound_for_positive_advantage() -> None:
    student, teacher, ids, mask = _batch(seed=26)
    old = _current_logprobs(student, ids).detach() - 1.0  # ρ = e > 1 + ε
    s = student.clone().requires_grad_(True)
    minillm_loss(s, teacher, ids, mask, old_logprobs=old, clip=0.2).sum().backward()
    k = student.clone().requires_grad_(True)
    torch.where(mask, token_divergence(k, teacher, "reverse_kl"), 0.0).sum().backward()
    advantage = torch.tensor(_future(student, teacher, ids, mask, True), dtype=torch.float64)
    positive = mask & (advantage > 0)
    negative = mask & (advantage < 0)
    assert positive.any() and negative.any()
    # A > 0, ρ > 1+ε: only the KL term has gradient.
    torch.testing.assert_close(s.grad[positive], k.grad[positive])
    # A < 0, ρ > 1+ε: unclipped branch −ρA is active, gradient −A·ρ·∇log q.
    onehot = torch.nn.functional.one_hot(ids.clamp(min=0), 4).double()
    score = onehot - torch.softmax(student, -1)
    expected = k.grad - (advantage * math.e).unsqueeze(-1) * score
    torch.testing.assert_close(s.grad[negative], expected[negative])


def test_clip_validation() -> None:
    student, teacher, ids, mask = _batch()
    with pytest.raises(OpdistillError, match="old_logprobs"):
        minillm_loss(student, teacher, ids, mask, clip=0.2)
    with pytest.raises(OpdistillError, match="clip"):
        minillm_loss(student, teacher, ids, mask, clip=-0.1)
    with pytest.raises(OpdistillError, match="temperature"):
        minillm_loss(student, teacher, ids, mask, temperature=0.0)
    with pytest.raises(OpdistillError, match="response ids"):
        minillm_loss(student, teacher, ids[:, :3], mask)
    with pytest.raises(OpdistillError, match="importance_weights"):
        minillm_loss(student, teacher, ids, mask, importance_weights=torch.ones(3))


def test_mixture_weights() -> None:
    log_q = torch.log(torch.tensor([[0.2, 0.5]], dtype=torch.float64))
    log_p = torch.log(torch.tensor([[0.6, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(mixture_weights(log_q, log_p, 0.0), torch.ones(1, 2).double())
    expected = torch.tensor([[0.2 / (0.2 * 0.6 + 0.8 * 0.2), 0.5 / (0.2 * 0.1 + 0.8 * 0.5)]])
    torch.testing.assert_close(mixture_weights(log_q, log_p, 0.2), expected.double())
    # Teacher probability 0 and detached output.
    q = log_q.clone().requires_grad_(True)
    w = mixture_weights(q, torch.full_like(log_q, float("-inf")), 0.5)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.full((1, 2), 2.0, dtype=torch.float64))
    assert mixture_weights(log_q.float(), log_p.half(), 0.2).dtype == torch.float32


@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5])
def test_mixture_weights_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(OpdistillError, match="alpha"):
        mixture_weights(torch.zeros(2), torch.zeros(2), alpha)
