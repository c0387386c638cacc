"""Teachers: one protocol (`Teacher`), several sources of scores, one factory.

- `base`: the protocol, `TopKLogprobs` and `ModelTeacher` (a causal LM in this process);
- `privileged` + `context`: self-distillation, the student reading privileged context;
- `http`: the client of a served teacher; `server`: `opdistill serve-teacher`;
- `vllm_server`: a teacher served by vLLM (`vllm+http://`), top-k and sampled-token answers;
- `cache`: a teacher read from disk; `cache_writer`: `opdistill cache-teacher`.

`open_teacher` builds the teachers that need no weights in this process (served, cached) and
`build_teacher` every kind from `model.*` / `self_distill.*`; code outside this package uses
these and the protocol, never a concrete class.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.config import Config, is_served_teacher, is_vllm_teacher
from opdistill.tasks.base import Example, Task
from opdistill.teachers.base import (
    ALL_ANSWERS,
    Answer,
    Teacher,
    TeacherCannotAnswer,
    TopKLogprobs,
    check_answers,
    topk_from_logits,
)

__all__ = [
    "ALL_ANSWERS",
    "Answer",
    "Teacher",
    "TeacherCannotAnswer",
    "TopKLogprobs",
    "build_teacher",
    "check_answers",
    "model_teacher",
    "open_teacher",
    "served_teacher",
    "topk_from_logits",
]


def model_teacher(model: PreTrainedModel, vocab_size: int) -> Teacher:
    """A causal LM held in this process as a frozen teacher."""
    from opdistill.teachers.base import ModelTeacher

    return ModelTeacher(model, vocab_size)


def served_teacher(
    url: str, tokenizer: PreTrainedTokenizerBase, token_env: str, timeout: float
) -> Teacher:
    """The teacher behind an `opdistill serve-teacher` server at `url`, checked against
    `tokenizer`; its bearer token is read from `$token_env`."""
    from opdistill.teachers.http import remote_teacher_for

    return remote_teacher_for(url, tokenizer, token_env, timeout)


def open_teacher(config: Config, tokenizer: PreTrainedTokenizerBase) -> Teacher | None:
    """The teacher of `config.model` that holds no weights here: a teacher cache or a served
    teacher (checked against `tokenizer` now); None for an in-process or no teacher."""
    mc = config.model
    if mc.teacher_cache:
        from opdistill.models.tokenizers import tokenizer_fingerprint
        from opdistill.teachers.cache import CachedTeacher

        return CachedTeacher(mc.teacher_cache, len(tokenizer), tokenizer_fingerprint(tokenizer))
    if is_vllm_teacher(mc.teacher):
        import os

        from opdistill.teachers.vllm_server import VLLMServedTeacher

        token = os.environ.get(mc.teacher_token_env) if mc.teacher_token_env else None
        return VLLMServedTeacher(mc.teacher, tokenizer, token=token, timeout=mc.teacher_timeout)
    if is_served_teacher(mc.teacher):
        return served_teacher(mc.teacher, tokenizer, mc.teacher_token_env, mc.teacher_timeout)
    return None


def build_teacher(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    *,
    opened: Teacher | None = None,
    teacher_model: PreTrainedModel | None = None,
    student: PreTrainedModel | None = None,
    task: Task | None = None,
    examples: Sequence[Example] = (),
) -> Teacher | None:
    """The run's teacher: self-distillation (from `student`, `task` and the training
    `examples`), an already `opened` one, or `teacher_model` wrapped; None without a teacher."""
    if config.self_distill.enabled:
        from opdistill.teachers.privileged import build_self_distill_teacher

        if student is None or task is None:
            raise ValueError("self-distillation builds its teacher from the student and the task")
        return build_self_distill_teacher(config, student, tokenizer, task, examples)
    if opened is not None:
        return opened
    if teacher_model is not None:
        return model_teacher(teacher_model, len(tokenizer))
    return None
