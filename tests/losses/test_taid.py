from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses import token_divergence
from opdistill.losses.taid import TaidSchedule, taid_loss

NEG_INF = float("-inf")


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(x - m) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def _reference(student: list[float], teacher: list[float], t: float, tau: float) -> float:
    """Brute-force TAID loss of one position with raw (not log-softmaxed) logits."""
    target = _softmax([((1 - t) * s + t * z) / tau for s, z in zip(student, teacher, strict=True)])
    q = _softmax([s / tau for s in student])
    return sum(p * math.log(p / qi) for p, qi in zip(target, q, strict=True) if p > 0)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_brute_force(t: float, tau: float) -> None:
    student, teacher = _logits(2, 3, 6, seed=1), _logits(2, 3, 6, seed=2)
    got = taid_loss(student, teacher, t, temperature=tau)
    expected = torch.tensor(
        [
            [_reference(student[b, i].tolist(), teacher[b, i].tolist(), t, tau) for i in range(3)]
            for b in range(2)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    f32 = taid_loss(student.float(), teacher.float(), t, temperature=tau)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), expected, rtol=1e-5, atol=1e-5)


def test_t_one_equals_forward_kl_value_and_gradient() -> None:
    teacher = _logits(3, 4, 7, seed=3)
    a = _logits(3, 4, 7, seed=4).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    got = taid_loss(a, teacher, 1.0, temperature=1.5)
    ref = token_divergence(b, teacher, "forward_kl", temperature=1.5)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_t_zero_gives_zero() -> None:
    student = _logits(2, 5, seed=5).requires_grad_(True)
    loss = taid_loss(student, _logits(2, 5, seed=6), 0.0)
    torch.testing.assert_close(loss, torch.zeros(2, dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("t", [0.2, 0.6])
def test_gradient_flows_only_through_q(t: float) -> None:
    # With the target fixed, ∂KL(p_t‖Q)/∂z_S = (Q − p_t)/τ. (A finite-difference gradcheck
    # does not apply: it would also differentiate the stop-gradient path through p_t.)
    tau = 1.3
    student = _logits(2, 3, 6, seed=7).requires_grad_(True)
    teacher = _logits(2, 3, 6, seed=8)
    taid_loss(student, teacher, t, temperature=tau).sum().backward()
    z_s, z_t = student.detach() / tau, teacher / tau
    target = torch.softmax((1 - t) * z_s + t * z_t, -1)
    torch.testing.assert_close(student.grad, (torch.softmax(z_s, -1) - target) / tau)


def test_loss_grows_with_t() -> None:
    # d/dt KL(p_t‖Q) = t·Var_{p_t}(log P − log Q) ≥ 0 for the geometric interpolation.
    student, teacher = _logits(4, 6, seed=11), _logits(4, 6, seed=12)
    values = [taid_loss(student, teacher, t) for t in (0.1, 0.4, 0.7, 1.0)]
    for lo, hi in itertools.pairwise(values):
        assert (lo <= hi + 1e-12).all()


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_neg_inf_entries_equal_removed_entries(t: float) -> None:
    vocab, banned = 7, [1, 4, 6]
    kept = [v for v in range(vocab) if v not in banned]
    student = _logits(2, 3, vocab, seed=13)
    teacher = _logits(2, 3, vocab, seed=14)
    student[..., banned] = NEG_INF
    teacher[..., banned] = NEG_INF
    student.requires_grad_(True)
    full = taid_loss(student, teacher, t)
    full.sum().backward()
    s_small = student.detach()[..., kept].clone().requires_grad_(True)
    small = taid_loss(s_small, teacher[..., kept], t)
    small.sum().backward()
    assert torch.isfinite(full).all() and torch.isfinite(student.grad).all()
    torch.testing.assert_close(full, small)
    torch.testing.assert_close(student.grad[..., kept], s_small.grad)
    assert (student.grad[..., banned] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sided_neg_inf_is_finite_inside_the_interval(dtype: torch.dtype) -> None:
    # Student bans token 0, teacher bans token 1: for 0 < t < 1 the geometric target puts no
    # mass on either, so the loss stays finite with finite gradients.
    student = torch.tensor([[NEG_INF, 0.5, 1.0, -0.2]], dtype=dtype, requires_grad=True)
    teacher = torch.tensor([[0.3, NEG_INF, 0.1, 2.0]], dtype=dtype)
    loss = taid_loss(student, teacher, 0.5)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("t", [-0.1, 1.1, float("nan")])
def test_rejects_t_outside_unit_interval(t: float) -> None:
    with pytest.raises(OpdistillError, match="t must be in"):
        taid_loss(torch.zeros(2, 3), torch.zeros(2, 3), t)


def test_rejects_bad_temperature_and_shapes() -> None:
    with pytest.raises(OpdistillError, match="temperature"):
        taid_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, temperature=0.0)
    with pytest.raises(OpdistillError, match="same shape"):
        taid_loss(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)


# --- TaidSchedule -----------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_schedule_hand_computation_three_updates() -> None:
    total, t0, alpha, beta = 100, 0.4, 0.05, 0.9
    sched = TaidSchedule(total, t_start=t0, alpha=alpha, beta=beta)
    assert sched.t == t0
    losses = [2.0, 1.5, 1.8]

    # Update 1: no previous loss, momentum stays 0.
    t_target = t0 + (1 - t0) * 1 / total
    t = min(1.0, max(t_target, t0 + alpha * _sigmoid(0.0) * (1 - t0)))
    assert sched.update(1, losses[0]) == pytest.approx(t, abs=1e-15)
    assert sched.state_dict()["momentum"] == 0.0

    # Update 2: m = (1 − β)(2.0 − 1.5)/2.0.
    m = (1 - beta) * (2.0 - 1.5) / 2.0
    t_target = t0 + (1 - t0) * 2 / total
    t = min(1.0, max(t_target, t + alpha * _sigmoid(m) * (1 - t)))
    assert sched.update(2, losses[1]) == pytest.approx(t, abs=1e-15)
    assert sched.state_dict()["momentum"] == pytest.approx(m, abs=1e-15)

    # Update 3: the loss rose, so the momentum term shrinks.
    m = beta * m + (1 - beta) * (1.5 - 1.8) / 1.5
    t_target = t0 + (1 - t0) * 3 / total
    t = min(1.0, max(t_target, t + alpha * _sigmoid(m) * (1 - t)))
    assert sched.update(3, losses[2]) == pytest.approx(t, abs=1e-15)
    assert sched.state_dict()["momentum"] == pytest.approx(m, abs=1e-15)
    assert sched.t == pytest.approx(t, abs=1e-15)


def test_schedule_linear_floor_wins_with_small_alpha() -> None:
    sched = TaidSchedule(10, t_start=0.4, alpha=0.0)
    for step in range(1, 11):
        assert sched.update(step, 1.0) == pytest.approx(0.4 + 0.6 * step / 10)


def test_schedule_is_non_decreasing_and_reaches_one() -> None:
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(50, generator=g) * 3 + 0.1).tolist()  # noisy, up and down
    sched = TaidSchedule(50, alpha=0.05)
    ts = [sched.t]
    for step, loss in enumerate(losses, start=1):
        ts.append(sched.update(step, loss))
    assert all(b >= a for a, b in itertools.pairwise(ts))
    assert ts[-1] == 1.0
    assert sched.update(60, 0.5) == 1.0  # stays at 1 past the end


def test_schedule_monotone_in_step() -> None:
    # From the same state, a later step never gives a smaller t.
    results = []
    for step in range(0, 25):
        sched = TaidSchedule(20, t_start=0.3, alpha=0.01)
        sched.update(0, 2.0)
        results.append(sched.update(step, 1.7))
    assert all(b >= a for a, b in itertools.pairwise(results))
    assert results[20] == results[-1] == 1.0


def test_schedule_adaptive_term_faster_when_loss_falls() -> None:
    falling, rising = TaidSchedule(1000, alpha=0.1), TaidSchedule(1000, alpha=0.1)
    for step in range(1, 6):
        falling.update(step, 10.0 / step)
        rising.update(step, 1.0 * step)
    assert falling.state_dict()["momentum"] > 0 > rising.state_dict()["momentum"]
    assert falling.t > rising.t


def test_schedule_zero_and_non_finite_losses_are_guarded() -> None:
    sched = TaidSchedule(100, alpha=0.01)
    sched.update(1, 0.0)
    sched.update(2, 1.0)  # ℓ_prev = 0: momentum unchanged
    assert sched.state_dict()["momentum"] == 0.0
    sched.update(3, float("nan"))  # ignored for the momentum and not stored
    sched.update(4, 0.5)
    assert sched.state_dict()["momentum"] == pytest.approx(0.01 * (1.0 - 0.5) / 1.0)
    assert math.isfinite(sched.t)


def test_schedule_state_round_trip_resumes_exactly() -> None:
    losses = [3.0, 2.5, 2.7, 2.0, 1.9, 1.95, 1.5, 1.4]
    ref = TaidSchedule(20, alpha=0.02, beta=0.8)
    for step, loss in enumerate(losses[:4], start=1):
        ref.update(step, loss)
    state = json.loads(json.dumps(ref.state_dict()))  # plain Python, JSON-serialisable
    assert set(state) == {"t", "momentum", "prev_loss"}
    assert all(isinstance(v, float) for v in state.values())

    resumed = TaidSchedule(20, alpha=0.02, beta=0.8)
    resumed.load_state_dict(state)
    assert (resumed.t, resumed.state_dict()["momentum"]) == (ref.t, ref.state_dict()["momentum"])
    for step, loss in enumerate(losses[4:], start=5):
        assert resumed.update(step, loss) == ref.update(step, loss)

    fresh = TaidSchedule(20).state_dict()
    assert fresh["prev_loss"] is None
    restored = TaidSchedule(20)
    restored.load_state_dict(fresh)
    assert restored.state_dict() == fresh


def test_schedule_load_rejects_missing_keys() -> None:
    with pytest.raises(OpdistillError, match="momentum"):
        TaidSchedule(10).load_state_dict({"t": 0.5, "prev_loss": None})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"total_steps": 10, "t_start": 1.5}, "t_start"),
        ({"total_steps": 10, "alpha": -1.0}, "alpha"),
        ({"total_steps": 10, "beta": 1.5}, "beta"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(OpdistillError, match=match):
        TaidSchedule(**kwargs)
