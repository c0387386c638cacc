import dataclasses
import math

import pytest
import torch

from opdistill.config import Config, DataConfig, EvalConfig, LossConfig, ModelConfig, TrainConfig
from opdistill.errors import OpdistillError
from opdistill.eval import evaluate
from opdistill.models import tiny_llama
from opdistill.teacher import ModelTeacher
from opdistill.trainer import ExampleStream, Trainer


def make_config(tmp_path, **train) -> Config:
    defaults = dict(
        steps=4,
        batch_size=4,
        lr=1e-2,
        max_new_tokens=6,
        log_every=1,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    return Config(
        model=ModelConfig(student="mem", teacher="mem"),
        data=DataConfig(task="graph"),
        loss=LossConfig(kind="reverse_kl"),
        train=TrainConfig(**{**defaults, **train}),
        eval=EvalConfig(num_prompts=8, num_samples=2, ks=[1, 2], max_new_tokens=6),
    )


def models(tokenizer):
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return teacher, student


def small_trainer(config, tokenizer, task, teacher, student, size=8):
    """A Trainer on `size` training prompts of `task`."""
    return Trainer(
        config, student, tokenizer, task, task.examples("train", size), teacher_model=teacher
    )


def test_example_stream_is_seeded_and_resumable():
    stream = ExampleStream(list(range(5)), seed=3)
    first = stream.take(7)
    assert sorted(first[:5]) == list(range(5))
    state = stream.state_dict()
    rest = stream.take(6)
    again = ExampleStream(list(range(5)), seed=3)
    again.load_state_dict(state)
    assert again.take(6) == rest
    with pytest.raises(OpdistillError, match="empty"):
        ExampleStream([], seed=0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_gradient_accumulation_matches_one_big_batch(tmp_path, tokenizer, graph_task):
    """Token-mean over the whole step: 2 micro-batches of 2 give the gradient of 1 batch of 4.

    Gradients are compared at the optimizer step (after clipping), not weights after AdamW, whose
    normalisation would amplify float-summation noise in near-zero gradients.
    """
    train = graph_task.examples("train", 40)
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        teacher, student = models(tokenizer)
        config = make_config(
            tmp_path / f"{batch_size}",
            steps=1,
            batch_size=batch_size,
            grad_accum=accum,
            student_data_fraction=0.0,
        )
        config.loss = LossConfig(kind="forward_kl")
        trainer = Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher)
        captured = {}

        def capture(trainer=trainer, captured=captured):
            for name, param in trainer.student.named_parameters():
                captured[name] = param.grad.clone()

        trainer.optimizer.step = capture
        stats = trainer.step()
        results.append((stats.loss, stats.num_tokens, captured))
    assert results[0][1] == results[1][1]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, grad in results[0][2].items():
        assert torch.allclose(grad, results[1][2][name], rtol=1e-4, atol=1e-7), name


def test_off_policy_sources(tmp_path, tokenizer, graph_task):
    train = graph_task.examples("train", 40)
    teacher, student = models(tokenizer)
    config = make_config(tmp_path, steps=1, student_data_fraction=0.0, off_policy_source="teacher")
    config.loss = LossConfig(kind="nll")
    trainer = Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher)
    stats = trainer.step()
    assert not stats.on_policy and stats.num_tokens > 0 and stats.loss > 0


def test_on_policy_training_reduces_divergence_to_teacher(tmp_path, tokenizer, graph_task):
    """End to end: λ = 1 reverse-KL training moves the student toward the teacher on held-out
    prompts (the student's own samples, as in the objective)."""
    train = graph_task.examples("train", 200)
    held_out = graph_task.examples("eval", 16)
    teacher, student = models(tokenizer)
    scorer = ModelTeacher(teacher, len(tokenizer))

    def divergence(model):
        return evaluate(
            model,
            tokenizer,
            graph_task,
            held_out,
            num_samples=4,
            ks=[1],
            max_new_tokens=6,
            teacher=scorer,
        )["teacher_rkl"]

    before = divergence(student)
    config = make_config(tmp_path, steps=30, batch_size=8, lr=3e-3, student_data_fraction=1.0)
    trainer = Trainer(
        config, student, tokenizer, graph_task, train, held_out, teacher_model=teacher
    )
    trainer.train()
    after = divergence(trainer.accelerator.unwrap_model(trainer.student))
    assert after < 0.5 * before, (before, after)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 31  # 30 train steps logged + final eval
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tokenizer, graph_task):
    """Stop after 2 of 4 steps, resume from the checkpoint: same weights as never stopping."""
    train = graph_task.examples("train", 60)

    def run(output, steps, resume=False):
        teacher, student = models(tokenizer)
        config = make_config(output, steps=steps, save_every=2, student_data_fraction=0.5)
        config.train = dataclasses.replace(config.train, steps=4)
        trainer = Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher)
        if resume:
            trainer.load_latest_checkpoint()
        while trainer.step_count < steps:
            trainer.step()
            if trainer.step_count % 2 == 0:
                trainer.save_checkpoint()
        return trainer

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert resumed.step_count == 4
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_checkpoint_without_completion_marker_is_ignored(tmp_path, tokenizer, graph_task):
    teacher, student = models(tokenizer)
    config = make_config(tmp_path, steps=1)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 8)
    trainer.step()
    good = trainer.save_checkpoint()
    torn = trainer.checkpoint_dir / "step-00000009"
    torn.mkdir()
    assert trainer.latest_checkpoint() == good


def test_divergence_loss_without_teacher_is_an_error(tmp_path, tokenizer, graph_task):
    _, student = models(tokenizer)
    with pytest.raises(OpdistillError, match="teacher"):
        Trainer(
            make_config(tmp_path), student, tokenizer, graph_task, graph_task.examples("train", 8)
        )


def test_teacher_and_student_with_different_vocab_padding(tmp_path, tokenizer, graph_task):
    """Embeddings padded to different sizes: only the tokenizer's columns are compared."""
    teacher = tiny_llama(
        tokenizer, hidden_size=48, num_layers=1, num_heads=2, pad_vocab_to_multiple_of=128
    )
    student = tiny_llama(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, pad_vocab_to_multiple_of=8
    )
    assert teacher.config.vocab_size != student.config.vocab_size
    config = make_config(tmp_path, steps=1, student_data_fraction=1.0)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 8)
    stats = trainer.step()
    assert math.isfinite(stats.loss) and stats.loss >= 0


def test_non_finite_loss_stops_before_the_update(tmp_path, tokenizer, graph_task):
    teacher, student = models(tokenizer)
    with torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))
    config = make_config(tmp_path, steps=1, student_data_fraction=1.0)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 8)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.raises(OpdistillError, match=r"step 1: the loss is not finite.*before the weights"):
        trainer.step()
    for name, value in trainer.student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_keeps_the_newest_checkpoints_and_falls_back_past_a_corrupt_one(
    tmp_path, tokenizer, graph_task
):
    teacher, student = models(tokenizer)
    config = make_config(tmp_path, steps=4, keep_checkpoints=2, student_data_fraction=0.0)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 16)
    for _ in range(4):
        trainer.step()
        trainer.save_checkpoint()
    kept = [p.name for p in trainer.complete_checkpoints()]
    assert kept == ["step-00000003", "step-00000004"]

    newest = trainer.checkpoint_dir / "step-00000004" / "model" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a torn write that kept its marker
    teacher, student = models(tokenizer)
    resumed = small_trainer(config, tokenizer, graph_task, teacher, student, 16)
    with pytest.warns(UserWarning, match="step-00000004 is unreadable"):
        path = resumed.load_latest_checkpoint()
    assert path.name == "step-00000003" and resumed.step_count == 3


def test_non_finite_steps_can_be_skipped(tmp_path, tokenizer, graph_task):
    teacher, student = models(tokenizer)
    with torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))
    config = make_config(tmp_path, steps=2, student_data_fraction=1.0, on_nonfinite="skip")
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 8)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.warns(UserWarning, match="step 1: the loss is not finite; step skipped"):
        trainer.step()
    assert trainer.step_count == 1 and trainer.skipped_steps == 1
    for name, value in trainer.student.state_dict().items():
        assert torch.equal(value, before[name]), name
