"""Losses through the output projection in chunks equal the losses of the full logits."""

import pytest
import torch

from opdistill.losses import DIVERGENCE_KINDS, token_divergence, topk_divergence
from opdistill.losses.projected import ProjectedLogits, projected_token_loss

N, H, V, PADDED = 7, 5, 11, 13  # the projection has 2 padding rows past the vocabulary


def _inputs(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, N, H, generator=g, requires_grad=True)
    weight = torch.randn(PADDED, H, generator=g, requires_grad=True)
    b = torch.randn(PADDED, generator=g, requires_grad=True) if bias else None
    return hidden, weight, b


def _grads(values, tensors):
    weights = torch.linspace(0.5, 1.5, values.numel()).reshape(values.shape)
    return torch.autograd.grad((values * weights).sum(), [t for t in tensors if t is not None])


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_full_teacher_values_and_gradients(kind, bias):
    hidden, weight, b = _inputs(0, bias)
    teacher = torch.randn(2, N, V, generator=torch.Generator().manual_seed(1))
    student = ProjectedLogits(hidden, weight, b, V)

    def loss(logits, teacher_chunk):
        return token_divergence(logits, teacher_chunk, kind, beta=0.3, alpha=0.2, temperature=1.5)

    values = projected_token_loss(student, teacher, loss, chunk_size=3)
    reference = token_divergence(
        student.materialize(), teacher, kind, beta=0.3, alpha=0.2, temperature=1.5
    )
    torch.testing.assert_close(values, reference, rtol=1e-6, atol=1e-7)
    for got, want in zip(
        _grads(values, (hidden, weight, b)), _grads(reference, (hidden, weight, b)), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padding_rows_of_the_projection_get_no_gradient():
    hidden, weight, _ = _inputs(2, False)
    teacher = torch.randn(2, N, V)
    values = projected_token_loss(
        ProjectedLogits(hidden, weight, None, V),
        teacher,
        lambda z, t: token_divergence(z, t, "reverse_kl"),
        chunk_size=2,
    )
    (grad_weight,) = torch.autograd.grad(values.sum(), [weight])
    assert torch.equal(grad_weight[V:], torch.zeros(PADDED - V, H))
    assert grad_weight[:V].abs().sum() > 0


def test_projected_teacher_and_top_k_teacher():
    hidden, weight, b = _inputs(3, True)
    t_hidden, t_weight, _ = _inputs(4, False)
    student = ProjectedLogits(hidden, weight, b, V)
    teacher = ProjectedLogits(t_hidden.detach(), t_weight.detach(), None, V)
    loss = lambda z, t: token_divergence(z, t, "jsd", beta=0.9)  # noqa: E731
    values = projected_token_loss(student, teacher, loss, chunk_size=4)
    reference = token_divergence(student.materialize(), teacher.materialize(), "jsd", beta=0.9)
    torch.testing.assert_close(values, reference, rtol=1e-6, atol=1e-7)
    for got, want in zip(
        _grads(values, (hidden, weight, b)), _grads(reference, (hidden, weight, b)), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    top = torch.log_softmax(teacher.materialize(), dim=-1).topk(4, dim=-1)
    sparse = lambda z, t: topk_divergence(z, t[0], t[1], "forward_kl")  # noqa: E731
    values = projected_token_loss(student, (top.indices, top.values), sparse, chunk_size=5)
    reference = topk_divergence(student.materialize(), top.indices, top.values, "forward_kl")
    torch.testing.assert_close(values, reference, rtol=1e-6, atol=1e-7)
    for got, want in zip(
        _grads(values, (hidden, weight, b)), _grads(reference, (hidden, weight, b)), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_vocabulary_sized_tensor_is_saved_for_backward():
    """Saved for backward: the hidden states and the projection, nothing of size N × V."""
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    teacher = ProjectedLogits(torch.randn(64, 8), torch.randn(1000, 8), None, 1000)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values = projected_token_loss(
            ProjectedLogits(hidden, weight, None, 1000),
            teacher,
            lambda z, t: token_divergence(z, t, "reverse_kl"),
            chunk_size=16,
        )
    values.sum().backward()
    assert max(saved) <= 1000 * 8  # the projection itself, never 64 × 1000
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("teacher_kind", ["full", "projected", "top_k"])
def test_loss_rows_change_neither_values_nor_gradients(teacher_kind):
    """At a vocabulary where each row's reductions run along it, the loss function seeing a few
    rows of a chunk at a time gives the very same values and gradients (bit for bit) as it seeing
    the whole chunk. (At a tiny vocabulary the reductions may group rows: float rounding.)"""
    g = torch.Generator().manual_seed(5)
    n, h, vocab = 9, 6, 4096
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(vocab + 3, h, generator=g, requires_grad=True)
    b = torch.randn(vocab + 3, generator=g, requires_grad=True)
    projected = ProjectedLogits(torch.randn(n, h, generator=g), torch.randn(vocab, h), None, vocab)
    teacher, loss = {
        "full": (
            projected.materialize(),
            lambda z, t: token_divergence(z, t, "jsd", beta=0.3, temperature=1.5),
        ),
        "projected": (projected, lambda z, t: token_divergence(z, t, "skew_reverse_kl")),
        "top_k": (
            tuple(torch.log_softmax(projected.materialize(), -1).topk(4, dim=-1)),
            lambda z, t: topk_divergence(z, t[1], t[0], "forward_kl"),
        ),
    }[teacher_kind]
    student = ProjectedLogits(hidden, weight, b, vocab)
    results = []
    for loss_rows in (5, 2, 1):
        values = projected_token_loss(student, teacher, loss, chunk_size=5, loss_rows=loss_rows)
        results.append((values.detach(), _grads(values, (hidden, weight, b))))
    for values, grads in results[1:]:
        assert torch.equal(values, results[0][0])
        for got, want in zip(grads, results[0][1], strict=True):
            assert torch.equal(got, want)
