"""Tests for opdistill.eval.metrics."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opdistill.eval import (
    avg_at_k,
    distinct_correct,
    distinct_n,
    mean_distinct_correct,
    pass_at_k,
    pass_at_k_curve,
)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_matches_binomial_formula() -> None:
    n, c, k = 200, 13, 50
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_edge_cases() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c = 3 < k
    assert pass_at_k(1, 1, 1) == 1.0


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(5, -1, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1), (5, 2.0, 1), (5, True, 1)],
)
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@st.composite
def nck(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(1, 300))
    c = draw(st.integers(0, n))
    k = draw(st.integers(1, n))
    return n, c, k


@given(nck())
def test_pass_at_k_monotone_in_k(args: tuple[int, int, int]) -> None:
    n, c, k = args
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12


@given(nck())
def test_pass_at_k_monotone_in_c(args: tuple[int, int, int]) -> None:
    n, c, k = args
    if c < n:
        assert pass_at_k(n, c + 1, k) >= pass_at_k(n, c, k) - 1e-12


@given(nck())
def test_pass_at_1_is_fraction_correct(args: tuple[int, int, int]) -> None:
    n, c, _ = args
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


def test_pass_at_k_curve_is_mean_over_prompts() -> None:
    counts = [0, 2, 4]
    curve = pass_at_k_curve(counts, n=4, ks=[1, 2, 4])
    assert list(curve) == [1, 2, 4]
    assert curve[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[2] == pytest.approx((0 + brute_pass_at_k(4, 2, 2) + 1) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        pass_at_k_curve([], n=4, ks=[1])


def test_avg_at_k_is_mean_over_all_samples() -> None:
    flags = [[True, False, False, False], [True, True, True, True]]
    assert avg_at_k(flags) == pytest.approx(5 / 8)
    assert avg_at_k([[False, False]]) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


def test_distinct_correct() -> None:
    assert distinct_correct([]) == 0
    assert distinct_correct(["a b", "a b", "c"]) == 2
    assert distinct_correct(iter(["x"])) == 1
    assert mean_distinct_correct([["a", "a"], ["a", "b", "c"], []]) == pytest.approx(4 / 3)
    assert mean_distinct_correct([]) == 0.0


def test_distinct_n_hand_examples() -> None:
    assert distinct_n(["a b c"], 1) == 1.0
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    # unigrams: the cat sat the cat ran -> 6 total, {the, cat, sat, ran} unique
    assert distinct_n(["the cat sat", "the cat ran"], 1) == pytest.approx(4 / 6)
    # bigrams do not cross texts: (the cat) (cat sat) (the cat) (cat ran) -> 3 / 4
    assert distinct_n(["the cat sat", "the  cat\nran"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["one two"], 3) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)
