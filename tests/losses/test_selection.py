from __future__ import annotations

import math

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses.selection import (
    position_weights,
    tip_weights,
    token_entropy_divergence,
    weighted_token_mean,
)

NEG_INF = float("-inf")
NAN = float("nan")


def _jsd_half(p: list[float], q: list[float]) -> float:
    m = [0.5 * (a + b) for a, b in zip(p, q, strict=True)]
    kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m, strict=True) if a > 0)
    kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m, strict=True) if b > 0)
    return 0.5 * kl_pm + 0.5 * kl_qm


def test_entropy_and_divergence_normalisation_by_hand() -> None:
    student = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform: H = 1
            [0.0, math.log(3.0), NEG_INF, NEG_INF],  # q = (1/4, 3/4, 0, 0)
            [0.0, NEG_INF, NEG_INF, NEG_INF],  # one-hot: H = 0
        ],
        dtype=torch.float64,
    )
    teacher = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # identical: D = 0
            [0.0, 1.0, 2.0, -1.0],
            [NEG_INF, 0.0, NEG_INF, NEG_INF],  # disjoint support: JSD = ln 2, D = 1
        ],
        dtype=torch.float64,
    )
    entropy, divergence = token_entropy_divergence(student, teacher)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(4)
    torch.testing.assert_close(entropy, torch.tensor([1.0, h1, 0.0], dtype=torch.float64))
    p1 = torch.softmax(teacher[1], -1).tolist()
    d1 = _jsd_half(p1, [0.25, 0.75, 0.0, 0.0]) / math.log(2)
    torch.testing.assert_close(divergence, torch.tensor([0.0, d1, 1.0], dtype=torch.float64))


def _scored_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 6, 5, generator=g) * 2
    teacher = torch.randn(3, 6, 5, generator=g) * 2
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool
    )
    return student, teacher, mask


@pytest.mark.parametrize(("fraction", "expected"), [(0.5, 6), (0.25, 3), (1.0, 12), (0.01, 1)])
def test_weighted_keeps_exact_count_of_valid_tokens(fraction: float, expected: int) -> None:
    student, teacher, mask = _scored_batch()
    student.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    keep = tip_weights(student, teacher, mask, keep_fraction=fraction, generator=g)
    assert keep.shape == mask.shape and keep.dtype == torch.float32
    assert not keep.requires_grad
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert int(keep.sum()) == expected
    assert (keep[~mask] == 0).all()


def test_weighted_is_deterministic_given_seeded_generator() -> None:
    student, teacher, mask = _scored_batch(seed=2)
    draws = [
        tip_weights(student, teacher, mask, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    torch.testing.assert_close(draws[0], draws[1])
    other = [
        tip_weights(student, teacher, mask, generator=torch.Generator().manual_seed(s))
        for s in range(8, 14)
    ]
    assert any(not torch.equal(draws[0], o) for o in other)


def test_weighted_prefers_high_weight_tokens() -> None:
    # 4 "informative" tokens (uniform student, disjoint-ish teacher: H = 1, D high) among 16;
    # the rest are confident and agree with the teacher (H ≈ 0, D ≈ 0).
    v = 4
    student = torch.zeros(1, 16, v)
    teacher = torch.zeros(1, 16, v)
    high = torch.tensor([1, 5, 9, 14])
    low = torch.tensor([i for i in range(16) if i not in high.tolist()])
    teacher[0, high, 0] = 8.0
    student[0, low, 2] = 4.0
    teacher[0, low, 2] = 4.0
    mask = torch.ones(1, 16, dtype=torch.bool)
    entropy, divergence = token_entropy_divergence(student, teacher)
    assert (entropy[0, high] == 1).all() and (divergence[0, high] > 0.3).all()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    draws = 100
    for _ in range(draws):
        counts += tip_weights(student, teacher, mask, keep_fraction=0.25, generator=g)[0]
    rate = counts / draws
    assert rate[high].min() > 0.8
    assert rate[low].max() < 0.2
    assert counts.sum() == 4 * draws


def test_quadrant_keeps_confident_and_wrong() -> None:
    v = 4
    student = torch.zeros(1, 5, v)
    teacher = torch.zeros(1, 5, v)
    student[0, 0, 0] = 10.0  # confident on 0, teacher on 1: keep
    teacher[0, 0, 1] = 10.0
    student[0, 1, 0] = 10.0  # confident and agrees: drop (low D)
    teacher[0, 1, 0] = 10.0
    teacher[0, 2, 1] = 10.0  # uncertain student (H = 1), teacher peaked: drop (high H)
    student[0, 3, 0] = 10.0  # like token 0 but masked out: drop
    teacher[0, 3, 1] = 10.0
    student[0, 4, 2] = 10.0  # like token 0: keep
    teacher[0, 4, 3] = 10.0
    mask = torch.tensor([[1, 1, 1, 0, 1]])
    keep = tip_weights(student, teacher, mask, mode="quadrant")
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]]))
    # Thresholds move the boundary: D ≤ 1 always, and H > 0 for the confident tokens.
    keep = tip_weights(student, teacher, mask, mode="quadrant", divergence_threshold=1.0)
    assert keep.sum() == 0
    keep = tip_weights(student, teacher, mask, mode="quadrant", entropy_threshold=1e-6)
    assert keep.sum() == 0


def test_top_keeps_largest_scores() -> None:
    student, teacher, mask = _scored_batch(seed=4)
    keep = tip_weights(student, teacher, mask, keep_fraction=0.5, mode="top", entropy_power=2.0)
    entropy, divergence = token_entropy_divergence(student, teacher)
    score = torch.where(mask, entropy**2 * divergence, NEG_INF).reshape(-1)
    expected = torch.zeros(18)
    expected[score.argsort(descending=True)[:6]] = 1.0
    torch.testing.assert_close(keep.reshape(-1), expected)
    torch.testing.assert_close(
        keep, tip_weights(student, teacher, mask, mode="top", entropy_power=2.0)
    )


def test_no_valid_tokens_and_rounding() -> None:
    student, teacher, mask = _scored_batch()
    none = torch.zeros_like(mask)
    for mode in ("weighted", "top", "quadrant"):
        assert tip_weights(student, teacher, none, mode=mode).sum() == 0
    five = torch.zeros_like(mask)
    five[0, :5] = True
    assert tip_weights(student, teacher, five, mode="top").sum() == 3  # round(2.5) = 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "random"}, "mode"),
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"entropy_power": -1.0}, "entropy_power"),
        ({"divergence_threshold": 2.0}, "divergence_threshold"),
    ],
)
def test_tip_validation(kwargs: dict, match: str) -> None:
    student, teacher, mask = _scored_batch()
    with pytest.raises(OpdistillError, match=match):
        tip_weights(student, teacher, mask, **kwargs)
    with pytest.raises(OpdistillError, match="mask"):
        tip_weights(student, teacher, mask[:, :3])


def test_position_weights_formula() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = position_weights(mask)
    assert got.dtype == torch.float32

    def w(i: int, length: int) -> float:
        f = (i - 0.5) / length
        return 0.25 + 0.75 / (1 + math.exp(-(f - 0.30) / 0.10))

    expected = torch.tensor(
        [
            [w(1, 4), w(2, 4), w(3, 4), w(4, 4), 0.0],
            [w(1, 2), w(2, 2), 0.0, 0.0, 0.0],
            [0.0] * 5,
        ]
    )
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[0, 0], torch.tensor(0.25 + 0.75 / (1 + math.exp(1.75))))
    custom = position_weights(mask.double(), w_min=0.0, tau=0.5, s=1.0)
    assert custom.dtype == torch.float64
    torch.testing.assert_close(custom[1, 0].item(), 1 / (1 + math.exp(0.25)))
    with pytest.raises(OpdistillError, match="w_min"):
        position_weights(mask, w_min=1.5)
    with pytest.raises(OpdistillError, match="slope"):
        position_weights(mask, s=0.0)


def test_weighted_token_mean_by_hand_and_no_leak() -> None:
    values = torch.tensor([[1.0, 2.0, NAN], [4.0, float("inf"), 3.0]], requires_grad=True)
    weights = torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 0.5]])
    got = weighted_token_mean(values, weights)
    torch.testing.assert_close(got, torch.tensor((0.5 + 4.0 + 4.0 + 1.5) / 4.0))
    got.backward()
    torch.testing.assert_close(values.grad, weights / 4.0)
    bool_weights = weights > 0
    torch.testing.assert_close(
        weighted_token_mean(values, bool_weights), torch.tensor((1.0 + 2.0 + 4.0 + 3.0) / 4)
    )


def test_weighted_token_mean_zero_total() -> None:
    values = torch.tensor([[1.0, NAN]], requires_grad=True)
    got = weighted_token_mean(values, torch.zeros(1, 2))
    assert got.item() == 0.0
    got.backward()
    assert (values.grad == 0).all()
    assert weighted_token_mean(values, torch.ones(1, 2) * 0).item() == 0.0


def test_weighted_token_mean_micro_batches_sum_to_full() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    weights = torch.rand(4, 6, generator=g, dtype=torch.float64) * (
        torch.rand(4, 6, generator=g) > 0.3
    )
    full = weighted_token_mean(values, weights)
    total = weights.sum()
    parts = sum(
        weighted_token_mean(values[rows], weights[rows]) * weights[rows].sum() / total
        for rows in (slice(0, 2), slice(2, 4))
    )
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(full, (values * weights).sum() / weights.sum())
    with pytest.raises(OpdistillError, match="same shape"):
        weighted_token_mean(values, weights[:2])
