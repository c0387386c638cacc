"""Logits formed per chunk from hidden states train exactly like the full logits."""

import pytest
import torch

from opdistill.config import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    TIPConfig,
    TrainConfig,
    validate,
)
from opdistill.losses.projected import ProjectedLogits
from opdistill.models import tiny_llama
from opdistill.objectives import chunks_output
from opdistill.trainer import Trainer


def _trainer(tmp_path, tokenizer, task, chunking, fraction=0.5, **loss):
    config = Config(
        model=ModelConfig(student="mem", teacher="mem"),
        data=DataConfig(task="graph"),
        loss=LossConfig(output_chunking=chunking, chunk_size=3, **loss),
        train=TrainConfig(
            steps=3,
            batch_size=4,
            lr=1e-2,
            max_new_tokens=5,
            student_data_fraction=fraction,
            output_dir=str(tmp_path / chunking),
            progress=False,
        ),
        eval=EvalConfig(num_prompts=2, num_samples=1, ks=[1], max_new_tokens=5),
    )
    validate(config)
    teacher = tiny_llama(tokenizer, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return Trainer(
        config, student, tokenizer, task, task.examples("train", 8), teacher_model=teacher
    )


@pytest.mark.parametrize(
    "loss",
    [
        {"kind": "jsd", "beta": 0.9, "temperature": 1.5},
        {"kind": "forward_kl", "teacher_top_k": 5},
        {"kind": "skew_reverse_kl", "alpha": 0.2, "reduction": "sequence"},
    ],
)
def test_chunked_output_steps_match_the_full_logits(tmp_path, tokenizer, graph_task, loss):
    full = _trainer(tmp_path, tokenizer, graph_task, "off", **loss)
    expected = [full.step() for _ in range(3)]  # trainers seed the global RNGs: one at a time
    chunked = _trainer(tmp_path, tokenizer, graph_task, "on", **loss)
    seen = []
    original = chunked._student_logits

    def spy(batch, flag):
        result = original(batch, flag)
        seen.append(isinstance(result, ProjectedLogits))
        return result

    chunked._student_logits = spy
    for a in expected:
        b = chunked.step()
        assert a.on_policy == b.on_policy
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-7)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4, abs=1e-6)
    assert all(seen) and seen
    # Adam normalises each coordinate: where a gradient is ~1e-9 (near its eps), rounding-level
    # differences move that weight by a fraction of lr; elsewhere the weights agree closely.
    for (name, x), (_, y) in zip(
        full.student.named_parameters(), chunked.student.named_parameters(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=3e-3, msg=name)
        assert (x - y).abs().median() < 1e-6, name


def test_objectives_that_read_full_logits_keep_them(tmp_path, tokenizer, graph_task):
    tip = _trainer(tmp_path / "a", tokenizer, graph_task, "on", tip=TIPConfig(mode="weighted"))
    vopd = _trainer(tmp_path / "b", tokenizer, graph_task, "on", kind="vopd", fraction=1.0)
    for trainer in (tip, vopd):
        batch = trainer.sources.next_batch(on_policy=True)
        assert not isinstance(trainer._student_logits(batch, False), ProjectedLogits)
        assert not chunks_output(trainer.config, 10**9, trainer.vocab_size)
    auto = _trainer(tmp_path, tokenizer, graph_task, "auto")
    assert not chunks_output(auto.config, 100, auto.vocab_size)  # small: full logits
    assert chunks_output(auto.config, 10**9, auto.vocab_size)
