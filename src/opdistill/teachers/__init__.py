"""Teachers: one protocol (`Teacher`), several sources of scores, one factory.

- `base`: the protocol, `TopKLogprobs` and `ModelTeacher` (a causal LM in this process);
- `privileged` + `context`: self-distillation, the student reading privileged context;
- `http`: the client of a served teacher; `server`: `opdistill serve-teacher`;
- `vllm_server`: a teacher served by vLLM (`vllm+http://`), top-k and sampled-token answers;
- `cache`: a teacher read from disk; `cache_writer`: `opdistill cache-teacher`;
- `multi`: several named teachers, routed per example or mixed per token;
- `cross_tokenizer`: a teacher with another tokenizer (span alignment or ULD).

`open_teacher` builds the teachers that need no weights in this process (served, cached) and
the multi-teacher of `model.teachers`; `build_teacher` every kind from `model.*` /
`self_distill.*`; code outside this package uses these and the protocol, never a concrete class.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch
from opdistill.config import (
    Config,
    LossConfig,
    is_served_teacher,
    is_vllm_teacher,
    needs_teacher,
)
from opdistill.errors import OpdistillError
from opdistill.losses.projected import ProjectedLogits
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
from opdistill.teachers.multi import accuracy_by_teacher

__all__ = [
    "ALL_ANSWERS",
    "Answer",
    "Teacher",
    "TeacherCannotAnswer",
    "TopKLogprobs",
    "accuracy_by_teacher",
    "aligned_teacher",
    "ask_teacher",
    "build_teacher",
    "check_answers",
    "check_teacher",
    "cross_tokenizer_teacher",
    "model_teacher",
    "open_teacher",
    "routed_teacher",
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


def routed_teacher(
    teachers: dict[str, Teacher], weights: dict[str, float] | None = None, field: str = "teacher"
) -> Teacher:
    """Named teachers: each example scored by the one its `meta[field]` names, else by the
    per-token mixture of `weights` (see `opdistill.teachers.multi`)."""
    from opdistill.teachers.multi import RoutedTeacher

    return RoutedTeacher(teachers, weights, field)


def _spec_teacher(spec: str, config: Config, tokenizer: PreTrainedTokenizerBase) -> Teacher:
    """One entry of `model.teachers`: a served URL, or a model loaded here (on the run's device)
    whose tokenizer must match the student's."""
    mc = config.model
    if is_served_teacher(spec):
        return served_teacher(spec, tokenizer, mc.teacher_token_env, mc.teacher_timeout)
    from accelerate import PartialState

    from opdistill.models.loading import check_tokenizers_match, load_model, load_tokenizer

    check_tokenizers_match(load_tokenizer(spec), tokenizer)
    model = load_model(spec, mc.dtype).to(PartialState().device)
    return model_teacher(model, len(tokenizer))


def aligned_teacher(
    model: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    method: str,
) -> Teacher:
    """`model` (with `teacher_tokenizer`) scoring responses of a student with another tokenizer,
    by `method` "span" or "uld" (see `opdistill.teachers.cross_tokenizer`)."""
    from opdistill.teachers.cross_tokenizer import CrossTokenizerTeacher

    return CrossTokenizerTeacher(model, teacher_tokenizer, student_tokenizer, method)


def cross_tokenizer_teacher(
    config: Config,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> Teacher | None:
    """None when `model.teacher` tokenizes like the student (exact token losses then apply);
    else the teacher, loaded here, behind `loss.cross_tokenizer`'s alignment, or a one-line
    error naming both tokenizers when that is "off"."""
    from opdistill.errors import OpdistillError
    from opdistill.models.loading import check_tokenizers_match, load_model

    mc, method = config.model, config.loss.cross_tokenizer
    try:
        check_tokenizers_match(teacher_tokenizer, student_tokenizer)
        return None
    except OpdistillError as error:
        if method == "off":
            raise OpdistillError(
                f"the teacher's tokenizer ({mc.teacher}) and the student's "
                f"({mc.tokenizer or mc.student}) differ: {error}; set loss.cross_tokenizer to "
                "span or uld to distil across tokenizers"
            ) from None
    from accelerate import PartialState

    model = load_model(mc.teacher, mc.dtype).to(PartialState().device)
    return aligned_teacher(model, teacher_tokenizer, student_tokenizer, method)


def open_teacher(config: Config, tokenizer: PreTrainedTokenizerBase) -> Teacher | None:
    """The teacher of `config.model` that holds no weights here: a teacher cache or a served
    teacher (checked against `tokenizer` now), or the multi-teacher of `model.teachers` (its
    in-process models loaded now); None for a single in-process or no teacher."""
    mc = config.model
    if mc.teachers:
        teachers = {
            name: _spec_teacher(spec, config, tokenizer) for name, spec in mc.teachers.items()
        }
        return routed_teacher(teachers, mc.teacher_weights, mc.teacher_field)
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


def ask_teacher(
    teacher: Teacher | None,
    answer: Answer | None,
    batch: Batch,
    loss: LossConfig,
    chunked: bool = False,
) -> Tensor | TopKLogprobs | ProjectedLogits | None:
    """The teacher's `answer` for `batch` (see `objectives.teacher_answer`): logits [B, R, V]
    (with `chunked`, as hidden states and projection where the teacher can), its top-k
    log-probs, or the response tokens' log-probs (a `TopKLogprobs` with k = 0); None for none."""
    if answer is None or teacher is None:
        return None
    if answer == "logits" and chunked and "projected" in teacher.answers:
        return teacher.projected_logits(batch)
    if answer == "topk":
        return teacher.topk(batch, loss.teacher_top_k, loss.temperature)
    if answer == "token_logprobs":
        return TopKLogprobs.tokens(teacher.token_logprobs(batch, loss.temperature))
    return teacher.logits(batch)


def check_teacher(config: Config, teacher: Teacher | None, answer: Answer | None) -> None:
    """Stop before any compute unless the run has the teacher it needs, and that teacher can
    give `answer` (the objective's, see `objectives.teacher_answer`)."""
    lc, tc = config.loss, config.train
    if needs_teacher(config) and teacher is None:
        raise OpdistillError(
            f"loss.kind={lc.kind!r} / train.off_policy_source={tc.off_policy_source!r} "
            "needs a teacher model"
        )
    if teacher is not None:
        check_answers(teacher, answer, f"loss.kind={lc.kind!r}")
