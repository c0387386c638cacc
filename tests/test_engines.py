"""The step's engine side: per-phase timing, the rollout backend choice, the sampler mismatch."""

import dataclasses
import json

import torch
from tests.test_trainer import make_config, models, small_trainer

from opdistill.config import LossConfig, RolloutConfig
from opdistill.run_log import StepStats, summarise_window
from opdistill.timing import PHASES, PhaseTimer


def test_phase_timer_accumulates_and_rejects_unknown_phases():
    timer = PhaseTimer()
    with timer.phase("teacher"):
        torch.ones(100, 100) @ torch.ones(100, 100)
    timer.add("teacher", 1.0)
    assert timer.seconds["teacher"] > 1.0
    assert set(timer.seconds) == set(PHASES)
    try:
        with timer.phase("nonsense"):
            pass
    except KeyError as error:
        assert "nonsense" in str(error)
    else:
        raise AssertionError("an unknown phase was accepted")


def test_window_summary_has_phase_seconds_and_tokens_per_second():
    stats = [
        StepStats(
            1.0,
            True,
            10,
            0.1,
            1e-3,
            2.0,
            phases={"generation": 0.5, "loss": 0.1},
            generated_tokens=10,
            sampler_mismatch=0.01,
        ),
        StepStats(
            1.0,
            True,
            30,
            0.1,
            1e-3,
            2.0,
            phases={"generation": 1.5, "loss": 0.3},
            generated_tokens=30,
            staleness=1.0,
        ),
    ]
    summary = summarise_window(stats)
    assert summary["seconds_generation"] == 1.0
    assert abs(summary["seconds_loss"] - 0.2) < 1e-12
    assert summary["generated_tokens_per_second"] == 20.0
    assert summary["sampler_mismatch"] == 0.01
    assert summary["staleness"] == 0.5


def test_metrics_record_every_phase_and_the_mismatch(tmp_path, tokenizer, graph_task):
    """sampled_token records the sampler's log-probs: the learner agrees with them (ρ = 1)."""
    config = make_config(tmp_path, steps=2)
    config.loss = LossConfig(kind="sampled_token")
    teacher, student = models(tokenizer)
    small_trainer(config, tokenizer, graph_task, teacher, student).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2
    for record in train:
        for phase in PHASES:
            assert record[f"seconds_{phase}"] >= 0.0
        assert record["seconds_generation"] > 0 and record["seconds_forward_backward"] > 0
        assert record["generated_tokens_per_second"] > 0
        assert record["sampler_mismatch"] < 1e-4
        assert record["staleness"] == 0.0
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_hf_static_backend_trains_like_the_hf_backend(tmp_path, tokenizer, graph_task):
    """Greedy-equivalent samplers aside, both backends give a finite run with ρ ≈ 1."""
    losses = {}
    for backend in ("hf", "hf_static"):
        config = make_config(tmp_path / backend, steps=3)
        config.loss = LossConfig(kind="sampled_token")
        config.rollout = RolloutConfig(backend=backend)
        teacher, student = models(tokenizer)
        trainer = small_trainer(config, tokenizer, graph_task, teacher, student)
        stats = [trainer.step() for _ in range(3)]
        losses[backend] = [s.loss for s in stats]
        assert all(s.sampler_mismatch is not None and s.sampler_mismatch < 1e-4 for s in stats)
        assert all(s.phases["generation"] > 0 for s in stats)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())


def test_rollout_config_is_typed(tmp_path):
    from opdistill.config import load_config
    from opdistill.errors import OpdistillError

    path = tmp_path / "c.yaml"
    path.write_text("model: {student: s, teacher: t}\nrollout: {backend: tgi}\n")
    try:
        load_config(path)
    except OpdistillError as error:
        assert "rollout.backend" in str(error) and "\n" not in str(error)
    else:
        raise AssertionError("rollout.backend: tgi was accepted")
    config = load_config(None, ["model.student=s", "model.teacher=t", "rollout.backend=hf_static"])
    assert config.rollout.backend == "hf_static"
    assert dataclasses.asdict(config)["train"]["max_staleness"] == 0
