"""The teacher-hacking flag on synthetic metric sequences."""

from __future__ import annotations

import pytest

from opdistill.config import EvalConfig
from opdistill.errors import OpdistillError
from opdistill.eval.monitor import (
    EvalRecords,
    TeacherHackingMonitor,
    hacking_monitor,
    is_teacher_hacking,
    slope,
)
from opdistill.tasks import Example, UserDataTask, make_task


def test_slope_is_least_squares():
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert slope([3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert slope([5.0]) == 0.0


@pytest.mark.parametrize(
    ("proxy", "golden", "tolerance", "expected"),
    [
        ([1.0, 0.8, 0.6, 0.5], [0.3, 0.35, 0.4, 0.5], 0.0, True),  # the textbook case
        ([1.0, 0.8, 0.6, 0.5], [0.5, 0.4, 0.35, 0.3], 0.0, False),  # both improve
        ([1.0, 1.1, 1.2, 1.3], [0.3, 0.35, 0.4, 0.5], 0.0, False),  # both worsen
        ([1.0, 1.0, 1.0, 1.0], [0.3, 0.35, 0.4, 0.5], 0.0, False),  # proxy flat
        ([1.0, 0.8, 0.6, 0.5], [0.3, 0.31, 0.3, 0.31], 0.01, False),  # golden within noise
        ([1.0, 0.8, 0.6, 0.5], [0.3, 0.31, 0.3, 0.31], 0.0, True),
        ([1.0, 0.9], [0.2, 0.3], 0.0, True),
        ([1.0], [0.2], 0.0, False),  # one point is no trend
    ],
)
def test_is_teacher_hacking(proxy, golden, tolerance, expected):
    assert is_teacher_hacking(proxy, golden, tolerance) is expected


def test_is_teacher_hacking_needs_aligned_sequences():
    with pytest.raises(ValueError):
        is_teacher_hacking([1.0, 0.5], [0.1])


def test_monitor_fires_only_over_a_full_window_of_the_recent_evaluations(capsys):
    monitor = TeacherHackingMonitor(window=3)
    # first the student improves on both; then the proxy goes on improving, the golden worsens
    proxy = [2.0, 1.5, 1.2, 1.0, 0.9, 0.8]
    golden = [3.0, 2.0, 1.5, 1.6, 1.8, 2.1]
    flags = []
    for step, (p, g) in enumerate(zip(proxy, golden, strict=True), start=1):
        out = monitor.observe(10 * step, {"teacher_rkl": p, "golden_kl": g, "accuracy": 0.5})
        flags.append(out.get("teacher_hacking"))
    assert flags == [None, None, 0.0, 0.0, 1.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("teacher hacking at step") == 2
    assert "teacher hacking at step 50: since step 30 teacher_rkl went 1.2 -> 0.9" in err


def test_monitor_skips_evaluations_without_both_metrics():
    monitor = TeacherHackingMonitor(window=2, verbose=False)
    assert monitor.update(1, {"golden_kl": 1.0}) == {}
    assert monitor.update(2, {"teacher_rkl": 1.0}) == {}
    assert monitor.history == []


def test_hacking_monitor_from_config():
    graph = make_task("graph", num_nodes=8)
    assert hacking_monitor(EvalConfig(), graph) is None
    monitor = hacking_monitor(EvalConfig(golden=True, hacking_window=5), graph)
    assert monitor is not None and monitor.window == 5
    with pytest.raises(OpdistillError, match=r"eval\.golden"):
        hacking_monitor(EvalConfig(golden=True), UserDataTask([Example("a b"), Example("c d")]))


def test_eval_records_add_seconds_and_the_flag():
    graph = make_task("graph", num_nodes=8)
    records = EvalRecords(EvalConfig(golden=True, hacking_window=2), graph, verbose=False)
    first = records.record(5, {"teacher_rkl": 1.0, "golden_kl": 1.0}, train_seconds=2.5)
    assert first["train_seconds"] == 2.5 and first["wall_seconds"] >= 0
    assert "teacher_hacking" not in first
    second = records.record(10, {"teacher_rkl": 0.5, "golden_kl": 1.5}, train_seconds=5.0)
    assert second["teacher_hacking"] == 1.0
    plain = EvalRecords(EvalConfig(), graph).record(5, {"accuracy": 0.5}, 1.0)
    assert set(plain) == {"accuracy", "train_seconds", "wall_seconds"}


def test_config_bounds_of_the_monitor():
    from opdistill.config import config_from_dict

    base = {"model": {"student": "s", "teacher": "t"}}
    assert config_from_dict({**base, "eval": {"golden": True}}).eval.hacking_window == 4
    with pytest.raises(OpdistillError, match=r"eval\.hacking_window"):
        config_from_dict({**base, "eval": {"hacking_window": 1}})
    with pytest.raises(OpdistillError, match=r"eval\.hacking_tolerance"):
        config_from_dict({**base, "eval": {"hacking_tolerance": -0.1}})
