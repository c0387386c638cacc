"""Learning curves from run directories, and `opdistill plot` on tiny real runs."""

from __future__ import annotations

import json

import pytest

from opdistill.cli import main
from opdistill.errors import OpdistillError
from opdistill.eval.curves import group_name, learning_curves, run_curve


def write_run(directory, records):
    directory.mkdir(parents=True)
    lines = [json.dumps({"split": "eval", **r}) for r in records]
    lines.insert(1, json.dumps({"step": 1, "split": "train", "loss": 1.0}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n{torn")


def test_seeds_of_a_method_are_averaged_per_step(tmp_path):
    for seed, (a, b) in enumerate([(0.2, 0.6), (0.4, 0.8)]):
        write_run(
            tmp_path / f"gkd-rkl-seed{seed}",
            [
                {"step": 5, "accuracy": a, "train_seconds": 1.0 + seed},
                {"step": 10, "accuracy": b, "train_seconds": 3.0 + seed},
            ],
        )
    write_run(tmp_path / "sft-seed0", [{"step": 5, "accuracy": 0.5, "train_seconds": 0.5}])
    runs = sorted(tmp_path.iterdir())
    curves = learning_curves(runs, "accuracy")
    assert list(curves) == ["gkd-rkl", "sft"]
    assert curves["gkd-rkl"] == [
        (5.0, pytest.approx(0.3), pytest.approx(0.1)),
        (10.0, pytest.approx(0.7), pytest.approx(0.1)),
    ]
    assert curves["sft"] == [(5.0, 0.5, 0.0)]
    seconds = learning_curves(runs, "accuracy", x="seconds")
    assert [x for x, _, _ in seconds["gkd-rkl"]] == [1.5, 3.5]
    assert len(learning_curves(runs, "accuracy", group=False)) == 3
    assert group_name(tmp_path / "a-b-seed12") == "a-b"


def test_bad_run_directories_name_the_problem(tmp_path):
    with pytest.raises(OpdistillError, match=r"no metrics\.jsonl"):
        run_curve(tmp_path, "accuracy")
    write_run(tmp_path / "r", [{"step": 5, "accuracy": 0.5}])
    with pytest.raises(OpdistillError, match="'pass@1'"):
        run_curve(tmp_path / "r", "pass@1")
    with pytest.raises(OpdistillError, match="train_seconds"):
        run_curve(tmp_path / "r", "accuracy", x="seconds")
    with pytest.raises(OpdistillError, match="--x"):
        run_curve(tmp_path / "r", "accuracy", x="tokens")


def test_plot_cli_on_tiny_runs_with_golden_metrics(tmp_path, saved_pair, capsys):
    runs = []
    for seed in (0, 1):
        out = tmp_path / "runs" / f"jsd-seed{seed}"
        config = tmp_path / f"run{seed}.yaml"
        config.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {saved_pair / "teacher"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 50, eval_size: 4}}
loss: {{kind: jsd, beta: 0.9}}
train: {{steps: 3, batch_size: 2, max_new_tokens: 4, output_dir: {out}, progress: false,
         eval_every: 1, seed: {seed}, lr: 0.01}}
eval: {{num_prompts: 4, num_samples: 2, ks: [1, 2], max_new_tokens: 4, golden: true,
        hacking_window: 2}}
""")
        assert main(["train", str(config)]) == 0
        runs.append(out)
    capsys.readouterr()
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    for record in evals:
        assert {"accuracy", "pass@1", "golden_kl", "golden_mass", "teacher_rkl"} <= set(record)
        assert record["wall_seconds"] >= record["train_seconds"] > 0
    assert "teacher_hacking" not in evals[0]
    assert all(r["teacher_hacking"] in (0.0, 1.0) for r in evals[1:])
    assert [r["train_seconds"] for r in evals] == sorted(r["train_seconds"] for r in evals)

    png = tmp_path / "plots" / "golden.png"
    argv = ["plot", *map(str, runs), "--metric", "golden_kl", "--x", "seconds", "-o", str(png)]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "jsd: 3 points" in capsys.readouterr().out
    assert main(["plot", str(runs[0]), "--metric", "nope", "-o", str(png)]) == 2
    assert "no 'eval' record has 'nope'" in capsys.readouterr().err
