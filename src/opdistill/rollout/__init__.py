"""Rollout backends: turn prompts into sampled responses and the sampler's log-probs.

Every backend implements `RolloutBackend.generate`; `hf` samples with transformers `generate`.
`build_samplers` picks the run's student and teacher samplers from its config.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.config import Config, samples_from_teacher, samples_teacher_mixture
from opdistill.errors import OpdistillError
from opdistill.rollout.base import (
    RolloutBackend,
    SamplerMismatch,
    decode_responses,
    pure_generation_config,
    push_weights,
    sampling_generation_config,
)
from opdistill.rollout.hf import BaseModelRollout, HFGenerateRollout, TeacherMixedRollout
from opdistill.rollout.hf_static import StaticRollout

__all__ = [
    "BaseModelRollout",
    "HFGenerateRollout",
    "RolloutBackend",
    "SamplerMismatch",
    "StaticRollout",
    "TeacherMixedRollout",
    "build_samplers",
    "decode_responses",
    "pure_generation_config",
    "push_weights",
    "sampling_generation_config",
    "vllm_rollout",
]


def build_samplers(
    config: Config,
    student: PreTrainedModel,
    teacher_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    record_logprobs: bool,
) -> tuple[RolloutBackend, RolloutBackend | None]:
    """The student's sampler (MiniLLM: the teacher–student mixture) and, with a teacher model in
    this process, the teacher's (SeqKD). `record_logprobs`: keep the sampler's log-probs."""
    student_sampler = student_rollout(config, student, tokenizer, record_logprobs)
    if teacher_model is None:
        if samples_from_teacher(config) or samples_teacher_mixture(config):
            raise OpdistillError(
                "sampling from the teacher (off_policy_source='teacher' or "
                "loss.minillm.teacher_mix > 0) needs a teacher model in this process"
            )
        return student_sampler, None
    if samples_teacher_mixture(config):
        student_sampler = TeacherMixedRollout(
            student, teacher_model, tokenizer, config.loss.minillm.teacher_mix
        )
    return student_sampler, HFGenerateRollout(teacher_model, tokenizer, record_logprobs)


def student_rollout(
    config: Config,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    record_logprobs: bool,
) -> RolloutBackend:
    """The student's sampler of `rollout.backend` (hf, hf_static or vllm)."""
    rc = config.rollout
    if rc.backend == "hf_static":
        return StaticRollout(student, tokenizer, record_logprobs, compile=rc.compile)
    if rc.backend == "vllm":
        return vllm_rollout(config, student, tokenizer)
    return HFGenerateRollout(student, tokenizer, record_logprobs)


def vllm_rollout(
    config: Config, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> RolloutBackend:
    """The student's vLLM sampler: the server at `rollout.server`, else an engine in this
    process; either holds the student's current weights (a LoRA student: its adapter)."""
    if config.rollout.server:
        from opdistill.rollout.vllm_server import VLLMServerRollout

        return VLLMServerRollout(student, tokenizer, config.rollout)
    from opdistill.rollout.vllm import VLLMRollout

    return VLLMRollout(student, tokenizer, config.rollout, seed=config.train.seed)
