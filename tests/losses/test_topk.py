from __future__ import annotations

import math

import pytest
import torch

from opdistill.errors import OpdistillError
from opdistill.losses import DIVERGENCE_KINDS, log1mexp, token_divergence, topk_divergence

NEG_INF = float("-inf")
PARAMS = dict(beta=0.3, alpha=0.2)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _teacher_topk(teacher: torch.Tensor, k: int, temperature: float = 1.0, shuffle: bool = False):
    """The teacher's k most probable ids and their log-probs at temperature τ."""
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    if not shuffle:
        return top.indices, top.values
    g = torch.Generator().manual_seed(k)
    order = torch.rand(top.indices.shape, generator=g).argsort(dim=-1)
    return top.indices.gather(-1, order), top.values.gather(-1, order)


def _kl(a: list[float], b: list[float]) -> float:
    pairs = [(ai, bi) for ai, bi in zip(a, b, strict=True) if ai > 0]
    return sum(ai * math.log(ai / bi) if bi > 0 else math.inf for ai, bi in pairs)


def _divergence(p: list[float], q: list[float], kind: str, beta: float, alpha: float) -> float:
    """Plain-float divergence of two probability vectors."""
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
    return _kl(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q, strict=True)])


def _bucket_reference(student, teacher, indices, kind, temperature=1.0, **kw) -> torch.Tensor:
    """Brute force: sum the probabilities of every bucket explicitly, in plain floats."""
    vocab = student.shape[-1]
    flat_s = (student / temperature).reshape(-1, vocab).tolist()
    flat_t = (teacher / temperature).reshape(-1, vocab).tolist()
    flat_i = indices.reshape(-1, indices.shape[-1]).tolist()
    out = []
    for s, t, ids in zip(flat_s, flat_t, flat_i, strict=True):
        q = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]
        p = [math.exp(x) / sum(math.exp(y) for y in t) for x in t]
        rest = [v for v in range(vocab) if v not in ids]
        p_buckets = [p[v] for v in ids] + [sum(p[v] for v in rest)]
        q_buckets = [q[v] for v in ids] + [sum(q[v] for v in rest)]
        out.append(_divergence(p_buckets, q_buckets, kind, **kw))
    return torch.tensor(out, dtype=torch.float64).reshape(student.shape[:-1])


def _value_and_grad(fn, student, weights, *args, **kw):
    s = student.detach().clone().requires_grad_(True)
    out = fn(s, *args, **kw)
    (out * weights).sum().backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_full_k_reproduces_token_divergence(kind: str, temperature: float) -> None:
    student, teacher, weights = _logits(2, 3, 6, seed=1), _logits(2, 3, 6, seed=2), _logits(2, 3)
    indices, logprobs = _teacher_topk(teacher, 6, temperature, shuffle=True)
    for alpha in (0.0, 0.2):
        kw = dict(kind=kind, beta=0.3, alpha=alpha, temperature=temperature)
        want, want_grad = _value_and_grad(token_divergence, student, weights, teacher, **kw)
        got, got_grad = _value_and_grad(topk_divergence, student, weights, indices, logprobs, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_matches_brute_force_buckets(kind: str, k: int) -> None:
    student, teacher = _logits(2, 3, 7, seed=3), _logits(2, 3, 7, seed=4)
    indices, logprobs = _teacher_topk(teacher, k, temperature=1.3, shuffle=True)
    got = topk_divergence(student, indices, logprobs, kind, **PARAMS, temperature=1.3)
    want = _bucket_reference(student, teacher, indices, kind, temperature=1.3, **PARAMS)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got32 = topk_divergence(
        student.float(), indices, logprobs.float(), kind, **PARAMS, temperature=1.3
    )
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_gradcheck(kind: str) -> None:
    student = _logits(2, 6, seed=5).requires_grad_(True)
    indices, logprobs = _teacher_topk(_logits(2, 6, seed=6), 3)
    assert torch.autograd.gradcheck(
        lambda s: topk_divergence(s, indices, logprobs, kind, **PARAMS, temperature=1.5),
        (student,),
    )


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_tail_bucket_penalises_mass_outside_the_teacher_top_k(kind: str) -> None:
    # The teacher's mass sits on tokens 0 and 1 (k = 2 covers it). Both students agree with it on
    # the ratio between tokens 0 and 1; one of them moves 30% of its mass to token 4.
    teacher = torch.tensor([[1.0, 0.0, NEG_INF, NEG_INF, NEG_INF]], dtype=torch.float64)
    indices, logprobs = _teacher_topk(teacher, 2)
    inside = teacher.clone()
    outside = torch.tensor([[1.0, 0.0, NEG_INF, NEG_INF, 0.0]], dtype=torch.float64)
    outside[0, 4] = math.log(0.3 / 0.7 * (math.e + 1))  # Q(4) = 0.3
    assert abs(topk_divergence(inside, indices, logprobs, kind, **PARAMS)) < 1e-12
    s = outside.requires_grad_(True)
    value = topk_divergence(s, indices, logprobs, kind, **PARAMS)
    if kind == "reverse_kl":  # Q has mass where P has none
        assert torch.isinf(value).all()
        return
    assert value > 0.01
    value.backward()
    assert s.grad[0, 4] > 0  # raising the outside token's logit raises the loss
    if kind == "forward_kl":  # KL(P‖Q) = Σ_S P log(P / 0.7 P) = −log 0.7
        assert value.item() == pytest.approx(-math.log(0.7), rel=1e-12)


def test_teacher_tail_is_compared_with_the_student_tail() -> None:
    student, teacher = _logits(4, 9, seed=7), _logits(4, 9, seed=8)
    indices, logprobs = _teacher_topk(teacher, 3)
    tail_p = 1 - logprobs.exp().sum(-1)
    tail_q = 1 - torch.softmax(student, -1).gather(-1, indices).sum(-1)
    top_q = torch.log_softmax(student, -1).gather(-1, indices)
    want = (logprobs.exp() * (logprobs - top_q)).sum(-1) + tail_p * (tail_p / tail_q).log()
    torch.testing.assert_close(topk_divergence(student, indices, logprobs, "forward_kl"), want)


def test_teacher_log_probs_are_not_rescaled() -> None:
    student, teacher = _logits(3, 6, seed=9), _logits(3, 6, seed=10)
    indices, logprobs = _teacher_topk(teacher, 6, temperature=2.0)
    got = topk_divergence(student, indices, logprobs, "reverse_kl", temperature=2.0)
    torch.testing.assert_close(got, token_divergence(student, teacher, "reverse_kl", temperature=2))
    assert not torch.allclose(
        got, topk_divergence(student / 2.0, indices, logprobs / 2.0, "reverse_kl")
    )


def test_confident_student_keeps_a_finite_tail() -> None:
    # In fp32, log Q(0) rounds to 0 here: 1 − Σ_S Q would give the student an empty tail and an
    # infinite forward KL against a teacher with tail mass.
    student = torch.tensor([[30.0, 10.0, 5.0, 0.0]])
    assert torch.log_softmax(student, -1)[0, 0] == 0
    indices = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[math.log(0.6), math.log(0.3)]])
    s = student.clone().requires_grad_(True)
    got = topk_divergence(s, indices, logprobs, "forward_kl")
    got.backward()
    q = torch.softmax(student.double(), -1)[0]
    want = _divergence([0.6, 0.3, 0.1], [q[0], q[1], q[2:].sum()], "forward_kl", 0.5, 0.1)
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 2] < 0 and s.grad[0, 3] < 0  # the tail is pulled up toward 0.1


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_neg_inf_student_logits(kind: str) -> None:
    # Student bans token 1 (in the teacher's top-k) and token 5 (in the tail).
    student, teacher = _logits(3, 7, seed=11), _logits(3, 7, seed=12)
    student[:, [1, 5]] = NEG_INF
    teacher[:, 1] = 5.0
    indices, logprobs = _teacher_topk(teacher, 3)
    s = student.clone().requires_grad_(True)
    value = topk_divergence(s, indices, logprobs, kind, **PARAMS)
    value.sum().backward()
    want = _bucket_reference(student, teacher, indices, kind, **PARAMS)
    torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)
    assert not torch.isnan(s.grad).any()
    if kind == "forward_kl":  # +inf (P(1) > 0 = Q(1)); the gradient is not meaningful
        assert torch.isinf(value).all()
    else:
        assert torch.isfinite(value).all() and (s.grad[:, [1, 5]] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_shared_support_and_empty_tails(kind: str) -> None:
    # Teacher and student both ban tokens 3..5; k = 3 covers the support: both tails are empty.
    student, teacher = _logits(2, 6, seed=13), _logits(2, 6, seed=14)
    student[:, 3:] = NEG_INF
    teacher[:, 3:] = NEG_INF
    indices, logprobs = _teacher_topk(teacher, 3)
    s = student.clone().requires_grad_(True)
    value = topk_divergence(s, indices, logprobs, kind, **PARAMS)
    value.sum().backward()
    ref = student.clone().requires_grad_(True)
    want = token_divergence(ref, teacher, kind, **PARAMS)
    want.sum().backward()
    torch.testing.assert_close(value, want)
    torch.testing.assert_close(s.grad, ref.grad)


def test_teacher_without_tail_gives_infinite_reverse_kl() -> None:
    # The teacher's top-1 has probability 1: its tail is empty, the student's is not.
    student = torch.tensor([[0.0, 0.0, 0.0]])
    indices, logprobs = torch.tensor([[2]]), torch.tensor([[0.0]])
    assert torch.isinf(topk_divergence(student, indices, logprobs, "reverse_kl")).all()
    fwd = topk_divergence(student, indices, logprobs, "forward_kl")
    torch.testing.assert_close(fwd, torch.tensor([math.log(3.0)]))
    for kind in ("jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"):
        assert torch.isfinite(topk_divergence(student, indices, logprobs, kind, **PARAMS)).all()


def test_teacher_log_probs_of_zero_and_low_precision_student() -> None:
    student = _logits(2, 3, 8, seed=15).float()
    indices, logprobs = _teacher_topk(_logits(2, 3, 8, seed=16), 4)
    logprobs = logprobs.float()
    logprobs[0, 0, -1] = NEG_INF  # a top-k token with probability 0
    s = student.bfloat16().requires_grad_(True)
    value = topk_divergence(s, indices, logprobs, "jsd")
    value.sum().backward()
    assert value.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert torch.isfinite(value).all() and torch.isfinite(s.grad).all()


def test_saves_no_vocabulary_sized_temporaries() -> None:
    n, vocab, k = 16, 256, 4
    student = _logits(n, vocab, seed=17).float().requires_grad_(True)
    indices, logprobs = _teacher_topk(_logits(n, vocab, seed=18).float(), k)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() != student.data_ptr():
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk_divergence(student, indices, logprobs, "jsd", temperature=2.0)
    assert max(saved) <= n * (k + 1)


def test_sliced_logits_are_saved_as_they_are() -> None:
    base = _logits(3, 6, 40, seed=19).requires_grad_(True)
    student = base[:, :-1, :32]  # the leading dimensions do not flatten into a view
    teacher = _logits(3, 5, 32, seed=20)
    indices, logprobs = _teacher_topk(teacher, 4)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.data_ptr() == base.data_ptr(), tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = topk_divergence(student, indices, logprobs, "skew_reverse_kl", **PARAMS)
    assert max(numel for shared, numel in saved if not shared) <= 15 * 5
    value.sum().backward()
    ref = student.detach().clone().requires_grad_(True)
    want = topk_divergence(ref, indices, logprobs, "skew_reverse_kl", **PARAMS)
    want.sum().backward()
    torch.testing.assert_close(value, want)
    torch.testing.assert_close(base.grad[:, :-1, :32], ref.grad)
    assert (base.grad[:, -1] == 0).all() and (base.grad[..., 32:] == 0).all()


def test_log1mexp() -> None:
    a = torch.tensor([-1e-10, -1e-3, -0.5, -0.7, -1.0, -30.0, -800.0, NEG_INF], dtype=torch.float64)
    a.requires_grad_(True)
    got = log1mexp(a)
    # log(1 − e^a) ≈ log(−a) for a → 0⁻ and ≈ −e^a for a → −∞: both regimes to full precision.
    want = [
        math.log(1e-10) - 5e-11,
        math.log(-math.expm1(-1e-3)),
        math.log(-math.expm1(-0.5)),
        math.log1p(-math.exp(-0.7)),
        math.log1p(-math.exp(-1.0)),
        -math.exp(-30.0) - math.exp(-60.0) / 2,
        -0.0,
        0.0,
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    got.sum().backward()
    assert torch.isfinite(a.grad).all()
    edge = torch.tensor([0.0, 1e-7], requires_grad=True)
    out = log1mexp(edge)
    out.sum().backward()
    assert torch.isneginf(out).all() and (edge.grad == 0).all()


def test_validation() -> None:
    student = torch.zeros(2, 5)
    ids, lps = torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), -1.0)
    lps6 = torch.full((2, 6), -2.0)
    ok = dict(student_logits=student, teacher_indices=ids, teacher_logprobs=lps)
    cases = [
        (dict(kind="kl"), r"forward_kl.*skew_reverse_kl"),
        (dict(kind="jsd", beta=0.0), "identically 0"),
        (dict(kind="tvd", temperature=-1.0), "temperature"),
        (dict(teacher_indices=ids.float()), "integer"),
        (dict(teacher_logprobs=lps[:, :1]), r"shape \[\.\.\., k\]"),
        (dict(teacher_indices=ids[:1], teacher_logprobs=lps[:1]), r"\(2,\)"),
        (
            dict(teacher_indices=torch.zeros(2, 6, dtype=torch.long), teacher_logprobs=lps6),
            r"k=6 must be in \[1, V=5\]",
        ),
        (dict(teacher_indices=torch.tensor([[0, 5], [2, 3]])), r"in \[0, V=5\)"),
        (dict(teacher_indices=torch.tensor([[0, -1], [2, 3]])), r"in \[0, V=5\)"),
        (dict(teacher_indices=torch.tensor([[1, 1], [2, 3]])), "distinct"),
    ]
    for change, message in cases:
        kw = {"kind": "forward_kl", **ok, **change}
        with pytest.raises(OpdistillError, match=message) as info:
            topk_divergence(**kw)
        assert "\n" not in str(info.value)
