import json

import pytest

from opdistill.cli import main
from opdistill.experiments.multi_teacher import METHODS


@pytest.mark.slow
def test_quick_multi_teacher_suite_reports_each_task(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--suite", "multi-teacher", "--quick", "--seeds", "1"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(METHODS) <= set(results["summary"])
    for method in METHODS:
        assert {"accuracy/graph", "accuracy/arithmetic"} <= set(results["summary"][method])
    assert "| both teachers, routed by task (RKL) |" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_cross_tokenizer_suite_runs_every_method(tmp_path, capsys):
    from opdistill.experiments.cross_tokenizer import METHODS as CROSS_METHODS

    out = tmp_path / "out"
    argv = ["demo", "--suite", "cross-tokenizer", "--quick", "--seeds", "1"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(CROSS_METHODS) | {"char-level teacher"} <= set(results["summary"])
    assert "| char teacher: ULD |" in capsys.readouterr().out
