"""Pipelined rollouts: bounded staleness, importance correction, determinism, exact resume."""

import pytest
import torch
from tests.test_trainer import make_config, models, straight_and_resumed

from opdistill.batch import batch_logits
from opdistill.config import LossConfig, RolloutConfig, validate
from opdistill.errors import OpdistillError
from opdistill.trainer import Trainer


def pipelined_config(output, staleness, steps=4, **train):
    config = make_config(output, steps=steps, max_staleness=staleness, lr=5e-2, **train)
    config.loss = LossConfig(kind="sampled_token")
    config.rollout = RolloutConfig(backend="hf_static")
    return config


def trainer_for(config, tokenizer, task):
    teacher, student = models(tokenizer)
    return Trainer(
        config, student, tokenizer, task, task.examples("train", 40), teacher_model=teacher
    )


def close(trainer):
    if trainer.pipeline is not None:
        trainer.pipeline.close()


def test_staleness_is_bounded_and_stale_batches_come_from_old_weights(
    tmp_path, tokenizer, graph_task
):
    """S = 2: step j trains on samples of θ_{max(0, j−3)}; their recorded log-probs are that
    model's (checked against saved copies of the weights), and staleness is logged per step."""
    trainer = trainer_for(pipelined_config(tmp_path, 2, steps=5), tokenizer, graph_task)
    student = trainer.accelerator.unwrap_model(trainer.student)
    weights = [{k: v.clone() for k, v in student.state_dict().items()}]
    seen = []
    original_next = trainer.pipeline.next

    def spy(step):
        batches, version, seconds = original_next(step)
        seen.append((step, version, batches))
        return batches, version, seconds

    trainer.pipeline.next = spy
    stats = []
    for _ in range(5):
        stats.append(trainer.step())
        weights.append({k: v.clone() for k, v in student.state_dict().items()})
    close(trainer)
    assert [s.staleness for s in stats] == [0, 1, 2, 2, 2]
    assert [version for _, version, _ in seen] == [0, 0, 0, 1, 2]
    probe = trainer_for(pipelined_config(tmp_path / "probe", 0), tokenizer, graph_task)
    model = probe.accelerator.unwrap_model(probe.student).eval()
    for _, version, batches in seen:
        model.load_state_dict(weights[version])
        (batch,) = batches
        with torch.no_grad():
            logits = batch_logits(model, batch, len(tokenizer))
        logprobs = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1))
        mask = batch.response_mask.bool()
        assert torch.allclose(batch.sampler_logprobs[mask], logprobs[..., 0][mask], atol=1e-5)
    assert stats[0].sampler_mismatch < 1e-4 < stats[-1].sampler_mismatch  # stale: ρ ≠ 1


def test_pipelined_runs_are_deterministic(tmp_path, tokenizer, graph_task):
    runs = []
    for name in ("a", "b"):
        trainer = trainer_for(pipelined_config(tmp_path / name, 1), tokenizer, graph_task)
        runs.append([trainer.step().loss for _ in range(4)])
        close(trainer)
        runs[-1].append(trainer.student.state_dict())
    for name, value in runs[0][-1].items():
        assert torch.equal(value, runs[1][-1][name]), name
    assert runs[0][:-1] == runs[1][:-1]


def test_resume_with_in_flight_rollouts_is_exact(tmp_path, tokenizer, graph_task):
    """Stop after 2 of 5 steps with S = 2 (three batches in flight), resume: same weights."""
    made = []

    def make_trainer(output):
        config = pipelined_config(output, 2, steps=5, save_every=2)
        made.append(trainer_for(config, tokenizer, graph_task))
        return made[-1]

    straight, resumed = straight_and_resumed(make_trainer, tmp_path, steps=5, every=2)
    for trainer in made:
        close(trainer)
    assert resumed.step_count == 5
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_zero_staleness_is_the_synchronous_loop(tmp_path, tokenizer, graph_task):
    """S = 0 builds no pipeline: the step samples in line, as before, bit for bit repeatable."""
    config = make_config(tmp_path, steps=2)
    results = []
    for _ in range(2):
        teacher, student = models(tokenizer)
        trainer = Trainer(
            config,
            student,
            tokenizer,
            graph_task,
            graph_task.examples("train", 8),
            teacher_model=teacher,
        )
        assert trainer.pipeline is None
        results.append([trainer.step().loss for _ in range(2)])
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rollout.backend": "hf"}, "rollout.backend to hf_static or vllm"),
        ({"train.student_data_fraction": 0.5}, "student_data_fraction=1"),
    ],
)
def test_invalid_pipelined_settings(tmp_path, change, message):
    config = pipelined_config(tmp_path, 1)
    config.model.student = "s"
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    with pytest.raises(OpdistillError, match=message):
        validate(config)
