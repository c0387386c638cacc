"""Evaluation metrics: unbiased pass@k, avg@k, distinct correct solutions and distinct-n.

Everything here is a pure function of counts, flags or strings; no model or torch is involved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct.

    Equals 1 − C(n−c, k)/C(n, k), computed stably as 1 − Π_{i=n−c+1}^{n} (1 − k/i);
    1.0 when n − c < k (every k-subset holds a correct sample).
    Raises ValueError unless 0 ≤ c ≤ n and 1 ≤ k ≤ n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        _check_int(name, value)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_curve(correct_counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over prompts for each k in `ks`.

    `correct_counts[j]` is the number of correct samples among the `n` drawn for prompt j.
    Returns {k: mean pass@k} in the order of `ks`.
    """
    if len(correct_counts) == 0:
        raise ValueError("pass_at_k_curve needs at least one prompt")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


def avg_at_k(correct_flags: Sequence[Sequence[bool]]) -> float:
    """avg@k: mean accuracy over all samples of all prompts (`correct_flags[prompt][sample]`).

    This is the plain fraction of correct samples, kept separate from pass@k.
    """
    total = sum(len(flags) for flags in correct_flags)
    if total == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(sum(bool(f) for f in flags) for flags in correct_flags) / total


def distinct_correct(keys_of_correct_samples: Iterable[str]) -> int:
    """Number of distinct correct solutions for one prompt.

    Pass the `Task.solution_key` of each *correct* sample; duplicates are counted once.
    """
    return len(set(keys_of_correct_samples))


def mean_distinct_correct(keys_per_prompt: Sequence[Iterable[str]]) -> float:
    """`distinct_correct` averaged over prompts (0.0 for no prompts)."""
    if len(keys_per_prompt) == 0:
        return 0.0
    return sum(distinct_correct(keys) for keys in keys_per_prompt) / len(keys_per_prompt)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Lexical diversity: unique n-grams / total n-grams over whitespace tokens of all `texts`.

    N-grams never cross text boundaries. Returns 0.0 when there are no n-grams.
    """
    _check_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        for i in range(len(tokens) - n + 1):
            seen.add(tuple(tokens[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0
