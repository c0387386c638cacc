import json

import pytest

from opdistill.cli import main
from opdistill.experiments.demo import METHODS, OBJECTIVES
from opdistill.experiments.self_distill import SelfDistillSettings, methods


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    """The whole demo pipeline at smoke-test size: prepare, every method, table, JSON and plot."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    args = ["demo", "--quick", "--seeds", "2", "--output-dir", str(out), "--cache-dir", str(cache)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "GKD on-policy (λ=1, RKL)" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"teacher", "initial student", *METHODS}
    assert all(len(results["per_seed"][m]) == 2 for m in METHODS)
    assert (out / "pass_at_k.png").stat().st_size > 1000
    # A second run reuses the cached teacher and student.
    assert main([*args[:3], "1", *args[4:]]) == 0
    assert "using the cached teacher" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_objectives_suite(tmp_path, capsys):
    """Every objective on both tasks, at smoke-test size."""
    out = tmp_path / "suite"
    args = [
        "demo",
        "--suite",
        "objectives",
        "--quick",
        "--seeds",
        "1",
        "--output-dir",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    for task in ("graph", "arithmetic"):
        assert all(f"{task} · {m}" in results["summary"] for m in OBJECTIVES)
        assert (out / f"pass_at_k_{task}.png").exists()
    assert "s/step" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_self_distill_suite(tmp_path, capsys):
    """Base student, every method, in- and out-of-distribution evaluation, table and plots."""
    out = tmp_path / "suite"
    args = ["demo", "--suite", "self-distill", "--quick", "--seeds", "1"]
    assert main([*args, "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    names = {"teacher", "base student", *methods(SelfDistillSettings.quick())}
    assert set(results["summary"]) == names
    assert results["ood_prompts"] > 0
    for name in names:
        metrics = results["per_seed"][name][0]
        assert {"pass@1", "pass@4", "ood pass@1", "ood pass@4", "self_bleu"} <= set(metrics)
    for plot in ("pass_at_k.png", "pass_at_k_ood.png"):
        assert (out / plot).stat().st_size > 1000
    assert "| self-distill, uniform distinct demo |" in capsys.readouterr().out
