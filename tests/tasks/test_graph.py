"""Graph path-finding task: generation, splits, verifier, knobs, and the task registry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from opdistill.errors import OpdistillError
from opdistill.tasks import TASK_NAMES, ArithmeticTask, GraphTask, make_task
from opdistill.tasks.graph import parse_path, simple_paths


@pytest.fixture(scope="module")
def task() -> GraphTask:
    return GraphTask()


@pytest.fixture(scope="module")
def train(task: GraphTask):
    return task.examples("train", 500, seed=0)


@pytest.fixture(scope="module")
def evals(task: GraphTask):
    return task.examples("eval", 100, seed=0)


def test_deterministic_per_seed(task: GraphTask) -> None:
    a = task.examples("train", 20, seed=3)
    assert a == task.examples("train", 20, seed=3)
    assert a != task.examples("train", 20, seed=4)
    assert a[:5] == task.examples("train", 5, seed=3)


def test_deterministic_across_processes() -> None:
    code = (
        "from opdistill.tasks import GraphTask;"
        "print([e.prompt + e.completion for e in GraphTask().examples('eval', 5, seed=1)])"
    )
    outs = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(res.stdout)
    assert len(outs) == 1


def test_splits_disjoint(train, evals) -> None:
    assert len(train) == 500 and len(evals) == 100
    train_prompts = {e.prompt for e in train}
    assert len(train_prompts) == 500
    assert not train_prompts & {e.prompt for e in evals}
    # also across seeds and knob settings: the split is a fixed partition of prompt texts
    other = GraphTask(num_distractors=2).examples("train", 200, seed=9)
    assert not {e.prompt for e in other} & {e.prompt for e in evals}


def test_bad_split_and_n(task: GraphTask) -> None:
    with pytest.raises(OpdistillError, match="split"):
        task.examples("test", 3)
    with pytest.raises(OpdistillError, match="n"):
        task.examples("train", -1)
    assert task.examples("train", 0) == []


def test_meta_and_format(train) -> None:
    for ex in train:
        m = ex.meta
        assert ex.prompt.startswith(f"path from {m['start']} to {m['goal']} . edges: ")
        assert ex.prompt.endswith(" .")
        for u, v in m["edges"]:
            assert f"{u}>{v}" in ex.prompt
        assert len(set(m["edges"])) == len(m["edges"])
        assert m["solutions"] == sorted(m["solutions"])
        assert ex.completion in m["solutions"]
        assert ex.reference == ex.completion
        # solutions are exactly the simple paths
        assert m["solutions"] == sorted(
            " ".join(p) for p in simple_paths(m["edges"], m["start"], m["goal"], 10_000)
        )


def test_verifier_accepts_solutions(task: GraphTask, train, evals) -> None:
    for ex in train + evals:
        assert len(ex.meta["solutions"]) >= task.min_paths
        assert task.is_correct(ex, ex.completion)
        for sol in ex.meta["solutions"]:
            assert task.is_correct(ex, sol)
            assert task.is_correct(ex, "  " + sol.replace(" ", "   ") + " \n")
            assert task.solution_key(ex, f" {sol.replace(' ', '  ')} ") == sol


def _example(task: GraphTask):
    return task.examples("train", 1, seed=0)[0]


def test_verifier_rejects(task: GraphTask) -> None:
    ex = _example(task)
    m = ex.meta
    s, g = m["start"], m["goal"]
    sol = ex.completion.split()
    edges = set(m["edges"])
    nodes = sorted({x for e in edges for x in e})
    # missing edge
    non = next(x for x in nodes if x not in (s, g) and (s, x) not in edges)
    assert not task.is_correct(ex, f"{s} {non} {g}")
    assert not task.is_correct(ex, f"{s} {g}")  # no direct edge at default path_length
    # wrong start / goal / truncated
    assert not task.is_correct(ex, " ".join(sol[1:]))
    assert not task.is_correct(ex, " ".join(sol[:-1]))
    assert not task.is_correct(ex, " ".join(reversed(sol)))
    # garbage and extra text
    for bad in ["", "   ", "hello", f"{ex.completion} .", f"path: {ex.completion}", "A-B", "a c"]:
        assert not task.is_correct(ex, bad)
    assert not task.is_correct(ex, ex.completion.replace(" ", ""))


def test_verifier_rejects_repeated_node() -> None:
    task = GraphTask()
    ex = task.examples("train", 1)[0]
    # a graph with a cycle through the path: A>B B>C C>B B>G
    edges = [("A", "B"), ("B", "C"), ("C", "B"), ("B", "G")]
    cyc = type(ex)(prompt="p", meta={"edges": edges, "start": "A", "goal": "G", "solutions": []})
    assert task.is_correct(cyc, "A B G")
    assert not task.is_correct(cyc, "A B C B G")


def test_parse_path() -> None:
    assert parse_path(" A  C\tG ") == ["A", "C", "G"]
    assert parse_path("A C g") is None
    assert parse_path("AC G") is None
    assert parse_path("") is None


@pytest.mark.parametrize("length", [1, 2, 3, 5])
def test_path_length_knob(length: int) -> None:
    paths = 1 if length == 1 else 2
    task = GraphTask(path_length=length, min_paths=1, max_paths=paths, num_nodes=16)
    for ex in task.examples("train", 30, seed=1):
        assert len(ex.completion.split()) == length + 1
        assert task.is_correct(ex, ex.completion)


def test_paths_knobs() -> None:
    task = GraphTask(min_paths=3, max_paths=3, num_distractors=0)
    for ex in task.examples("train", 30):
        assert len(ex.meta["solutions"]) == 3
        assert len(ex.meta["edges"]) == 6
    more = GraphTask(num_distractors=8).examples("train", 30)
    assert all(len(e.meta["edges"]) >= 12 for e in more)


def test_num_nodes_knob() -> None:
    for ex in GraphTask(num_nodes=6, max_paths=3).examples("train", 30):
        assert len({x for e in ex.meta["edges"] for x in e}) <= 6


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [
        ({"num_nodes": 27}, "num_nodes"),
        ({"num_nodes": 1}, "num_nodes"),
        ({"num_nodes": "12"}, "num_nodes"),
        ({"path_length": 0}, "path_length"),
        ({"min_paths": 0}, "min_paths"),
        ({"min_paths": 3, "max_paths": 2}, "max_paths"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"path_length": 1}, "max_paths"),
        ({"num_nodes": 5, "path_length": 3}, "num_nodes"),
        ({"path_length": True}, "path_length"),
    ],
)
def test_invalid_knobs(kwargs: dict, knob: str) -> None:
    with pytest.raises(OpdistillError, match=knob):
        GraphTask(**kwargs)


def test_registry() -> None:
    assert set(TASK_NAMES) == {"graph", "arithmetic", "chain", "jsonl", "hf"}
    assert make_task("graph", path_length=3) == GraphTask(path_length=3)
    assert isinstance(make_task("arithmetic"), ArithmeticTask)
    with pytest.raises(OpdistillError, match=r"unknown task 'grpah' \(valid: graph, arithmetic"):
        make_task("grpah")
    with pytest.raises(OpdistillError, match=r"unknown option 'foo' for task 'graph' \(valid: "):
        make_task("graph", foo=1)
    with pytest.raises(OpdistillError, match="max_paths"):
        make_task("graph", max_paths=0)
    with pytest.raises(OpdistillError, match="train_path"):
        make_task("jsonl")


def test_block_path_redirects_its_last_edge_to_a_dead_end():
    task = GraphTask(num_nodes=8, path_length=2, min_paths=2, max_paths=3)
    blocked = 0
    for example in task.examples("eval", 30):
        common = example.meta["solutions"][0]
        shifted = task.block_path(example, common)
        if shifted is None:
            continue
        blocked += 1
        u, v = common.split()[-2:]
        assert f"{u}>{v}" not in shifted.prompt
        assert len(shifted.meta["edges"]) == len(example.meta["edges"])
        assert task.is_correct(example, common) and not task.is_correct(shifted, common)
        assert set(shifted.meta["solutions"]) < set(example.meta["solutions"])
        assert all(task.is_correct(shifted, s) for s in shifted.meta["solutions"])
        assert task.is_correct(shifted, shifted.completion)
    assert blocked >= 25


def test_golden_distribution_is_uniform_over_every_valid_path() -> None:
    task = GraphTask(num_nodes=10, path_length=2, min_paths=2, max_paths=4)
    for example in task.examples("eval", 20):
        golden = task.golden_distribution(example)
        assert set(golden) == set(example.meta["solutions"])
        assert all(task.is_correct(example, path) for path in golden)
        assert len(set(golden.values())) == 1
        assert sum(golden.values()) == pytest.approx(1.0)
