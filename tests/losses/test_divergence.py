from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from opdistill.errors import OpdistillError
from opdistill.losses import DIVERGENCE_KINDS, token_divergence

NEG_INF = float("-inf")


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(x - m) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)


def reference(
    student: list[float], teacher: list[float], kind: str, beta: float = 0.5, alpha: float = 0.1
) -> float:
    """Brute-force divergence of one position, plain Python floats."""
    q = _softmax(student)
    p = _softmax(teacher)
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    if kind == "skew_forward_kl":
        return _kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q, strict=True)])
    if kind == "skew_reverse_kl":
        return _kl(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q, strict=True)])
    raise AssertionError(kind)


def _reference_batch(student: torch.Tensor, teacher: torch.Tensor, kind: str, **kw) -> torch.Tensor:
    flat_s = student.reshape(-1, student.shape[-1]).tolist()
    flat_t = teacher.reshape(-1, teacher.shape[-1]).tolist()
    out = [reference(s, t, kind, **kw) for s, t in zip(flat_s, flat_t, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(student.shape[:-1])


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("vocab", [5, 7])
def test_matches_brute_force(kind: str, vocab: int) -> None:
    student, teacher = _logits(2, 3, vocab, seed=vocab), _logits(2, 3, vocab, seed=vocab + 100)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        got = token_divergence(student.to(dtype), teacher.to(dtype), kind)
        assert got.shape == (2, 3)
        torch.testing.assert_close(
            got.double(), _reference_batch(student, teacher, kind), rtol=tol, atol=tol
        )


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
def test_jsd_against_formula_and_symmetry(beta: float) -> None:
    student, teacher = _logits(4, 6, seed=1), _logits(4, 6, seed=2)
    got = token_divergence(student, teacher, "jsd", beta=beta)
    torch.testing.assert_close(got, _reference_batch(student, teacher, "jsd", beta=beta))
    swapped = token_divergence(teacher, student, "jsd", beta=1 - beta)
    torch.testing.assert_close(got, swapped)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_against_formula(kind: str, alpha: float) -> None:
    student, teacher = _logits(4, 6, seed=3), _logits(4, 6, seed=4)
    got = token_divergence(student, teacher, kind, alpha=alpha)
    torch.testing.assert_close(got, _reference_batch(student, teacher, kind, alpha=alpha))


def test_skew_alpha_zero_is_plain_kl() -> None:
    student, teacher = _logits(3, 5, seed=5), _logits(3, 5, seed=6)
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_forward_kl", alpha=0.0),
        token_divergence(student, teacher, "forward_kl"),
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "skew_reverse_kl", alpha=0.0),
        token_divergence(student, teacher, "reverse_kl"),
    )


def test_kl_directions_are_distinguished() -> None:
    # Asymmetric pair: teacher peaked, student flat.
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[4.0, 0.0, -1.0, 0.5, -2.0]], dtype=torch.float64)
    fwd = token_divergence(student, teacher, "forward_kl")
    rev = token_divergence(student, teacher, "reverse_kl")
    assert not torch.allclose(fwd, rev)
    p = torch.softmax(teacher, -1)
    q = torch.softmax(student, -1)
    torch.testing.assert_close(fwd, (p * (p.log() - q.log())).sum(-1))
    torch.testing.assert_close(rev, (q * (q.log() - p.log())).sum(-1))


def test_forward_kl_equals_torch_kl_div_with_swapped_arguments() -> None:
    # Pitfall: F.kl_div(input, target) computes KL(target‖input); forward KL(P‖Q) is
    # kl_div(input=log Q, target=log P).
    student, teacher = _logits(2, 4, 7, seed=7), _logits(2, 4, 7, seed=8)
    log_q = torch.log_softmax(student, -1)
    log_p = torch.log_softmax(teacher, -1)
    kl_div = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(student, teacher, "forward_kl"), kl_div)
    torch.testing.assert_close(
        token_divergence(student, teacher, "reverse_kl"),
        F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1),
    )


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_gradcheck_wrt_student(kind: str) -> None:
    student = _logits(2, 3, 5, seed=9).requires_grad_(True)
    teacher = _logits(2, 3, 5, seed=10)
    assert torch.autograd.gradcheck(
        lambda s: token_divergence(s, teacher, kind, beta=0.3, alpha=0.2, temperature=1.5),
        (student,),
    )


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_gradcheck_wrt_teacher(kind: str) -> None:
    # The teacher is normally detached by the caller, but the formula is differentiable in both.
    student = _logits(2, 5, seed=11)
    teacher = _logits(2, 5, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: token_divergence(student, t, kind), (teacher,))


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_temperature_divides_logits(kind: str) -> None:
    student, teacher = _logits(3, 6, seed=13), _logits(3, 6, seed=14)
    tau = 2.5
    torch.testing.assert_close(
        token_divergence(student, teacher, kind, temperature=tau),
        token_divergence(student / tau, teacher / tau, kind),
    )


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_neg_inf_entries_equal_removed_entries(kind: str) -> None:
    vocab, banned = 7, [1, 4, 6]
    kept = [v for v in range(vocab) if v not in banned]
    student_full = _logits(2, 3, vocab, seed=15)
    teacher_full = _logits(2, 3, vocab, seed=16)
    student_full[..., banned] = NEG_INF
    teacher_full[..., banned] = NEG_INF
    student_full.requires_grad_(True)
    full = token_divergence(student_full, teacher_full, kind, beta=0.3, alpha=0.2)
    full.sum().backward()

    student_small = student_full.detach()[..., kept].clone().requires_grad_(True)
    small = token_divergence(student_small, teacher_full[..., kept], kind, beta=0.3, alpha=0.2)
    small.sum().backward()

    assert torch.isfinite(full).all()
    assert torch.isfinite(student_full.grad).all()
    torch.testing.assert_close(full, small)
    torch.testing.assert_close(student_full.grad[..., kept], student_small.grad)
    assert (student_full.grad[..., banned] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_neg_inf_in_fp32_and_bf16(kind: str) -> None:
    student = _logits(4, 6, seed=17).float()
    teacher = _logits(4, 6, seed=18).float()
    student[..., -2:] = NEG_INF
    teacher[..., -2:] = NEG_INF
    for dtype in (torch.float32, torch.bfloat16):
        s = student.to(dtype).clone().requires_grad_(True)
        out = token_divergence(s, teacher.to(dtype), kind)
        assert out.dtype == torch.float32
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(s.grad).all()


def test_zero_where_weight_is_zero_inf_where_support_missing() -> None:
    # Teacher bans token 0, student does not: reverse KL has a term Q(0)·(log Q(0) − (−inf)) = +inf
    # and forward KL ignores token 0 (P(0) = 0).
    student = torch.tensor([[1.0, 0.0, 0.5]])
    teacher = torch.tensor([[NEG_INF, 0.3, 0.2]])
    assert torch.isinf(token_divergence(student, teacher, "reverse_kl")).all()
    fwd = token_divergence(student, teacher, "forward_kl")
    assert torch.isfinite(fwd).all()
    p = torch.softmax(teacher, -1)[0, 1:]
    q = torch.softmax(student, -1)[0, 1:]
    torch.testing.assert_close(fwd[0], (p * (p.log() - q.log())).sum())
    # Skew and JSD mixtures keep support, so they stay finite.
    for kind in ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        assert torch.isfinite(token_divergence(student, teacher, kind)).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_identical_distributions_give_zero(kind: str) -> None:
    logits = _logits(3, 4, 6, seed=19)
    torch.testing.assert_close(
        token_divergence(logits, logits.clone(), kind), torch.zeros(3, 4, dtype=torch.float64)
    )
    # Shifted logits give the same distribution.
    torch.testing.assert_close(
        token_divergence(logits.float() + 3.0, logits.float(), kind),
        torch.zeros(3, 4),
        atol=1e-5,
        rtol=0,
    )


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(
        st.floats(min_value=-20, max_value=20, allow_nan=False), min_size=12, max_size=12
    ),
    beta=st.floats(min_value=0.01, max_value=0.99),
    alpha=st.floats(min_value=0.0, max_value=0.99),
)
def test_non_negative(data: list[float], beta: float, alpha: float) -> None:
    logits = torch.tensor(data).reshape(2, 6)
    student, teacher = logits[0], logits[1]
    for kind in DIVERGENCE_KINDS:
        out = token_divergence(student, teacher, kind, beta=beta, alpha=alpha)
        assert out.shape == ()
        assert torch.isfinite(out)
        assert out >= -1e-5, (kind, out)
    assert token_divergence(student, teacher, "tvd") <= 1 + 1e-5


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_jsd_rejects_beta_outside_open_interval(beta: float) -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(OpdistillError, match=r"identically 0.*forward_kl.*reverse_kl"):
        token_divergence(logits, logits, "jsd", beta=beta)


@pytest.mark.parametrize("alpha", [1.0, -0.1, 2.0])
@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_rejects_bad_alpha(kind: str, alpha: float) -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(OpdistillError, match="alpha"):
        token_divergence(logits, logits, kind, alpha=alpha)


def test_unknown_kind_lists_valid_kinds() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(OpdistillError, match=r"forward_kl.*skew_reverse_kl") as info:
        token_divergence(logits, logits, "kl")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature: float) -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(OpdistillError, match="temperature"):
        token_divergence(logits, logits, "forward_kl", temperature=temperature)


def test_shape_mismatch() -> None:
    with pytest.raises(OpdistillError, match="same shape"):
        token_divergence(torch.zeros(2, 3), torch.zeros(2, 4), "forward_kl")


def test_unused_parameters_are_not_validated() -> None:
    logits = torch.zeros(2, 3)
    token_divergence(logits, logits, "forward_kl", beta=0.0, alpha=1.0)
