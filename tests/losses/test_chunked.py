from __future__ import annotations

import pytest
import torch

import opdistill.losses.chunked as chunked_module
from opdistill.errors import OpdistillError
from opdistill.losses import DIVERGENCE_KINDS, chunked_token_divergence, token_divergence

NEG_INF = float("-inf")
PARAMS = dict(beta=0.3, alpha=0.2)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _value_and_grad(fn, student, teacher, weights, **kw):
    s = student.detach().clone().requires_grad_(True)
    out = fn(s, teacher, **kw)
    (out * weights).sum().backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("chunk_size", [0, 1, 4, 15, 100])
def test_values_and_gradients_match_token_divergence(kind: str, chunk_size: int) -> None:
    student, teacher = _logits(3, 5, 7, seed=1), _logits(3, 5, 7, seed=2)
    weights = _logits(3, 5, seed=3)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        for temperature in (1.0, 1.7):
            for alpha in (0.0, 0.2):
                kw = dict(kind=kind, beta=0.3, alpha=alpha, temperature=temperature)
                args = (student.to(dtype), teacher.to(dtype), weights.to(dtype))
                want, want_grad = _value_and_grad(token_divergence, *args, **kw)
                got, got_grad = _value_and_grad(
                    chunked_token_divergence, *args, **kw, chunk_size=chunk_size
                )
                assert got.dtype == want.dtype and got_grad.dtype == dtype
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
                torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol)


def test_automatic_chunks_cover_every_position(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 20)  # 2 positions of V = 8 per chunk
    student, teacher, weights = _logits(7, 8, seed=4), _logits(7, 8, seed=5), _logits(7, seed=6)
    want, want_grad = _value_and_grad(token_divergence, student, teacher, weights, kind="jsd")
    got, got_grad = _value_and_grad(chunked_token_divergence, student, teacher, weights, kind="jsd")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("side", ["student", "teacher", "both"])
def test_neg_inf_logits_match_token_divergence(kind: str, side: str) -> None:
    student, teacher = _logits(4, 6, seed=7), _logits(4, 6, seed=8)
    banned = torch.zeros(4, 6, dtype=torch.bool)
    banned[0, [1, 4]] = banned[1, 0] = banned[2, [2, 3, 5]] = True
    if side in ("student", "both"):
        student = student.masked_fill(banned, NEG_INF)
    if side in ("teacher", "both"):
        teacher = teacher.masked_fill(banned, NEG_INF)
    weights = _logits(4, seed=9)
    want, want_grad = _value_and_grad(token_divergence, student, teacher, weights, kind=kind)
    got, got_grad = _value_and_grad(
        chunked_token_divergence, student, teacher, weights, kind=kind, chunk_size=3
    )
    torch.testing.assert_close(got, want)  # equal infinities included
    finite = torch.isfinite(want)
    torch.testing.assert_close(got_grad[finite], want_grad[finite])
    if side != "teacher":
        assert (got_grad[banned & finite[:, None]] == 0).all()
    if side == "both":
        assert finite.all()


def test_inf_where_the_true_value_is_inf() -> None:
    student = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.1, NEG_INF]])
    teacher = torch.tensor([[NEG_INF, 0.3, 0.2], [0.3, 0.2, 0.1]])
    rkl = chunked_token_divergence(student, teacher, "reverse_kl")
    fkl = chunked_token_divergence(student, teacher, "forward_kl")
    assert torch.isinf(rkl[0]) and torch.isfinite(rkl[1])
    assert torch.isfinite(fkl[0]) and torch.isinf(fkl[1])
    for kind in ("jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"):
        assert torch.isfinite(chunked_token_divergence(student, teacher, kind, **PARAMS)).all()


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6), (0, 6)])
def test_shapes(shape: tuple[int, ...]) -> None:
    student, teacher = _logits(*shape, seed=10), _logits(*shape, seed=11)
    student.requires_grad_(True)
    out = chunked_token_divergence(student, teacher, "reverse_kl", chunk_size=2)
    assert out.shape == shape[:-1]
    torch.testing.assert_close(out, token_divergence(student, teacher, "reverse_kl"))
    out.sum().backward()
    assert student.grad.shape == shape


def test_inputs_without_grad_save_nothing() -> None:
    student, teacher = _logits(3, 5, seed=12), _logits(3, 5, seed=13)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = chunked_token_divergence(student, teacher, "forward_kl")
        assert out.grad_fn is None
        with torch.no_grad():
            out = chunked_token_divergence(student.requires_grad_(True), teacher, "forward_kl")
        assert out.grad_fn is None
    assert saved == []
    torch.testing.assert_close(out, token_divergence(student, teacher, "forward_kl"))


def test_no_gradient_reaches_the_teacher() -> None:
    student = _logits(2, 5, seed=14).requires_grad_(True)
    teacher = _logits(2, 5, seed=15).requires_grad_(True)
    chunked_token_divergence(student, teacher, "jsd").sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_low_precision_inputs_compute_in_fp32() -> None:
    student, teacher = _logits(3, 8, seed=16).float(), _logits(3, 8, seed=17).float()
    s = student.bfloat16().requires_grad_(True)
    out = chunked_token_divergence(s, teacher.bfloat16(), "reverse_kl")
    out.sum().backward()
    assert out.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    ref = student.bfloat16().requires_grad_(True)
    want = token_divergence(ref, teacher.bfloat16(), "reverse_kl")
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s.grad, ref.grad)


def _saved_bytes(fn) -> int:
    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_saves_one_fp32_gradient_only(kind: str) -> None:
    n, vocab = 32, 512
    student = _logits(n, vocab, seed=18).float().requires_grad_(True)
    teacher = _logits(n, vocab, seed=19).float()
    one_copy = n * vocab * 4
    lean = _saved_bytes(lambda: chunked_token_divergence(student, teacher, kind, **PARAMS))
    full = _saved_bytes(lambda: token_divergence(student, teacher, kind, **PARAMS))
    assert one_copy <= lean <= one_copy + 1024
    assert full >= 2 * one_copy


def test_sliced_logits_are_read_without_a_full_copy() -> None:
    # Logits [B, R + 1, V'] cut to [B, R, V]: the leading dimensions do not flatten into a view.
    base = _logits(4, 9, 300, seed=24).float().requires_grad_(True)
    student, teacher = base[:, :-1, :256], _logits(4, 9, 300, seed=25).float()[:, :-1, :256]
    weights = _logits(4, 8, seed=26).float()
    got = []
    lean = _saved_bytes(
        lambda: got.append(chunked_token_divergence(student, teacher, "tvd", chunk_size=5))
    )
    assert lean == 32 * 256 * 4
    (got[0] * weights).sum().backward()
    want, want_grad = _value_and_grad(token_divergence, student, teacher, weights, kind="tvd")
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(base.grad[:, :-1, :256], want_grad)
    assert (base.grad[:, -1] == 0).all() and (base.grad[..., 256:] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_gradcheck(kind: str) -> None:
    student = _logits(2, 3, 5, seed=20).requires_grad_(True)
    teacher = _logits(2, 3, 5, seed=21)
    # The backward scales its saved gradient in place; gradcheck runs it many times on one graph,
    # so each run gets a copy.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.clone()):
        assert torch.autograd.gradcheck(
            lambda s: chunked_token_divergence(
                s, teacher, kind, **PARAMS, temperature=1.5, chunk_size=4
            ),
            (student,),
        )


def test_second_backward_through_the_same_graph_is_refused() -> None:
    student = _logits(2, 5, seed=22).requires_grad_(True)
    loss = chunked_token_divergence(student, _logits(2, 5, seed=23), "forward_kl").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_validation() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(OpdistillError, match=r"forward_kl.*skew_reverse_kl"):
        chunked_token_divergence(logits, logits, "kl")
    with pytest.raises(OpdistillError, match="same shape"):
        chunked_token_divergence(logits, torch.zeros(2, 4), "forward_kl")
    with pytest.raises(OpdistillError, match="identically 0"):
        chunked_token_divergence(logits, logits, "jsd", beta=1.0)
    with pytest.raises(OpdistillError, match="temperature"):
        chunked_token_divergence(logits, logits, "tvd", temperature=0.0)
    for bad in (-1, 2.5, True):
        with pytest.raises(OpdistillError, match="chunk_size"):
            chunked_token_divergence(logits, logits, "tvd", chunk_size=bad)
