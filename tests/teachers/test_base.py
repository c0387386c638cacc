"""The teacher protocol: three answers, declared capabilities, one-line refusals."""

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
from opdistill.models import tiny_llama
from opdistill.teachers import (
    Teacher,
    TeacherCannotAnswer,
    TopKLogprobs,
    check_answers,
    model_teacher,
)
from opdistill.trainer import Trainer


class TopKOnly(Teacher):
    """A served teacher that returns only top-k log-probs (as a vLLM server does)."""

    answers = frozenset({"topk", "token_logprobs"})

    @property
    def name(self) -> str:
        return "the top-k server"

    def topk(self, batch, k, temperature=1.0):
        rows, width = batch.response_ids.shape
        return TopKLogprobs.uniform(rows, width, k, 10)

    def token_logprobs(self, batch, temperature=1.0):
        return torch.zeros(batch.response_ids.shape)


def config_for(tmp_path, loss: LossConfig) -> Config:
    config = Config(
        model=ModelConfig(student="mem", teacher="http://127.0.0.1:1"),
        data=DataConfig(task="graph"),
        loss=loss,
        train=TrainConfig(
            steps=1, batch_size=2, max_new_tokens=3, output_dir=str(tmp_path), progress=False
        ),
        eval=EvalConfig(num_prompts=2, num_samples=1, ks=[1], max_new_tokens=3),
    )
    validate(config)
    return config


def test_model_teacher_answers_agree(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    teacher = model_teacher(model, len(tokenizer))
    batch = dataset_batch(tokenizer, graph_task.examples("eval", 3))
    logits = teacher.logits(batch)
    logprobs = torch.log_softmax(logits / 2.0, dim=-1)
    expected = logprobs.gather(-1, batch.response_ids.unsqueeze(-1))[..., 0]
    torch.testing.assert_close(teacher.token_logprobs(batch, 2.0), expected)
    top = teacher.topk(batch, 4, 2.0)
    torch.testing.assert_close(top.logprobs, logprobs.topk(4, dim=-1).values)
    torch.testing.assert_close(top.token_logprobs, expected)


def test_tokens_only_answer_has_no_top_k():
    answer = TopKLogprobs.tokens(torch.full((2, 3), -1.5))
    assert answer.k == 0 and answer.indices.shape == (2, 3, 0)
    assert torch.equal(answer.token_logprobs, torch.full((2, 3), -1.5))


def test_an_answer_a_teacher_cannot_give_is_one_line_naming_both():
    with pytest.raises(TeacherCannotAnswer) as error:
        check_answers(TopKOnly(), "logits", "loss.kind='vopd'")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("loss.kind='vopd' needs full logits, but the top-k server answers")
    with pytest.raises(TeacherCannotAnswer, match="answers top-k log-probs"):
        TopKOnly().logits(None)
    check_answers(TopKOnly(), "token_logprobs", "loss.kind='sampled_token'")  # fine


@pytest.mark.parametrize(
    ("kind", "ok"), [("vopd", False), ("minillm", False), ("taid", False), ("sampled_token", True)]
)
def test_the_trainer_refuses_objectives_the_teacher_cannot_serve(
    tmp_path, tokenizer, graph_task, kind, ok
):
    student = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    # a served teacher only scores, so MiniLLM samples from the student alone
    config = config_for(tmp_path, LossConfig(kind=kind, minillm=MiniLLMConfig(teacher_mix=0.0)))
    make = lambda: Trainer(  # noqa: E731
        config, student, tokenizer, graph_task, graph_task.examples("train", 8), teacher=TopKOnly()
    )
    if ok:
        trainer = make()
        assert trainer.teacher_answer == "token_logprobs"
        assert trainer.step().num_tokens > 0
    else:
        with pytest.raises(OpdistillError, match=rf"loss.kind='{kind}' needs full logits"):
            make()
