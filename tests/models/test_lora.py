import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from opdistill.batch import dataset_batch
from opdistill.config import (
    Config,
    EvalConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    SelfDistillConfig,
    TrainConfig,
    validate,
)
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama
from opdistill.models.lora import add_lora, is_lora
from opdistill.teachers.base import ModelTeacher
from opdistill.trainer import Trainer

LORA = LoraConfig(r=4, alpha=8.0)


def lora_student(tokenizer):
    base = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return base, add_lora(copy.deepcopy(base), LORA)


def config_for(tmp_path, teacher=None, **overrides) -> Config:
    config = Config(
        model=ModelConfig(student="mem", teacher=teacher, lora=LORA),
        loss=LossConfig(kind="reverse_kl"),
        train=TrainConfig(
            steps=3,
            batch_size=4,
            lr=1e-2,
            max_new_tokens=6,
            log_every=1,
            save_every=1,
            output_dir=str(tmp_path / "run"),
            progress=False,
        ),
        eval=EvalConfig(num_prompts=4, num_samples=2, ks=[1, 2], max_new_tokens=6),
        **overrides,
    )
    validate(config)
    return config


def test_only_the_adapters_train(tokenizer):
    _, student = lora_student(tokenizer)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(OpdistillError, match=r"^model\.lora: "):
        add_lora(
            tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2),
            LoraConfig(r=2, target_modules=["no_such_module"]),
        )


def test_lora_training_saves_adapters_and_a_merged_model(tmp_path, tokenizer, graph_task):
    base, student = lora_student(tokenizer)
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    config = config_for(tmp_path, teacher="mem")
    trainer = Trainer(
        config,
        student,
        tokenizer,
        graph_task,
        graph_task.examples("train", 16),
        teacher_model=teacher,
    )
    trainer.train()
    wrapped = {
        name.replace(".base_layer", ""): value
        for name, value in student.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    for name, value in base.state_dict().items():  # the base weights never move
        assert torch.equal(value, wrapped[name]), name
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), final / "adapter")
    batch = dataset_batch(tokenizer, graph_task.examples("eval", 4))
    with torch.no_grad():
        ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
        mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
        expected = student.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(
            merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected)
    assert not torch.allclose(base(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_lora_resume_is_exact(tmp_path, tokenizer, graph_task):
    train = graph_task.examples("train", 16)

    def run(output, steps, resume=False):
        _, student = lora_student(tokenizer)
        teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
        config = config_for(output, teacher="mem")
        config.train.steps = 4
        trainer = Trainer(config, student, tokenizer, graph_task, train, teacher_model=teacher)
        if resume:
            assert trainer.load_latest_checkpoint() is not None
        while trainer.step_count < steps:
            trainer.step()
            trainer.save_checkpoint()
        return trainer

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


@pytest.mark.parametrize("demo_model", [None, "initial"])
def test_self_distillation_teacher_is_the_base_model(tmp_path, tokenizer, graph_task, demo_model):
    """weights=base: no copy; the teacher scores with the adapters off, i.e. the base weights."""
    base, student = lora_student(tokenizer)
    context = {"context": "demonstration", "demo_model": demo_model, "demo_attempts": 2}
    sd = SelfDistillConfig(enabled=True, weights="base", **(context if demo_model else {}))
    config = config_for(tmp_path, self_distill=sd)
    trainer = Trainer(config, student, tokenizer, graph_task, graph_task.examples("train", 16))
    assert trainer.teacher.networks() == {} and trainer.teacher.model is student
    steps = [trainer.step() for _ in range(3)]
    batch = dataset_batch(tokenizer, graph_task.examples("eval", 4))
    reference = copy.deepcopy(trainer.teacher)
    reference.model, reference.base_weights = base, False
    reference.source = trainer.teacher.source = _Fixed()
    torch.testing.assert_close(trainer.teacher.logits(batch), reference.logits(batch))
    moved = not torch.allclose(
        ModelTeacher(student, len(tokenizer)).logits(batch),
        ModelTeacher(base, len(tokenizer)).logits(batch),
    )
    if any(s.context_fraction for s in steps):
        assert moved  # while the student itself has moved
    else:  # no correct demonstration: teacher and student read the same prompt, loss exactly 0
        assert all(s.loss == 0.0 for s in steps) and not moved
    assert is_lora(student)


class _Fixed:
    def contexts(self, examples):
        return [e.reference for e in examples]


def test_base_weights_need_a_lora_student(tmp_path):
    with pytest.raises(OpdistillError, match=r"set model\.lora\.r > 0"):
        validate(
            Config(
                model=ModelConfig(student="mem"),
                self_distill=SelfDistillConfig(enabled=True, weights="base"),
            )
        )


def test_adapter_and_base_weights_from_a_snapshot(tmp_path, tokenizer):
    """What the vLLM engines get: the adapter saved from a state-dict snapshot is the one
    peft's save_pretrained writes, and the base weights carry the plain model's names."""
    from safetensors.torch import load_file

    from opdistill.models.lora import ADAPTER_WEIGHTS, base_state_dict, save_adapter

    base, student = lora_student(tokenizer)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    save_adapter(student, tmp_path / "snapshot", snapshot)
    student.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "snapshot" / ADAPTER_WEIGHTS)
    theirs = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "snapshot" / "adapter_config.json").exists()
    weights = base_state_dict(student)
    assert weights.keys() == base.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in base.state_dict().items())
