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
