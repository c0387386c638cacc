"""Tests for opdistill.eval.report."""

from __future__ import annotations

import numpy as np
import pytest

from opdistill.eval import markdown_table, summarise, summarise_curves


def test_summarise_matches_numpy() -> None:
    per_seed = {
        "gkd": [{"pass@1": 0.4, "avg@8": 0.35}, {"pass@1": 0.6, "avg@8": 0.45}, {"pass@1": 0.5}],
        "sft": [{"pass@1": 0.3, "avg@8": 0.25}],
    }
    summary = summarise(per_seed)
    assert list(summary) == ["gkd", "sft"]
    assert list(summary["gkd"]) == ["pass@1", "avg@8"]
    mean, std = summary["gkd"]["pass@1"]
    assert mean == pytest.approx(np.mean([0.4, 0.6, 0.5]))
    assert std == pytest.approx(np.std([0.4, 0.6, 0.5], ddof=0))
    mean, std = summary["gkd"]["avg@8"]
    assert mean == pytest.approx(0.4)
    assert std == pytest.approx(np.std([0.35, 0.45]))
    assert summary["sft"]["pass@1"] == (pytest.approx(0.3), 0.0)
    with pytest.raises(ValueError):
        summarise({"empty": []})


def test_summarise_curves() -> None:
    curves = summarise_curves([{1: 0.2, 2: 0.4}, {1: 0.4, 2: 0.6}])
    assert list(curves) == [1, 2]
    assert curves[1] == (pytest.approx(0.3), pytest.approx(0.1))
    assert curves[2] == (pytest.approx(0.5), pytest.approx(0.1))


def test_markdown_table_layout() -> None:
    summary = {
        "teacher": {"pass@1": (0.5, 0.1), "avg@8": (0.25, 0.0)},
        "gkd": {"pass@1": (0.123456, 0.01)},
    }
    table = markdown_table(summary, ["pass@1", "avg@8"], headers={"avg@8": "avg@8 (acc)"})
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[0] == "| method | pass@1 | avg@8 (acc) |"
    assert set(lines[1].replace("|", "").replace(" ", "")) <= set("-:")
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2] == "| teacher | 0.500 ± 0.100 | 0.250 ± 0.000 |"
    assert lines[3] == "| gkd | 0.123 ± 0.010 | – |"


def test_markdown_table_digits_and_order() -> None:
    summary = {"b": {"m": (1.0, 0.5)}, "a": {"m": (2.0, 0.3)}}
    lines = markdown_table(summary, ["m"], digits=1).strip().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["b", "a"]
    assert lines[3] == "| a | 2.0 ± 0.3 |"
