import math

import pytest
import torch

from opdistill.losses import base_anchor, tilted_teacher_logprobs, token_divergence


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, 2.0, 3.5])
def test_tilted_teacher_matches_the_normalised_geometric_mixture(strength):
    context, plain = _logits(2, 3, 7, seed=1), _logits(2, 3, 7, seed=2)
    got = tilted_teacher_logprobs(context, plain, strength)
    for b in range(2):
        for t in range(3):
            p_c = [math.exp(x) for x in context[b, t].tolist()]
            p_0 = [math.exp(x) for x in plain[b, t].tolist()]
            p_c = [x / sum(p_c) for x in p_c]
            p_0 = [x / sum(p_0) for x in p_0]
            unnormalised = [
                a**strength * o ** (1 - strength) for a, o in zip(p_c, p_0, strict=True)
            ]
            z = sum(unnormalised)
            expected = torch.tensor([math.log(u / z) for u in unnormalised], dtype=got.dtype)
            torch.testing.assert_close(got[b, t], expected, rtol=1e-10, atol=1e-10)


def test_tilt_strength_one_is_the_context_teacher_and_zero_the_plain_model():
    context, plain = _logits(4, 11, seed=3), _logits(4, 11, seed=4)
    torch.testing.assert_close(
        tilted_teacher_logprobs(context, plain, 1.0), torch.log_softmax(context, -1)
    )
    torch.testing.assert_close(
        tilted_teacher_logprobs(context, plain, 0.0), torch.log_softmax(plain, -1)
    )


def test_tilt_scales_the_log_ratio_between_context_and_plain():
    """log T_α(v) − log T_α(w) = log π0(v)/π0(w) + α·[PCMI(v) − PCMI(w)]: α multiplies the tilt."""
    context, plain = _logits(9, seed=5), _logits(9, seed=6)
    pcmi = torch.log_softmax(context, -1) - torch.log_softmax(plain, -1)
    base = torch.log_softmax(plain, -1)
    for strength in (0.25, 2.0):
        tilted = tilted_teacher_logprobs(context, plain, strength)
        torch.testing.assert_close(
            tilted - tilted[0], (base - base[0]) + strength * (pcmi - pcmi[0])
        )


def test_a_token_impossible_under_either_model_stays_impossible():
    context = torch.tensor([[0.0, 1.0, float("-inf")]])
    plain = torch.tensor([[float("-inf"), 0.5, 0.2]])
    for strength in (0.5, 3.0):
        tilted = tilted_teacher_logprobs(context, plain, strength)
        assert torch.isinf(tilted[0, 0]) and torch.isinf(tilted[0, 2])
        assert tilted[0, 1].item() == pytest.approx(0.0)  # all the mass on the one left


def test_base_anchor_is_the_weighted_forward_kl_to_the_base():
    student, base = _logits(3, 5, seed=7), _logits(3, 5, seed=8)
    got = base_anchor(student, base, 0.3)
    for row in range(3):
        p = torch.softmax(base[row], -1).tolist()
        q = torch.softmax(student[row], -1).tolist()
        expected = 0.3 * sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))
        assert got[row].item() == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(
        base_anchor(student, base, 2.0, "reverse_kl"),
        2.0 * token_divergence(student, base, "reverse_kl"),
    )


def test_base_anchor_gradient_raises_the_tokens_the_student_underweights():
    """∂/∂z_v w·KL(π_base‖q) = w·(q(v) − π_base(v)): descent raises q where π_base > q."""
    student = _logits(6, seed=9).requires_grad_(True)
    base = _logits(6, seed=10)
    base_anchor(student, base, 0.7).backward()
    q, p = torch.softmax(student.detach(), -1), torch.softmax(base, -1)
    torch.testing.assert_close(student.grad, 0.7 * (q - p))
    assert torch.all(torch.sign(student.grad[p > q]) < 0)


def _fit(loss_of_logits, size):
    """The minimiser over q = softmax(z), by L-BFGS."""
    logits = torch.zeros(size, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = loss_of_logits(logits)
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(logits.detach(), -1)


def test_a_reverse_kl_anchor_tempers_the_tilt_by_one_over_one_plus_its_weight():
    """argmin_q KL(q‖π_c) + w·KL(q‖π_0) = T_α with α = 1/(1+w) (docs/self-distillation.md)."""
    context, plain = _logits(6, seed=11) * 2, _logits(6, seed=12)
    weight = 1.5
    fitted = _fit(
        lambda z: (
            token_divergence(z, context, "reverse_kl") + base_anchor(z, plain, weight, "reverse_kl")
        ),
        6,
    )
    expected = tilted_teacher_logprobs(context, plain, 1 / (1 + weight)).exp()
    torch.testing.assert_close(fitted, expected, atol=1e-5, rtol=1e-4)


def test_a_forward_kl_anchor_keeps_mass_on_every_answer_of_the_base():
    """Reverse KL to a peaked teacher drops the base model's minor answers; the anchor keeps
    each at a share of its base probability."""
    teacher = torch.tensor([8.0, 0.0, 0.0, -20.0], dtype=torch.float64)  # one dominant mode
    base = torch.tensor([1.0, 0.5, 0.5, -20.0], dtype=torch.float64)  # three answers
    alone = _fit(lambda z: token_divergence(z, teacher, "reverse_kl"), 4)
    anchored = _fit(
        lambda z: token_divergence(z, teacher, "reverse_kl") + base_anchor(z, base, 0.5), 4
    )
    p_base = torch.softmax(base, -1)
    assert alone[1] < 1e-3 and alone[2] < 1e-3
    assert anchored[1] > 0.1 * p_base[1] and anchored[2] > 0.1 * p_base[2]
    assert anchored[0] > anchored[1]  # still the teacher's mode first
