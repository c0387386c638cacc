from __future__ import annotations

import math

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses.policy_gradient import (
    group_advantages,
    policy_gradient_loss,
    reward_mixed_loss,
)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    got = group_advantages(rewards, group_size=4)
    std = math.sqrt(0.1875)  # population std of (1, 0, 1, 1)
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]) / (std + 1e-6)
    expected[4:] = 0.0  # zero-variance group
    torch.testing.assert_close(got, expected)
    centred = group_advantages(rewards, group_size=4, normalize_std=False)
    torch.testing.assert_close(centred, torch.tensor([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]))
    # Two groups of 2.
    torch.testing.assert_close(
        group_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), 2, eps=0.0),
        torch.tensor([1.0, -1.0, 0.0, 0.0]),
    )


def test_group_advantages_constant_group_is_exactly_zero() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    assert (group_advantages(rewards, 3, eps=0.0) == 0).all()
    assert (group_advantages(rewards, 3, normalize_std=False) == 0).all()


def test_group_advantages_group_size_one_uses_batch_mean() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(group_advantages(rewards, 1), rewards - 0.6)


def test_group_advantages_dtypes_and_detached() -> None:
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([True, False]), 2).dtype == torch.float32
    r = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = group_advantages(r, 2)
    assert out.dtype == torch.float64 and not out.requires_grad


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(6), 4, "multiple"),
        (torch.zeros(6), 0, "group_size"),
        (torch.zeros(2, 3), 3, "1-D"),
    ],
)
def test_group_advantages_validation(rewards: torch.Tensor, group_size: int, match: str) -> None:
    with pytest.raises(OpdistillError, match=match):
        group_advantages(rewards, group_size)


def test_policy_gradient_gradient_is_minus_advantage_score() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    logq = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    loss = policy_gradient_loss(logq, advantages, mask)
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss, torch.where(mask, -advantages[:, None] * logq, 0.0))
    loss.sum().backward()
    # ∇_z log softmax(z)[y] = onehot(y) − softmax(z).
    score = torch.nn.functional.one_hot(ids, 5).double() - torch.softmax(logits.detach(), -1)
    expected = -(advantages[:, None] * mask)[..., None] * score
    torch.testing.assert_close(logits.grad, expected)


def test_policy_gradient_per_token_advantages_and_masking() -> None:
    logq = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = policy_gradient_loss(logq, adv, mask)
    torch.testing.assert_close(loss, torch.tensor([[1.0, 4.0, 0.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logq.grad, torch.tensor([[-1.0, -2.0, 0.0]]))
    assert adv.grad is None  # advantages are detached
    with pytest.raises(OpdistillError, match="advantages"):
        policy_gradient_loss(logq, torch.ones(2), mask)


def test_reward_mixed_loss_endpoints_and_mix() -> None:
    distill = torch.tensor([[1.0, 2.0]])
    pg = torch.tensor([[-3.0, float("inf")]])
    torch.testing.assert_close(reward_mixed_loss(distill, pg, 1.0), distill)
    pg_finite = torch.tensor([[-3.0, 5.0]])
    torch.testing.assert_close(reward_mixed_loss(distill, pg_finite, 0.0), pg_finite)
    torch.testing.assert_close(
        reward_mixed_loss(distill, pg_finite, 0.25),
        torch.tensor([[0.25 * 1.0 + 0.75 * -3.0, 0.25 * 2.0 + 0.75 * 5.0]]),
    )
    with pytest.raises(OpdistillError, match="distill_weight"):
        reward_mixed_loss(distill, pg_finite, 1.5)
    with pytest.raises(OpdistillError, match="same shape"):
        reward_mixed_loss(distill, pg_finite[:, :1], 0.5)
