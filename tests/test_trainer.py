import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from opdistill.config import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    SelfDistillConfig,
    TrainConfig,
    validate,
)
from opdistill.errors import OpdistillError
from opdistill.eval import evaluate
from opdistill.models.loading import tiny_llama
from opdistill.tasks.base import Example
from opdistill.teachers.base import ModelTeacher
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


def straight_and_resumed(make_trainer, tmp_path, steps=4, every=2):
    """Train `steps` steps in one go; elsewhere, stop after `every` and resume from there."""

    def run(output, until, resume):
        trainer = make_trainer(output)
        if resume:
            assert trainer.load_latest_checkpoint() is not None
        while trainer.step_count < until:
            trainer.step()
            if trainer.step_count % every == 0:
                trainer.save_checkpoint()
        return trainer

    straight = run(tmp_path / "a", steps, resume=False)
    run(tmp_path / "b", every, resume=False)
    return straight, run(tmp_path / "b", steps, resume=True)


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

    def make_trainer(output):
        teacher, student = models(tokenizer)
        config = make_config(output, steps=4, save_every=2, student_data_fraction=0.5)
        return Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher)

    straight, resumed = straight_and_resumed(make_trainer, tmp_path)
    assert resumed.step_count == 4
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_checkpoint_without_completion_marker_is_ignored(tmp_path, tokenizer, graph_task):
    teacher, student = models(tokenizer)
    config = make_config(tmp_path, steps=1)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 8)
    trainer.step()
    good = trainer.save_checkpoint()
    torn = trainer.checkpoints.directory / "step-00000009"
    torn.mkdir()
    assert trainer.checkpoints.latest() == good


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
    kept = [p.name for p in trainer.checkpoints.complete()]
    assert kept == ["step-00000003", "step-00000004"]

    newest = trainer.checkpoints.directory / "step-00000004" / "model" / "model.safetensors"
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


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_resume_does_not_duplicate_metrics(tmp_path, tokenizer, graph_task):
    """Steps after the resumed checkpoint run again; their old records (and torn lines) go."""
    train = graph_task.examples("train", 20)
    config = make_config(tmp_path, steps=4, save_every=2)
    teacher, student = models(tokenizer)
    Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher).train()
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # killed before checkpoint 4 landed
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "spl')  # and mid-write
    teacher, student = models(tokenizer)
    Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher).train(resume=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


def self_distill_config(tmp_path, loss="reverse_kl", **self_distill) -> Config:
    config = make_config(tmp_path, steps=2)
    config.model = ModelConfig(student="mem")
    config.loss = LossConfig(kind=loss)
    config.loss.minillm.teacher_mix = 0.0  # the self-teacher only scores
    config.self_distill = SelfDistillConfig(enabled=True, demo_attempts=3, **self_distill)
    validate(config)
    return config


@pytest.mark.parametrize("weights", ["frozen", "ema", "live"])
@pytest.mark.parametrize(
    "context",
    [
        {"context": "reference"},
        {"context": "demonstration", "demo_model": "current"},
        {"context": "demonstration", "demo_model": "initial", "num_demonstrations": 2},
        {"context": "demonstration", "demo_selection": "uniform"},
    ],
)
def test_self_distillation_teacher_weights(tmp_path, tokenizer, graph_task, weights, context):
    _, student = models(tokenizer)
    initial = {n: p.clone() for n, p in student.named_parameters()}
    config = self_distill_config(tmp_path, weights=weights, ema_decay=0.5, **context)
    trainer = Trainer(config, student, tokenizer, graph_task, graph_task.examples("train", 16))
    copies = trainer.teacher.networks()
    extra = {"frozen": 1, "ema": 1, "live": 0}[weights]
    if context.get("demo_model") == "initial" and weights != "frozen":
        extra += 1  # the initial model that samples demonstrations
    assert len(copies) == extra
    for _ in range(2):
        assert math.isfinite(trainer.step().loss)
    network = dict(trainer.teacher.model.named_parameters())
    after = dict(trainer.accelerator.unwrap_model(trainer.student).named_parameters())
    if weights == "frozen":
        assert all(torch.equal(value, initial[name]) for name, value in network.items())
    elif weights == "live":
        assert all(value is after[name] for name, value in network.items())
    elif any(not torch.equal(value, initial[name]) for name, value in after.items()):
        # the EMA has moved away from the initial weights but lags the student's
        assert any(not torch.equal(value, initial[name]) for name, value in network.items())
        assert any(not torch.equal(value, after[name]) for name, value in network.items())
    else:  # no correct demonstration, so a zero loss: neither student nor EMA moved
        assert all(torch.equal(value, initial[name]) for name, value in network.items())


@pytest.mark.parametrize(
    "loss", ["forward_kl", "reverse_kl", "jsd", "tvd", "sampled_token", "vopd", "minillm", "taid"]
)
def test_self_distillation_works_with_every_objective(tmp_path, tokenizer, graph_task, loss):
    _, student = models(tokenizer)
    config = self_distill_config(tmp_path, loss=loss)
    trainer = Trainer(config, student, tokenizer, graph_task, graph_task.examples("train", 16))
    stats = trainer.step()
    assert math.isfinite(stats.loss) and stats.context_fraction == 1.0


def test_self_distillation_reduces_the_gap_to_the_privileged_teacher(
    tmp_path, tokenizer, graph_task
):
    _, student = models(tokenizer)
    config = self_distill_config(tmp_path)
    config.train.lr = 3e-2
    trainer = Trainer(config, student, tokenizer, graph_task, graph_task.examples("train", 16))
    losses = [trainer.step().loss for _ in range(12)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_self_distillation_resumes_exactly(tmp_path, tokenizer, graph_task):
    """EMA weights, the initial copy and the demonstration RNG are part of the checkpoint."""
    train = graph_task.examples("train", 16)

    def make_trainer(output):
        _, student = models(tokenizer)
        config = self_distill_config(
            output, weights="ema", context="demonstration", demo_model="initial"
        )
        config.train = dataclasses.replace(config.train, steps=4, temperature=2.0)
        return Trainer(config, student, tokenizer, graph_task, train)

    straight, resumed = straight_and_resumed(make_trainer, tmp_path)
    for model in ("student", "teacher_copy"):
        a = straight.student if model == "student" else straight.teacher.networks()[model]
        b = resumed.student if model == "student" else resumed.teacher.networks()[model]
        a, b = a.state_dict(), b.state_dict()
        for name, value in a.items():
            assert torch.equal(value, b[name]), (model, name)


def test_self_distillation_input_errors(tmp_path, tokenizer, graph_task):
    with pytest.raises(OpdistillError, match=r"remove model\.teacher"):
        config = self_distill_config(tmp_path)
        config.model.teacher = "somewhere"
        validate(config)
    with pytest.raises(OpdistillError, match=r"must contain \{prompt\} and \{context\}"):
        self_distill_config(tmp_path, template="{prompt} only")
    with pytest.raises(OpdistillError, match="not a valid format string"):
        self_distill_config(tmp_path, template="{prompt} {context} {oops}")
    _, student = models(tokenizer)
    config = self_distill_config(tmp_path)
    no_reference = [Example("path from A to B .", meta={"source": "d.jsonl:3"})]
    with pytest.raises(OpdistillError, match=r"d\.jsonl:3 has neither"):
        Trainer(config, student, tokenizer, graph_task, no_reference)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_top_k_teacher_over_the_whole_vocabulary_matches_full_logits(
    tmp_path, tokenizer, graph_task, kind
):
    losses = []
    for top_k in (0, len(tokenizer)):
        teacher, student = models(tokenizer)
        config = make_config(tmp_path / f"k{top_k}", steps=3, student_data_fraction=0.0)
        config.loss = LossConfig(kind=kind, teacher_top_k=top_k, temperature=1.5)
        validate(config)
        trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 16)
        losses.append([trainer.step().loss for _ in range(3)])
    # Same batches and weights at step 1; AdamW's normalisation then amplifies float noise.
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_small_top_k_teacher_trains_on_policy(tmp_path, tokenizer, graph_task):
    teacher, student = models(tokenizer)
    config = make_config(tmp_path, steps=2, student_data_fraction=1.0)
    config.loss = LossConfig(kind="reverse_kl", teacher_top_k=4)
    validate(config)
    trainer = small_trainer(config, tokenizer, graph_task, teacher, student, 8)
    stats = [trainer.step() for _ in range(2)]
    assert all(math.isfinite(s.loss) and s.loss > 0 and s.grad_norm > 0 for s in stats)


@pytest.mark.parametrize(
    "remedy, copies",
    [
        ({"context_strength": 2.0}, set()),
        ({"context_strength": 0.5, "weights": "live"}, set()),
        ({"anchor_weight": 0.5}, {"teacher_copy"}),
        ({"anchor_weight": 0.5, "weights": "live"}, {"initial_copy"}),
        ({"demo_model": "ema", "demo_ema_decay": 0.5}, {"teacher_copy", "demo_copy"}),
    ],
)
def test_diversity_remedies_train_with_the_networks_they_need(
    tmp_path, tokenizer, graph_task, remedy, copies
):
    _, student = models(tokenizer)
    remedy = {"weights": "frozen", **remedy}
    config = self_distill_config(
        tmp_path, context="demonstration", demo_selection="uniform", **remedy
    )
    trainer = Trainer(config, student, tokenizer, graph_task, graph_task.examples("train", 16))
    expected = copies | ({"teacher_copy"} if remedy["weights"] == "frozen" else set())
    assert set(trainer.teacher.networks()) == expected
    initial = {n: p.clone() for n, p in student.named_parameters()}
    for _ in range(2):
        assert math.isfinite(trainer.step().loss)
    if "demo_copy" in copies:  # halfway between its start and the student, step by step
        demo = dict(trainer.teacher.networks()["demo_copy"].named_parameters())
        after = dict(trainer.accelerator.unwrap_model(trainer.student).named_parameters())
        moved = [n for n in demo if not torch.equal(after[n], initial[n])]
        assert all(not torch.equal(demo[n], initial[n]) for n in moved)


def test_the_anchor_is_zero_at_the_initial_model_and_adds_its_divergence_later(
    tmp_path, tokenizer, graph_task
):
    """Step 1 starts at the base model, so the anchor adds nothing; by step 3 the student has
    moved, and the anchored loss is the plain one plus w·KL(π_base‖q_θ) > 0."""

    def losses(weight):
        _, student = models(tokenizer)
        config = self_distill_config(tmp_path / str(weight), anchor_weight=weight)
        config.train.lr = 3e-2
        trainer = Trainer(config, student, tokenizer, graph_task, graph_task.examples("train", 16))
        return [trainer.step().loss for _ in range(3)]

    plain, anchored = losses(0.0), losses(2.0)
    assert anchored[0] == pytest.approx(plain[0], rel=1e-6, abs=1e-7)
    assert anchored[2] > plain[2] + 1e-4


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_remedy_state_resumes_exactly(tmp_path, tokenizer, graph_task):
    """The EMA demonstration copy and the anchor's initial copy are part of the checkpoint."""
    train = graph_task.examples("train", 16)

    def make_trainer(output):
        _, student = models(tokenizer)
        config = self_distill_config(
            output,
            weights="live",
            context="demonstration",
            demo_model="ema",
            demo_ema_decay=0.5,
            anchor_weight=0.3,
            context_strength=1.5,
        )
        config.train = dataclasses.replace(config.train, steps=4, temperature=2.0)
        return Trainer(config, student, tokenizer, graph_task, train)

    straight, resumed = straight_and_resumed(make_trainer, tmp_path)
    for model in ("student", "demo_copy", "initial_copy"):
        a = straight.student if model == "student" else straight.teacher.networks()[model]
        b = resumed.student if model == "student" else resumed.teacher.networks()[model]
        for name, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[name]), (model, name)
