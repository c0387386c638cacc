from __future__ import annotations

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses import (
    masked_token_sum,
    reduce_loss,
    sequence_mean,
    token_divergence,
    token_mean,
)

NAN = float("nan")
INF = float("inf")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [
            [0, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    return values, mask


def test_masked_token_sum_and_token_mean() -> None:
    values, mask = _batch()
    expected_sum = sum(values[i, j].item() for i in range(4) for j in range(6) if mask[i, j].item())
    torch.testing.assert_close(masked_token_sum(values, mask).item(), expected_sum)
    torch.testing.assert_close(token_mean(values, mask).item(), expected_sum / 10)
    torch.testing.assert_close(token_mean(values, mask.double()).item(), expected_sum / 10)
    torch.testing.assert_close(token_mean(values, mask, num_tokens=20).item(), expected_sum / 20)
    torch.testing.assert_close(
        token_mean(values, mask, num_tokens=torch.tensor(20)).item(), expected_sum / 20
    )


def test_float_mask_acts_as_weights() -> None:
    values = torch.tensor([[1.0, 2.0, NAN]])
    weights = torch.tensor([[0.5, 2.0, 0.0]])
    torch.testing.assert_close(masked_token_sum(values, weights), torch.tensor(4.5))
    torch.testing.assert_close(token_mean(values, weights), torch.tensor(4.5 / 2.5))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_micro_batches_with_global_count_sum_to_full_batch(reduction: str) -> None:
    values, mask = _batch()
    values.requires_grad_(True)
    n_tokens = mask.sum()
    full = reduce_loss(values, mask, reduction)
    (full_grad,) = torch.autograd.grad(full, values)

    micro = [
        reduce_loss(
            values[sl], mask[sl], reduction, num_tokens=n_tokens, num_sequences=values.shape[0]
        )
        for sl in (slice(0, 1), slice(1, 4))
    ]
    total = micro[0] + micro[1]
    (micro_grad,) = torch.autograd.grad(total, values)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(micro_grad, full_grad)
    # Without the global count the micro-batch means do not add up.
    local = sum(reduce_loss(values[sl], mask[sl], reduction) for sl in (slice(0, 1), slice(1, 4)))
    assert not torch.allclose(local, full)


def test_sequence_mean_by_hand() -> None:
    values, mask = _batch()
    per_seq = []
    for i in range(4):
        toks = [values[i, j].item() for j in range(6) if mask[i, j].item()]
        per_seq.append(sum(toks) / len(toks))
    torch.testing.assert_close(sequence_mean(values, mask).item(), sum(per_seq) / 4)
    torch.testing.assert_close(
        sequence_mean(values, mask, num_sequences=8).item(), sum(per_seq) / 8
    )
    torch.testing.assert_close(reduce_loss(values, mask, "sequence"), sequence_mean(values, mask))
    torch.testing.assert_close(reduce_loss(values, mask, "token"), token_mean(values, mask))


def test_sequence_with_no_tokens_contributes_zero_but_counts() -> None:
    values = torch.tensor([[1.0, 3.0], [NAN, INF]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    out = sequence_mean(values, mask)
    torch.testing.assert_close(out, torch.tensor(1.0))  # (2 + 0) / 2
    out.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.25, 0.25], [0.0, 0.0]]))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_nan_and_inf_at_masked_positions_do_not_leak(
    reduction: str, mask_dtype: torch.dtype
) -> None:
    values = torch.tensor([[1.0, NAN, 2.0], [INF, 4.0, -INF]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]]).to(mask_dtype)
    out = reduce_loss(values, mask, reduction)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(values.grad).all()
    assert (values.grad[mask == 0] == 0).all()
    expected = 7.0 / 3 if reduction == "token" else (1.5 + 4.0) / 2
    torch.testing.assert_close(out.item(), expected)


def test_forward_kl_inf_at_padding_does_not_leak_into_student_grad() -> None:
    # Padding position: teacher puts mass on a token the student bans, so forward KL is +inf there.
    student = torch.tensor([[[0.0, 1.0, 2.0], [-INF, 0.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[1.0, 0.0, 0.5], [3.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    values = token_divergence(student, teacher, "forward_kl")
    assert torch.isinf(values[0, 1])
    for reduction in ("token", "sequence"):
        out = reduce_loss(values, mask, reduction)
        assert torch.isfinite(out)
        (grad,) = torch.autograd.grad(out, student, retain_graph=True)
        assert torch.isfinite(grad).all()
        assert (grad[0, 1] == 0).all()


@pytest.mark.parametrize("num_tokens", [0, torch.tensor(0)])
def test_zero_tokens_gives_zero_with_graph(num_tokens: int | torch.Tensor) -> None:
    values = torch.tensor([[1.0, NAN]], requires_grad=True)
    mask = torch.tensor([[False, False]])
    for out in (
        token_mean(values, mask),
        token_mean(values, mask, num_tokens=num_tokens),
        sequence_mean(values, mask),
        sequence_mean(values, mask, num_sequences=num_tokens),
    ):
        assert out.item() == 0.0
        assert out.requires_grad
        (grad,) = torch.autograd.grad(out, values)
        assert (grad == 0).all()


def test_unknown_reduction() -> None:
    values, mask = _batch()
    with pytest.raises(OpdistillError, match=r"token.*sequence"):
        reduce_loss(values, mask, "mean")


def test_shape_mismatch() -> None:
    with pytest.raises(OpdistillError, match="same shape"):
        token_mean(torch.zeros(2, 3), torch.ones(2, 1, dtype=torch.bool))
