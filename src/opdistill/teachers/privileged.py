"""Self-distillation teachers: the student's own network reading privileged context."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, chat_prompt, left_pad, sequence_logits
from opdistill.config import Config
from opdistill.errors import OpdistillError
from opdistill.losses.self_distill import tilted_teacher_logprobs
from opdistill.models.lora import adapters_disabled, is_lora
from opdistill.rollout import BaseModelRollout, HFGenerateRollout, RolloutBackend
from opdistill.tasks.base import Example, Task
from opdistill.teachers.base import Teacher
from opdistill.teachers.context import (
    ContextSource,
    DemonstrationContext,
    ReferenceContext,
)


class PrivilegedContextTeacher(Teacher):
    """The student's own network reading privileged context (on-policy self-distillation).

    The teacher's prompt is `template.format(prompt=x, context=c)` with `c` from `source`
    (the plain prompt when there is no context for an example); it scores the same response
    tokens as the student. `model` is a frozen copy of the initial student, an EMA copy (see
    `ema_update`) or the live student itself; it is evaluated without gradient, in eval mode.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        source: ContextSource,
        template: str,
        base_weights: bool = False,
        copies: dict[str, PreTrainedModel] | None = None,
        ema_decay: float | None = None,
        context_strength: float = 1.0,
        initial_network: tuple[PreTrainedModel, bool] | None = None,
        demo_ema_decay: float | None = None,
    ):
        self.model = model
        # Networks besides the student whose weights are training state: the frozen or EMA
        # teacher ("teacher_copy"), the initial model ("initial_copy": it samples
        # demonstrations or anchors the loss) and the EMA copy that samples them ("demo_copy").
        self.copies = dict(copies or {})
        self.ema_decay = ema_decay  # the teacher copy follows the student after every step
        self.demo_ema_decay = demo_ema_decay  # so does the demonstrations' copy, more slowly
        self.context_strength = context_strength
        # The base distribution of the anchor term: (network, whether to disable its adapters).
        self.initial_network = initial_network or (model, base_weights)
        # The last plain-prompt logits: (network, adapters off, batch, logits); cleared by steps.
        self._plain: tuple[PreTrainedModel, bool, Batch, Tensor] | None = None
        self.base_weights = base_weights  # a LoRA student scoring with its adapters disabled
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.source = source
        self.template = template
        self.rows = 0
        self.rows_with_context = 0

    def prompt_ids(self, examples: Sequence[Example]) -> list[list[int]]:
        """Chat-formatted teacher prompts, with the context where there is one."""
        contexts = self.source.contexts(examples)
        self.rows += len(examples)
        self.rows_with_context += sum(c is not None for c in contexts)
        return [
            chat_prompt(
                self.tokenizer,
                e.prompt if c is None else self.template.format(prompt=e.prompt, context=c),
            )
            for e, c in zip(examples, contexts, strict=True)
        ]

    @torch.no_grad()
    def logits(self, batch: Batch) -> Tensor:
        """The context teacher's logits; with `context_strength` α ≠ 1, the log-probs of the
        tilt-scaled teacher (`losses.tilted_teacher_logprobs`) against the same network on the
        plain prompt."""
        prompt_ids, prompt_mask = left_pad(
            self.prompt_ids(batch.examples), self.tokenizer.pad_token_id
        )
        context = self._score(self.model, prompt_ids, prompt_mask, batch, self.base_weights)
        if self.context_strength == 1.0:
            return context
        plain = self._plain_logits(self.model, self.base_weights, batch)
        return tilted_teacher_logprobs(context, plain, self.context_strength)

    @torch.no_grad()
    def base_logits(self, batch: Batch) -> Tensor:
        """The initial model on the student's plain prompt: π_base of the anchor term."""
        return self._plain_logits(*self.initial_network, batch)

    def _plain_logits(self, model: PreTrainedModel, base_weights: bool, batch: Batch) -> Tensor:
        """`model` on the student's own prompt; kept for the batch, so that the tilt and the
        anchor share one forward when their network is the same (a frozen teacher)."""
        cached = self._plain
        if (
            cached is None
            or cached[0] is not model
            or cached[1] != base_weights
            or cached[2] is not batch
        ):
            logits = self._score(model, batch.prompt_ids, batch.prompt_mask, batch, base_weights)
            cached = self._plain = (model, base_weights, batch, logits)
        return cached[3]

    def _score(
        self,
        model: PreTrainedModel,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        batch: Batch,
        base_weights: bool,
    ) -> Tensor:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # the live student is in train mode during the step
        try:
            with adapters_disabled(model) if base_weights else nullcontext():
                logits = sequence_logits(
                    model,
                    prompt_ids.to(device),
                    prompt_mask.to(device),
                    batch.response_ids.to(device),
                    batch.response_mask.to(device),
                    self.vocab_size,
                )
        finally:
            model.train(was_training)
        return logits.float()

    reports_distance = False  # the student itself, reading context

    @property
    def name(self) -> str:
        return "the self-distillation teacher"

    def metrics(self) -> dict[str, float]:
        return {"context_fraction": self.context_fraction()}

    def after_optimizer_step(self, student: PreTrainedModel) -> None:
        """EMA copies move toward the student: copy ← decay·copy + (1 − decay)·student."""
        self._plain = None  # the weights have changed
        if self.ema_decay is not None:
            ema_update(self.copies["teacher_copy"], student, self.ema_decay)
        if self.demo_ema_decay is not None:
            ema_update(self.copies["demo_copy"], student, self.demo_ema_decay)

    def state_dict(self) -> dict[str, Any]:
        state = getattr(self.source, "state_dict", None)
        return {"context": state()} if state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "context" in state and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state["context"])

    def networks(self) -> dict[str, torch.nn.Module]:
        return dict(self.copies)

    def context_fraction(self, reset: bool = True) -> float:
        """Share of scored rows that had context since the last reset."""
        fraction = self.rows_with_context / max(1, self.rows)
        if reset:
            self.rows = self.rows_with_context = 0
        return fraction


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A gradient-free copy of `model` in eval mode (the frozen or EMA teacher's weights)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(target: PreTrainedModel, source: PreTrainedModel, decay: float) -> None:
    """target ← decay·target + (1 − decay)·source, parameter by parameter."""
    for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
        mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - decay)


def build_self_distill_teacher(
    config: Config,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
) -> PrivilegedContextTeacher:
    """The teacher `self_distill.*` describes: `student`'s network reading privileged context,
    with the weights of a frozen initial copy, an EMA copy, the live student, or (LoRA) its base.
    """
    sd = config.self_distill
    if sd.weights == "base" and not is_lora(student):
        raise OpdistillError("self_distill.weights=base needs a LoRA student (model.lora.r > 0)")
    copies: dict[str, PreTrainedModel] = {}
    if sd.weights in ("frozen", "ema"):
        copies["teacher_copy"] = frozen_copy(student)
    # The model at the start: the frozen copy, the LoRA base, or a copy of its own.
    initial: tuple[PreTrainedModel, bool] | None = None
    wants_initial = sd.anchor_weight > 0 or (
        sd.context == "demonstration" and sd.demo_model == "initial"
    )
    if sd.weights == "frozen":
        initial = (copies["teacher_copy"], False)
    elif sd.weights == "base":
        initial = (student, True)
    elif wants_initial:
        copies["initial_copy"] = frozen_copy(student)
        initial = (copies["initial_copy"], False)
    source: ContextSource
    if sd.context == "reference":
        lacking = [e for e in examples if e.reference is None and not e.completion]
        if lacking:
            where = lacking[0].meta.get("source") or repr(lacking[0].prompt[:40])
            raise OpdistillError(
                f"self_distill.context=reference: example {where} has neither a "
                "'reference' nor a 'completion'"
            )
        source = ReferenceContext()
    else:
        if not task.has_verifier:
            raise OpdistillError(
                "self_distill.context=demonstration needs a task with a verifier to check "
                f"the sampled demonstrations; {task.name!r} has none"
            )
        demo_model = student
        if sd.demo_model == "initial" and initial is not None and not initial[1]:
            demo_model = initial[0]
        elif sd.demo_model == "ema":
            demo_model = copies["demo_copy"] = frozen_copy(student)
        sampler: RolloutBackend = HFGenerateRollout(demo_model, tokenizer, False)
        if sd.demo_model == "initial" and sd.weights == "base":
            sampler = BaseModelRollout(sampler, student)  # LoRA starts at its base model
        source = DemonstrationContext(
            sampler,
            tokenizer,
            task,
            num_demonstrations=sd.num_demonstrations,
            attempts=sd.demo_attempts,
            selection=sd.demo_selection,
            max_new_tokens=config.train.max_new_tokens,
            temperature=sd.demo_temperature,
            separator=sd.separator,
            seed=config.train.seed,
        )
    return PrivilegedContextTeacher(
        copies.get("teacher_copy", student),
        tokenizer,
        len(tokenizer),
        source,
        sd.template,
        base_weights=sd.weights == "base",
        copies=copies,
        ema_decay=sd.ema_decay if sd.weights == "ema" else None,
        context_strength=sd.context_strength,
        initial_network=initial,
        demo_ema_decay=sd.demo_ema_decay if "demo_copy" in copies else None,
    )
