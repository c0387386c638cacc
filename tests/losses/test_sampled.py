from __future__ import annotations

import math

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses import token_divergence
from opdistill.losses.sampled import (
    discounted_returns,
    sampled_token_loss,
    token_logprobs,
    vopd_loss,
)

NEG_INF = float("-inf")


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _ids(*shape: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    log_z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - log_z for x in row]


def _kl(log_a: list[float], log_b: list[float]) -> float:
    return sum(math.exp(a) * (a - b) for a, b in zip(log_a, log_b, strict=True) if a > NEG_INF)


def _vopd_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ids: torch.Tensor,
    top_k: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force per-token vOPD (γ = 0) in plain Python: (advantages, loss values)."""
    b_size, t_size, _ = student.shape
    adv = torch.zeros(b_size, t_size, dtype=torch.float64)
    loss = torch.zeros(b_size, t_size, dtype=torch.float64)
    for b in range(b_size):
        for t in range(t_size):
            lq = _log_softmax([x / temperature for x in student[b, t].tolist()])
            lp = _log_softmax([x / temperature for x in teacher[b, t].tolist()])
            y = int(ids[b, t])
            if top_k:
                support = sorted(range(len(lq)), key=lambda v: -lq[v])[:top_k]
                kl = _kl(
                    _log_softmax([lq[v] for v in support]), _log_softmax([lp[v] for v in support])
                )
            else:
                kl = _kl(lq, lp)
            a = lp[y] - lq[y] + kl
            adv[b, t] = a
            loss[b, t] = -a * lq[y]
    return adv, loss


# --- token_logprobs ---------------------------------------------------------------------------


def test_token_logprobs_gather_temperature_and_pad() -> None:
    logits = _logits(2, 3, 5, seed=1)
    ids = torch.tensor([[0, 4, 2], [1, 3, 99]])
    got = token_logprobs(logits, ids, temperature=2.0)
    expected = torch.log_softmax(logits / 2.0, -1).gather(-1, ids.clamp(max=4)[..., None])[..., 0]
    torch.testing.assert_close(got, expected)
    assert token_logprobs(logits.bfloat16(), ids).dtype == torch.float32
    with pytest.raises(OpdistillError, match="shape"):
        token_logprobs(logits, ids[:, :2])
    with pytest.raises(OpdistillError, match="temperature"):
        token_logprobs(logits, ids, temperature=0.0)


# --- discounted_returns -----------------------------------------------------------------------


def test_discounted_returns_hand_computation() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, -1.0, 7.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    g = 0.5
    expected = torch.tensor(
        [
            [1 + g * 2 + g**2 * 3 + g**3 * 4, 2 + g * 3 + g**2 * 4, 3 + g * 4, 4],
            [5 + g * -1, -1, 0, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(discounted_returns(r, mask, g), expected)
    # γ = 0: the masked rewards; γ = 1: plain reverse cumulative sums.
    torch.testing.assert_close(discounted_returns(r, mask, 0.0), torch.where(mask.bool(), r, 0.0))
    torch.testing.assert_close(
        discounted_returns(r[:1], mask[:1], 1.0),
        torch.tensor([[10.0, 9.0, 7.0, 4.0]], dtype=torch.float64),
    )


def test_discounted_returns_skips_masked_gap_but_counts_its_step() -> None:
    r = torch.tensor([1.0, 100.0, 3.0])
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(discounted_returns(r, mask, 0.5), torch.tensor([1 + 0.25 * 3, 0, 3]))


def test_discounted_returns_gradient_and_no_leak_from_masked() -> None:
    r = torch.tensor([[1.0, 2.0, float("inf")]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = discounted_returns(r, mask, 0.9)
    assert torch.isfinite(out).all()
    out.sum().backward()
    torch.testing.assert_close(r.grad, torch.tensor([[1.0, 1.9, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_discounted_returns_rejects_bad_gamma(gamma: float) -> None:
    with pytest.raises(OpdistillError, match="gamma"):
        discounted_returns(torch.zeros(2, 3), torch.ones(2, 3), gamma)


def test_discounted_returns_shape_mismatch() -> None:
    with pytest.raises(OpdistillError, match="same shape"):
        discounted_returns(torch.zeros(2, 3), torch.ones(2, 4), 0.5)


# --- sampled_token_loss (tinker form) ---------------------------------------------------------


def test_tinker_on_policy_value_and_gradient() -> None:
    student = _logits(2, 4, 6, seed=2).requires_grad_(True)
    teacher = _logits(2, 4, 6, seed=3)
    ids = _ids(2, 4, vocab=6, seed=4)
    mask = torch.ones(2, 4)
    log_q = token_logprobs(student, ids)
    log_p = token_logprobs(teacher, ids)
    loss = sampled_token_loss(log_q, log_p, log_q.detach(), mask)
    adv = (log_p - log_q).detach()
    torch.testing.assert_close(loss, -adv)  # ρ = 1 in value
    loss.sum().backward()
    q = torch.softmax(student.detach(), -1)
    onehot = torch.nn.functional.one_hot(ids, 6).double()
    torch.testing.assert_close(student.grad, -adv[..., None] * (onehot - q))  # −A·∇log q


def test_tinker_importance_ratio_corrects_mismatch() -> None:
    log_q = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor([[-1.5, -1.0, -0.7]], dtype=torch.float64)
    log_s = torch.tensor([[-0.8, -2.5, -0.5]], dtype=torch.float64, requires_grad=True)
    loss = sampled_token_loss(log_q, log_p, log_s, torch.ones(1, 3))
    rho = (log_q - log_s).exp().detach()
    adv = (log_p - log_q).detach()
    torch.testing.assert_close(loss, -rho * adv)
    loss.sum().backward()
    torch.testing.assert_close(log_q.grad, -rho * adv)  # ∂(−ρA)/∂log q = −ρA
    assert log_s.grad is None or (log_s.grad == 0).all()


def test_tinker_discounting_by_hand() -> None:
    log_q = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    log_p = torch.tensor([[-1.5, -1.0, -0.7, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    r = [-0.5, 1.0, -0.2]
    g = 0.9
    expected_adv = [r[0] + g * r[1] + g * g * r[2], r[1] + g * r[2], r[2], 0.0]
    loss = sampled_token_loss(log_q, log_p, log_q, mask, gamma=g)
    torch.testing.assert_close(loss, -torch.tensor([expected_adv], dtype=torch.float64))


def test_tinker_masked_positions_are_nan_safe() -> None:
    student = _logits(1, 3, 5, seed=5)
    student[0, 2, 1:] = NEG_INF  # the clamped pad id 4 has log q = −inf
    student.requires_grad_(True)
    ids = torch.tensor([[1, 2, 99]])
    mask = torch.tensor([[1, 1, 0]])
    log_q = token_logprobs(student, ids)
    log_p = torch.tensor([[-1.0, -2.0, NEG_INF]], dtype=torch.float64)
    log_s = torch.tensor([[-1.0, -2.0, NEG_INF]], dtype=torch.float64)
    loss = sampled_token_loss(log_q, log_p, log_s, mask)
    assert torch.isneginf(log_q[0, 2])
    assert loss[0, 2] == 0
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[0, 2] == 0).all()


# --- vOPD: values, gradients, γ, masks --------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 1, 3, 6, 10])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_vopd_matches_brute_force(top_k: int, temperature: float) -> None:
    student = _logits(2, 3, 6, seed=6).requires_grad_(True)
    teacher = _logits(2, 3, 6, seed=7)
    ids = _ids(2, 3, vocab=6, seed=8)
    mask = torch.ones(2, 3)
    loss = vopd_loss(student, teacher, ids, mask, top_k=top_k, temperature=temperature)
    adv, expected = _vopd_reference(student.detach(), teacher, ids, top_k, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    loss.sum().backward()
    # Gradient: −A·∇log q(y) = −A·(onehot(y) − q)/τ; no gradient through the advantage.
    q = torch.softmax(student.detach() / temperature, -1)
    onehot = torch.nn.functional.one_hot(ids, 6).double()
    torch.testing.assert_close(student.grad, -adv[..., None] * (onehot - q) / temperature)


def test_vopd_fp32_and_bf16_compute_in_fp32() -> None:
    student, teacher = _logits(2, 3, 6, seed=9), _logits(2, 3, 6, seed=10)
    ids, mask = _ids(2, 3, vocab=6, seed=11), torch.ones(2, 3)
    ref = vopd_loss(student, teacher, ids, mask)
    got = vopd_loss(student.float(), teacher.float(), ids, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert vopd_loss(student.bfloat16(), teacher.bfloat16(), ids, mask).dtype == torch.float32


def test_vopd_zero_when_student_equals_teacher() -> None:
    logits = _logits(2, 3, 6, seed=12).requires_grad_(True)
    loss = vopd_loss(logits, logits.detach() + 1.0, _ids(2, 3, vocab=6), torch.ones(2, 3))
    torch.testing.assert_close(loss, torch.zeros(2, 3, dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))


def test_vopd_discounting() -> None:
    student, teacher = _logits(1, 4, 5, seed=13), _logits(1, 4, 5, seed=14)
    ids, mask = _ids(1, 4, vocab=5, seed=15), torch.tensor([[1, 1, 1, 0]])
    g = 0.7
    log_q = torch.log_softmax(student, -1)
    log_p = torch.log_softmax(teacher, -1)
    r = (log_p - log_q).gather(-1, ids[..., None])[0, :, 0].tolist()
    kl = token_divergence(student, teacher, "reverse_kl")[0].tolist()
    returns = [r[0] + g * r[1] + g * g * r[2], r[1] + g * r[2], r[2]]
    log_q_y = log_q.gather(-1, ids[..., None])[0, :, 0].tolist()
    expected = [-(returns[t] + kl[t]) * log_q_y[t] for t in range(3)] + [0.0]
    got = vopd_loss(student, teacher, ids, mask, gamma=g)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))


def test_vopd_masked_positions_and_pad_ids() -> None:
    student = _logits(2, 3, 6, seed=16)
    teacher = _logits(2, 3, 6, seed=17)
    # Garbage at masked positions: near-empty student row, NaN / all −inf teacher rows.
    # (A student row that is entirely −inf would make log_softmax's own backward NaN.)
    student[1, 2, :-1] = NEG_INF
    teacher[1, 2] = float("nan")
    teacher[0, 2] = NEG_INF
    student.requires_grad_(True)
    ids = _ids(2, 3, vocab=6, seed=18)
    ids[:, 2] = -100
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    loss = vopd_loss(student, teacher, ids, mask, gamma=0.5)
    assert (loss[:, 2] == 0).all()
    loss.sum().backward()
    grad = student.grad
    assert torch.isfinite(grad).all()
    assert (grad[:, 2] == 0).all()
    # The kept positions are unaffected by what sits at the masked ones.
    s2 = student.detach()[:, :2].clone().requires_grad_(True)
    kept = vopd_loss(s2, teacher[:, :2], ids[:, :2], mask[:, :2], gamma=0.5)
    torch.testing.assert_close(loss[:, :2], kept)
    kept.sum().backward()
    torch.testing.assert_close(grad[:, :2], s2.grad)


@pytest.mark.parametrize("top_k", [0, 3])
def test_vopd_neg_inf_vocab_entries_equal_removed_entries(top_k: int) -> None:
    vocab, banned = 8, [1, 4, 6]
    kept = [v for v in range(vocab) if v not in banned]
    student = _logits(2, 3, vocab, seed=19)
    teacher = _logits(2, 3, vocab, seed=20)
    student[..., banned] = NEG_INF
    teacher[..., banned] = NEG_INF
    student.requires_grad_(True)
    small_ids = _ids(2, 3, vocab=len(kept), seed=21)
    ids = torch.tensor(kept)[small_ids]
    mask = torch.ones(2, 3)
    full = vopd_loss(student, teacher, ids, mask, top_k=top_k, gamma=0.3)
    full.sum().backward()
    s_small = student.detach()[..., kept].clone().requires_grad_(True)
    small = vopd_loss(s_small, teacher[..., kept], small_ids, mask, top_k=top_k, gamma=0.3)
    small.sum().backward()
    assert torch.isfinite(full).all() and torch.isfinite(student.grad).all()
    torch.testing.assert_close(full, small)
    torch.testing.assert_close(student.grad[..., kept], s_small.grad)
    assert (student.grad[..., banned] == 0).all()


def test_vopd_top_k_larger_than_banned_support_is_finite() -> None:
    # k = 4 but only 3 tokens have mass: the top-k support includes −inf entries.
    student = torch.tensor([[[1.0, 0.5, NEG_INF, -0.3, NEG_INF]]], requires_grad=True)
    teacher = torch.tensor([[[0.2, 1.0, NEG_INF, 0.0, NEG_INF]]])
    loss = vopd_loss(student, teacher, torch.tensor([[1]]), torch.ones(1, 1), top_k=4)
    torch.testing.assert_close(
        loss, vopd_loss(student, teacher, torch.tensor([[1]]), torch.ones(1, 1))
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()


def test_vopd_teacher_gets_no_gradient() -> None:
    student = _logits(1, 2, 5, seed=22).requires_grad_(True)
    teacher = _logits(1, 2, 5, seed=23).requires_grad_(True)
    vopd_loss(student, teacher, _ids(1, 2, vocab=5), torch.ones(1, 2)).sum().backward()
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"gamma": 2.0}, "gamma"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_vopd_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(OpdistillError, match=match):
        vopd_loss(logits, logits, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), **kwargs)


def test_vopd_shape_errors() -> None:
    ids, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    with pytest.raises(OpdistillError, match="same shape"):
        vopd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), ids, mask)
    with pytest.raises(OpdistillError, match="response_ids"):
        vopd_loss(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), ids, mask)


# --- Monte Carlo: unbiased gradient of KL(Q‖P), lower variance with the baseline ---------------

MC_SAMPLES = 20_000
MC_VOCAB = 6


def _mc_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One position: student flatter than the teacher (the usual distillation regime)."""
    g = torch.Generator().manual_seed(1234)
    student = torch.randn(MC_VOCAB, generator=g, dtype=torch.float64)
    teacher = torch.randn(MC_VOCAB, generator=g, dtype=torch.float64) * 3.0
    leaf = student.clone().requires_grad_(True)
    token_divergence(leaf, teacher, "reverse_kl").backward()
    samples = torch.multinomial(
        torch.softmax(student, -1), MC_SAMPLES, replacement=True, generator=g
    )
    return student, teacher, samples.reshape(MC_SAMPLES, 1), leaf.grad


def _per_sample_grads(student: torch.Tensor, loss_fn) -> torch.Tensor:
    """Row n of the batch is an independent sample; d(sum)/d(row n logits) is its gradient."""
    rows = student.expand(MC_SAMPLES, 1, MC_VOCAB).clone().requires_grad_(True)
    loss_fn(rows).sum().backward()
    return rows.grad[:, 0]


def _mc_grads() -> dict[str, torch.Tensor]:
    student, teacher, ids, _ = _mc_setup()
    teacher_rows = teacher.expand(MC_SAMPLES, 1, MC_VOCAB)
    mask = torch.ones(MC_SAMPLES, 1)

    def reinforce(rows: torch.Tensor) -> torch.Tensor:
        log_q = token_logprobs(rows, ids)
        return sampled_token_loss(log_q, token_logprobs(teacher_rows, ids), log_q.detach(), mask)

    return {
        "vopd": _per_sample_grads(student, lambda s: vopd_loss(s, teacher_rows, ids, mask)),
        "vopd_top3": _per_sample_grads(
            student, lambda s: vopd_loss(s, teacher_rows, ids, mask, top_k=3)
        ),
        "reinforce": _per_sample_grads(student, reinforce),
    }


@pytest.fixture(scope="module")
def mc_grads() -> dict[str, torch.Tensor]:
    return _mc_grads()


@pytest.mark.parametrize("name", ["vopd", "vopd_top3", "reinforce"])
def test_monte_carlo_gradient_is_unbiased(mc_grads: dict[str, torch.Tensor], name: str) -> None:
    *_, exact = _mc_setup()
    grads = mc_grads[name]
    mean = grads.mean(0)
    stderr = grads.std(0) / math.sqrt(MC_SAMPLES)
    assert ((mean - exact).abs() < 4 * stderr + 1e-12).all(), (name, mean, exact, stderr)
    assert (mean - exact).abs().max() < 0.02


def test_monte_carlo_baseline_lowers_variance(mc_grads: dict[str, torch.Tensor]) -> None:
    # Total variance = trace of the per-sample gradient covariance.
    with_baseline = mc_grads["vopd"].var(0).sum()
    top_k_baseline = mc_grads["vopd_top3"].var(0).sum()
    without = mc_grads["reinforce"].var(0).sum()
    assert with_baseline < 0.8 * without, (with_baseline, without)
    assert top_k_baseline < without, (top_k_baseline, without)


def test_baseline_variance_closed_form_matches_monte_carlo(
    mc_grads: dict[str, torch.Tensor],
) -> None:
    # Exact trace of the covariance of −A(y)·(onehot(y) − q), y ~ Q, for both advantages.
    student, teacher, *_ = _mc_setup()
    q = torch.softmax(student, -1)
    r = torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1)
    kl = token_divergence(student, teacher, "reverse_kl")
    eye = torch.eye(MC_VOCAB, dtype=torch.float64)
    for name, adv in (("vopd", r + kl), ("reinforce", r)):
        g = -adv[:, None] * (eye - q)
        mean = (q[:, None] * g).sum(0)
        total_var = (q * (g**2).sum(-1)).sum() - (mean**2).sum()
        torch.testing.assert_close(mc_grads[name].var(0).sum(), total_var, rtol=0.05, atol=0)


def test_truncated_importance_ratio() -> None:
    """Below the cap the loss and its gradient are bitwise those without a cap; above it the
    token weighs is_cap: value −cap·A, gradient −cap·A·∇log q (brute force per token)."""
    torch.manual_seed(0)
    log_q = torch.log_softmax(torch.randn(2, 5, 7), -1)[..., 0].clone().requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(2, 5, 7), -1)[..., 0]
    sampler = log_q.detach() + torch.tensor([[0.0, -2.0, 0.1, -0.9, 0.3]] * 2)  # ρ up to e²
    mask = torch.ones(2, 5)
    mask[1, 4] = 0
    plain = sampled_token_loss(log_q, teacher, sampler, mask)
    (plain_grad,) = torch.autograd.grad(plain.sum(), log_q)
    capped = sampled_token_loss(log_q, teacher, sampler, mask, is_cap=2.0)
    (capped_grad,) = torch.autograd.grad(capped.sum(), log_q)
    ratio = torch.exp(log_q.detach() - sampler)
    advantage = teacher - log_q.detach()
    over = (ratio > 2.0) & mask.bool()
    assert over.any() and (~over & mask.bool()).any()
    assert torch.equal(capped[~over], plain[~over])
    assert torch.equal(capped_grad[~over], plain_grad[~over])
    assert torch.allclose(capped[over], -2.0 * advantage[over])
    # A is detached, so ∂loss_t/∂log q_t = −cap·A_t.
    assert torch.allclose(capped_grad[over], -2.0 * advantage[over])
