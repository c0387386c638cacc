import itertools

import pytest
import torch

from opdistill.losses import uld_distance


def brute_force_w1(p: list[float], q: list[float]) -> float:
    """The Wasserstein-1 distance between p and q as distributions over ranks 0, 1, 2, ... after
    the best relabelling of each vocabulary, with cost 1 between distinct ranks: the minimum over
    all pairings of the two supports of Σ |p_i − q_σ(i)| (zero-padded to one size)."""
    width = max(len(p), len(q))
    p = p + [0.0] * (width - len(p))
    q = q + [0.0] * (width - len(q))
    return min(
        sum(abs(a - q[j]) for a, j in zip(p, perm, strict=True))
        for perm in itertools.permutations(range(width))
    )


@pytest.mark.parametrize(("v_student", "v_teacher"), [(5, 5), (4, 6), (6, 3)])
def test_uld_is_the_best_matching_of_the_two_distributions(v_student, v_teacher):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, v_student, generator=gen)
    teacher = torch.randn(2, 3, v_teacher, generator=gen)
    got = uld_distance(student, teacher, temperature=1.5)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(student[b, t] / 1.5, -1).tolist()
            q = torch.softmax(teacher[b, t] / 1.5, -1).tolist()
            assert float(got[b, t]) == pytest.approx(brute_force_w1(p, q), abs=1e-5)


def test_uld_ignores_token_labels_and_is_zero_for_relabelled_distributions():
    student = torch.randn(4, 7, requires_grad=True)
    permuted = student.detach()[:, torch.randperm(7)]
    assert torch.allclose(uld_distance(student, permuted), torch.zeros(4), atol=1e-6)
    loss = uld_distance(student, torch.randn(4, 9)).sum()
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert float(student.grad.abs().sum()) > 0
