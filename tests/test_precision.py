"""bf16 weights with fp32 loss arithmetic, and one dtype (`model.dtype`) for student and teacher."""

import pytest
import torch

from opdistill.config import (
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    validate,
)
from opdistill.errors import OpdistillError
from opdistill.losses import token_divergence
from opdistill.losses.projected import ProjectedLogits, projected_token_loss
from opdistill.losses.reduction import reduce_loss
from opdistill.models import tiny_llama
from opdistill.trainer import Trainer


def _config(tmp_path, dtype, chunking="off", kind="jsd"):
    config = Config(
        model=ModelConfig(student="mem", teacher="mem", dtype=dtype),
        data=DataConfig(task="graph"),
        loss=LossConfig(kind=kind, output_chunking=chunking, chunk_size=3),
        train=TrainConfig(
            steps=2,
            batch_size=4,
            lr=1e-2,
            max_new_tokens=5,
            student_data_fraction=1.0,
            output_dir=str(tmp_path / f"{dtype}-{chunking}"),
            progress=False,
        ),
    )
    validate(config)
    return config


def _models(tokenizer, dtype):
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    # bf16-representable weights, so that the fp32 run starts from the very same model
    for model in (teacher, student):
        model.to(torch.bfloat16).to(dtype)
    return student, teacher


def _trainer(tmp_path, tokenizer, task, dtype, chunking="off"):
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    student, teacher = _models(tokenizer, dtype)
    config = _config(tmp_path, name, chunking)
    examples = task.examples("train", 8)
    return Trainer(config, student, tokenizer, task, examples, teacher_model=teacher), teacher


def test_reductions_sum_bf16_values_in_fp32():
    values = torch.full((2, 300), 1.0 + 2**-7, dtype=torch.bfloat16)  # 1.0078125, exact in bf16
    values[:, 0] = 256.0
    mask = torch.ones(2, 300)
    for reduction in ("token", "sequence"):
        result = reduce_loss(values, mask, reduction)
        assert result.dtype == torch.float32
        expected = values.float().mean()
        assert float(result) == pytest.approx(float(expected), rel=1e-6)


def test_projected_gradients_of_bf16_weights_are_summed_in_fp32():
    """Many chunks of a bf16 projection: the weight gradient equals the fp32 one to bf16
    rounding (a bf16 running sum over 64 chunks would drift far more)."""
    generator = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 256, 16, 40
    hidden = torch.randn(n, hidden_size, generator=generator).bfloat16()
    weight = torch.randn(vocab, hidden_size, generator=generator).bfloat16()
    teacher = torch.randn(n, vocab, generator=generator).bfloat16()

    def loss_fn(logits, teacher_chunk):
        return token_divergence(logits, teacher_chunk, "jsd", beta=0.5)

    def grads(h, w, t, chunk_size):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        values = projected_token_loss(ProjectedLogits(h, w, None, vocab), t, loss_fn, chunk_size)
        assert values.dtype == torch.float32
        values.sum().backward()
        return h.grad, w.grad

    hidden_grad, weight_grad = grads(hidden, weight, teacher, chunk_size=4)
    assert weight_grad.dtype == torch.bfloat16
    reference_hidden, reference_weight = grads(
        hidden.float(), weight.float(), teacher.float(), chunk_size=n
    )
    torch.testing.assert_close(weight_grad.float(), reference_weight, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(hidden_grad.float(), reference_hidden, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunking", ["off", "on"])
def test_bf16_training_steps_compute_the_loss_in_fp32(tmp_path, tokenizer, graph_task, chunking):
    """bf16 student and teacher: the loss reaching backward is fp32, the weights stay bf16, and
    the step losses follow an fp32 run from the same weights to bf16 precision."""
    reference, _ = _trainer(tmp_path, tokenizer, graph_task, torch.float32, chunking)
    expected = [reference.step() for _ in range(2)]
    trainer, teacher = _trainer(tmp_path, tokenizer, graph_task, torch.bfloat16, chunking)
    backward, seen = trainer.accelerator.backward, []

    def spy(loss, **kwargs):
        seen.append(loss.dtype)
        return backward(loss, **kwargs)

    trainer.accelerator.backward = spy
    for a in expected:
        b = trainer.step()
        assert b.on_policy and a.on_policy
        assert b.loss == pytest.approx(a.loss, rel=5e-2, abs=1e-3)
    assert seen and all(dtype == torch.float32 for dtype in seen)
    assert {p.dtype for p in trainer.student.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_student_and_teacher_dtypes_must_match_model_dtype(tmp_path, tokenizer, graph_task):
    student, teacher = _models(tokenizer, torch.float32)
    teacher.to(torch.bfloat16)
    config = _config(tmp_path, "float32")
    examples = graph_task.examples("train", 4)
    with pytest.raises(OpdistillError, match=r"model.dtype='float32', but the teacher's weights"):
        Trainer(config, student, tokenizer, graph_task, examples, teacher_model=teacher)
    with pytest.raises(OpdistillError, match=r"model.dtype='bfloat16', but the student's weights"):
        Trainer(
            _config(tmp_path, "bfloat16"),
            student,
            tokenizer,
            graph_task,
            examples,
            teacher_model=teacher,
        )
    student.to(torch.bfloat16)
    Trainer(
        _config(tmp_path, "bfloat16"),
        student,
        tokenizer,
        graph_task,
        examples,
        teacher_model=teacher,
    )
