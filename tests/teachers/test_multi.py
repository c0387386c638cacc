"""Several teachers: per-example routing, per-token mixtures, metrics, training and resume."""

import json
import math

import pytest
import torch

from opdistill.batch import dataset_batch
from opdistill.config import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    MiniLLMConfig,
    ModelConfig,
    TrainConfig,
    validate,
)
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.models.tokenizers import build_word_tokenizer
from opdistill.objectives import OBJECTIVES
from opdistill.tasks.base import Example
from opdistill.tasks.mixture import make_mixture
from opdistill.teachers import model_teacher, routed_teacher
from opdistill.trainer import Trainer

MIX = [
    {"task": "graph", "task_args": {"num_nodes": 8, "max_paths": 3}, "teacher": "graph"},
    {"task": "arithmetic", "task_args": {"num_steps": 1, "max_value": 9}, "teacher": "math"},
]


@pytest.fixture(scope="module")
def mixture():
    return make_mixture(MIX)


@pytest.fixture(scope="module")
def mix_tokenizer(mixture):
    examples = mixture.examples("train", 200) + mixture.examples("eval", 20)
    return build_word_tokenizer(e.prompt + " " + e.completion for e in examples)


def teachers(tokenizer):
    nets = {
        name: tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=seed)
        for name, seed in (("graph", 1), ("math", 3))
    }
    return nets, {name: model_teacher(net, len(tokenizer)) for name, net in nets.items()}


def untagged(example: Example) -> Example:
    meta = {k: v for k, v in example.meta.items() if k != "teacher"}
    return Example(example.prompt, example.completion, example.reference, meta)


def test_mixture_task_splits_by_weight_and_tags_examples(mixture):
    weighted = make_mixture([{**MIX[0], "weight": 3}, {**MIX[1], "weight": 1}])
    examples = weighted.examples("train", 40)
    assert sum(e.meta["teacher"] == "graph" for e in examples) == 30
    assert {e.meta["task"] for e in examples[:12]} == {"graph", "arithmetic"}  # interleaved
    for example in mixture.examples("eval", 10):
        assert mixture.is_correct(example, example.completion)
    with pytest.raises(OpdistillError, match=r"data.mix\[1\]: part name 'graph' is used twice"):
        make_mixture([MIX[0], MIX[0]])


def test_routed_logits_are_each_teachers_own(mixture, mix_tokenizer):
    _, named = teachers(mix_tokenizer)
    routed = routed_teacher(named)
    examples = mixture.examples("train", 6)
    batch = dataset_batch(mix_tokenizer, examples)
    logits = routed.logits(batch)
    for name in named:
        own = named[name].logits(batch)
        rows = [i for i, e in enumerate(examples) if e.meta["teacher"] == name]
        assert rows
        torch.testing.assert_close(logits[rows], own[rows], atol=1e-5, rtol=1e-5)
    token_lp = routed.token_logprobs(batch, temperature=1.5)
    expected = torch.log_softmax(logits / 1.5, -1).gather(-1, batch.response_ids[..., None])
    torch.testing.assert_close(token_lp, expected[..., 0], atol=1e-5, rtol=1e-5)
    top = routed.topk(batch, 3, temperature=1.5)
    torch.testing.assert_close(top.logprobs, torch.log_softmax(logits / 1.5, -1).topk(3).values)


def test_untagged_rows_get_the_weighted_mixture(mixture, mix_tokenizer):
    _, named = teachers(mix_tokenizer)
    routed = routed_teacher(named, {"graph": 3.0, "math": 1.0})
    examples = [untagged(e) for e in mixture.examples("train", 4)]
    batch = dataset_batch(mix_tokenizer, examples)
    p = {name: torch.softmax(t.logits(batch), -1) for name, t in named.items()}
    mixed = torch.log(0.75 * p["graph"] + 0.25 * p["math"])
    torch.testing.assert_close(routed.logits(batch), mixed, atol=1e-5, rtol=1e-5)
    lp = {name: t.token_logprobs(batch, 2.0) for name, t in named.items()}
    expected = torch.log(0.75 * lp["graph"].exp() + 0.25 * lp["math"].exp())
    torch.testing.assert_close(routed.token_logprobs(batch, 2.0), expected, atol=1e-5, rtol=1e-5)


def test_routing_errors_name_the_example(mixture, mix_tokenizer):
    _, named = teachers(mix_tokenizer)
    example = mixture.examples("train", 1)[0]
    batch = dataset_batch(mix_tokenizer, [untagged(example)])
    with pytest.raises(OpdistillError, match=r"has no 'teacher' field and model.teacher_weights"):
        routed_teacher(named).logits(batch)
    wrong = Example(example.prompt, example.completion, meta={"teacher": "physics"})
    with pytest.raises(OpdistillError, match=r"names teacher 'physics', not one of model.teachers"):
        routed_teacher(named).logits(dataset_batch(mix_tokenizer, [wrong]))


def test_metrics_split_the_loss_by_teacher(mixture, mix_tokenizer):
    _, named = teachers(mix_tokenizer)
    routed = routed_teacher(named)
    examples = mixture.examples("train", 6)
    batch = dataset_batch(mix_tokenizer, examples)
    logits = routed.logits(batch)
    per_token = torch.rand(batch.response_ids.shape)
    routed.observe(batch, per_token, logits)  # the student equal to its teachers
    metrics = routed.metrics()
    mask = batch.response_mask.float()
    for name in named:
        rows = [i for i, e in enumerate(examples) if e.meta["teacher"] == name]
        expected = float((per_token[rows] * mask[rows]).sum() / mask[rows].sum())
        assert metrics[f"teacher/{name}/loss"] == pytest.approx(expected, rel=1e-5)
        assert metrics[f"teacher/{name}/divergence"] == pytest.approx(0.0, abs=1e-5)
    assert routed.metrics() == {}  # reset when read


def make_config(tmp_path, kind="reverse_kl", **loss) -> Config:
    config = Config(
        model=ModelConfig(student="mem", teachers={"graph": "mem", "math": "mem"}),
        data=DataConfig(mix=MIX),
        loss=LossConfig(kind=kind, **loss),
        train=TrainConfig(
            steps=2,
            batch_size=4,
            lr=1e-2,
            max_new_tokens=6,
            log_every=1,
            eval_every=2,
            output_dir=str(tmp_path / "run"),
            progress=False,
        ),
        eval=EvalConfig(num_prompts=8, num_samples=2, ks=[1, 2], max_new_tokens=6),
    )
    validate(config)
    return config


def mix_trainer(config, tokenizer, mixture):
    _, named = teachers(tokenizer)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    teacher = routed_teacher(named, config.model.teacher_weights)
    return Trainer(
        config,
        student,
        tokenizer,
        mixture,
        mixture.examples("train", 16),
        mixture.examples("eval", 8),
        teacher=teacher,
    )


TEACHER_KINDS = [name for name, o in OBJECTIVES.items() if o.teacher is not None]


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_every_objective_trains_with_routed_teachers(tmp_path, mix_tokenizer, mixture, kind):
    loss = {"beta": 0.5} if kind == "jsd" else {}
    if kind == "minillm":
        loss["minillm"] = MiniLLMConfig(teacher_mix=0.0)
    config = make_config(tmp_path, kind, **loss)
    trainer = mix_trainer(config, mix_tokenizer, mixture)
    stats = trainer.step()
    assert math.isfinite(stats.loss)
    assert {"teacher/graph/loss", "teacher/math/loss"} <= set(stats.teacher_metrics)


def test_top_k_routed_teachers_and_per_teacher_logs(tmp_path, mix_tokenizer, mixture):
    config = make_config(tmp_path, "forward_kl", teacher_top_k=4)
    trainer = mix_trainer(config, mix_tokenizer, mixture)
    final = trainer.train()
    assert {"accuracy/graph", "accuracy/math"} <= set(final)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train"]
    assert all(0 <= r["teacher/math/token_share"] <= 1 for r in train)
    assert all(r["teacher/graph/divergence"] == r["teacher/graph/divergence"] for r in train)


def test_resume_with_routed_teachers_reproduces_the_run(tmp_path, mix_tokenizer, mixture):
    def run(output, until, resume):
        config = make_config(output, "jsd", beta=0.5, teacher_top_k=0)
        config.model.teacher_weights = {"graph": 1.0, "math": 1.0}
        trainer = mix_trainer(config, mix_tokenizer, mixture)
        if resume:
            assert trainer.load_latest_checkpoint() is not None
        while trainer.step_count < until:
            trainer.step()
            if trainer.step_count % 2 == 0:
                trainer.save_checkpoint()
        return trainer

    straight = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 4, True)
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"teacher_weights": {"physics": 1.0}},
            "model.teacher_weights.physics: not one of model.teachers (graph, math)",
        ),
        ({"teacher_weights": {"graph": -1.0}}, "model.teacher_weights.graph: must be a number"),
        ({"teacher_weights": {"graph": 0.0}}, "at least one weight must be > 0"),
        ({"teacher": "mem"}, "model.teachers replaces model.teacher"),
        ({"teachers": {"graph": ""}}, "model.teachers.graph: expected a path"),
        ({"teacher_field": ""}, "model.teacher_field must be a non-empty string"),
    ],
)
def test_bad_teacher_keys_are_one_line_errors(tmp_path, change, message):
    config = make_config(tmp_path)
    for key, value in change.items():
        setattr(config.model, key, value)
    if "teachers" in change:
        config.data.mix = []
    with pytest.raises(OpdistillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"task": "graph", "teacher": "physics"}, r"data.mix\[0\].teacher: 'physics' is not one"),
        ({"task": "graph", "weight": 0}, r"data.mix\[0\].weight: must be a number > 0"),
        ({"task": "graph", "taks_args": {}}, r"data.mix\[0\]: unknown key 'taks_args'"),
        ({"task_args": {}}, r"data.mix\[0\].task: required"),
    ],
)
def test_bad_mix_entries_are_one_line_errors(tmp_path, entry, message):
    config = make_config(tmp_path)
    config.data.mix = [entry]
    with pytest.raises(OpdistillError, match=message):
        validate(config)


def test_sampling_from_several_teachers_is_refused(tmp_path):
    config = make_config(tmp_path)
    config.train.student_data_fraction = 0.5
    config.train.off_policy_source = "teacher"
    with pytest.raises(OpdistillError, match=r"model\.teachers only score"):
        validate(config)
