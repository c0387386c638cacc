"""The diagnosis and teacher-hacking experiments: the skewed teacher data, and smoke runs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from opdistill.cli import main
from opdistill.experiments.teacher_hacking import skewed_examples
from opdistill.tasks import make_task


def test_skewed_examples_prefer_the_first_valid_path():
    task = make_task("graph", num_nodes=10, path_length=2, min_paths=2, max_paths=4)
    examples = task.examples("train", 400)
    for skew, low, high in ((1.0, 1.0, 1.0), (0.9, 0.88, 0.99), (0.0, 0.2, 0.6)):
        skewed = skewed_examples(examples, skew)
        firsts = Counter(e.completion == e.meta["solutions"][0] for e in skewed)
        share = firsts[True] / len(skewed)
        assert low <= share <= high
        assert all(task.is_correct(e, e.completion) for e in skewed)
        assert [e.prompt for e in skewed] == [e.prompt for e in examples]
    assert skewed_examples(examples, 0.5) == skewed_examples(examples, 0.5)
    with pytest.raises(ValueError):
        skewed_examples(examples, 1.5)


@pytest.mark.slow
def test_quick_diagnosis(tmp_path, capsys):
    out = tmp_path / "diagnose"
    argv = ["experiment", "diagnose", "--quick", "--cache-dir", str(tmp_path / "cache")]
    argv += ["--output-dir", str(out), "--num-prompts", "3", "--num-samples", "2"]
    argv += ["--methods", "SFT", "GKD (λ=1, RKL)", "--eval-every", "1", "--fractions", "0,0.5"]
    assert main(argv) == 0
    results = json.loads((out / "diagnosis.json").read_text())
    assert set(results["diagnosis"]) == {
        "teacher",
        "initial student",
        "SFT seed0",
        "GKD (λ=1, RKL) seed0",
    }
    row = results["diagnosis"]["SFT seed0"]
    assert {"recovery@0", "recovery@0.5", "truncated_fraction", "sample_golden_accuracy"} <= set(
        row
    )
    assert (out / "curve_golden_kl.png").stat().st_size > 1000
    assert "| model |" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_teacher_hacking(tmp_path):
    out = tmp_path / "hacking"
    argv = ["experiment", "teacher-hacking", "--quick", "--cache-dir", str(tmp_path / "cache")]
    argv += ["--output-dir", str(out), "--methods", "GKD (λ=1, RKL)", "--eval-every", "1"]
    argv += ["--window", "2"]
    assert main(argv) == 0
    results = json.loads((out / "teacher_hacking.json").read_text())
    run = results["runs"]["GKD (λ=1, RKL) seed0"]
    assert run["evaluations"] == 3 and {"golden_kl", "teacher_rkl"} <= set(run)
    records = (out / "runs" / "gkd-λ-1-rkl-seed0" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(r) for r in records if '"eval"' in r]
    assert [("teacher_hacking" in r) for r in evals] == [False, True, True]
    assert (tmp_path / "cache" / "demo-imperfect-teacher-skew0.9-quick" / "COMPLETE").exists()
