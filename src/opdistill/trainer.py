"""The on-policy distillation loop (GKD, Agarwal et al. 2024) and the objectives built on it.

One optimizer step, top to bottom (`Trainer.step`):
  1. pick the batch source: student rollouts with probability λ (`student_data_fraction`, or φ
     under DistiLLM's adaptive schedule), else the off-policy source (dataset completions, or
     teacher generations = SeqKD);
  2. roll out (student, teacher-mixed sampling for MiniLLM, the replay buffer, or the dataset) and,
     with a verifier reward, score each sample and form group-normalised advantages;
  3. score every response token with the teacher (no gradient);
  4. compute the loss: NLL, a token divergence, TAID, vOPD, the sampled-token form or MiniLLM,
     optionally mixed with the reward's policy gradient and weighted by TIP / position weights,
     averaged over all response tokens of the step;
  5. clip, step the optimizer and the schedules.
Methods are configurations of this loop (see docs/objectives.md), not subclasses.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_model
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from opdistill.batch import Batch, batch_logits, dataset_batch
from opdistill.config import (
    Config,
    config_to_dict,
    is_served_teacher,
    needs_teacher,
    samples_from_teacher,
    samples_teacher_mixture,
    scores_with_teacher,
)
from opdistill.context import ContextSource, DemonstrationContext, ReferenceContext
from opdistill.errors import OpdistillError
from opdistill.eval.evaluate import evaluate_with_config
from opdistill.files import append_line, fsync_tree, write_atomic
from opdistill.lora import (
    BaseModelRollout,
    add_lora,
    is_lora,
    load_adapter_weights,
    save_merged,
    weights_file,
)
from opdistill.losses import (
    DIVERGENCE_KINDS,
    TaidSchedule,
    group_advantages,
    masked_token_sum,
    token_divergence,
    token_nll,
)
from opdistill.models import check_tokenizers_match, load_model, load_tokenizer
from opdistill.objectives import (
    StepInputs,
    per_token_loss,
    reduce_weighted,
    token_weights,
    uses_token_weights,
)
from opdistill.prompts import context_window, fit_split
from opdistill.replay import ReplayBuffer
from opdistill.rollout import (
    HFGenerateRollout,
    RolloutBackend,
    TeacherMixedRollout,
    decode_responses,
)
from opdistill.tasks import make_task
from opdistill.tasks.base import Example, Task
from opdistill.teacher import (
    ModelTeacher,
    PrivilegedContextTeacher,
    Teacher,
    TopKLogprobs,
    ema_update,
    frozen_copy,
)
from opdistill.teacher_cache import CachedTeacher
from opdistill.tokenizer import tokenizer_fingerprint

CHECKPOINT_DONE = "COMPLETE"


class ExampleStream:
    """Endless seeded shuffles of the training examples; its position is part of checkpoints."""

    def __init__(self, examples: Sequence[Example], seed: int):
        if not examples:
            raise OpdistillError("the training set is empty")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        taken = []
        while len(taken) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            taken.append(self.examples[self._order[self.position]])
            self.position += 1
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()


@dataclass
class StepStats:
    """What one optimizer step did."""

    loss: float
    on_policy: bool
    num_tokens: int
    grad_norm: float
    lr: float
    seconds: float
    reward: float | None = None
    context_fraction: float | None = None  # self-distillation: teacher rows with context


class Trainer:
    """Trains `student` against `teacher` following `config`; see the module docstring."""

    def __init__(
        self,
        config: Config,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        train_examples: Sequence[Example],
        eval_examples: Sequence[Example] = (),
        teacher_model: PreTrainedModel | None = None,
        teacher: Teacher | None = None,
        data_report: dict[str, float] | None = None,
    ):
        self.config = config
        self.data_report = data_report or {}
        tc, lc = config.train, config.loss
        # The schedule counts optimizer steps: accelerate would otherwise step a prepared
        # scheduler once per process at every optimizer step.
        self.accelerator = Accelerator(step_scheduler_with_optimizer=False)
        _check_launch(self.accelerator)
        set_seed(tc.seed)
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.task = task
        self.eval_examples = list(eval_examples)
        self.stream = ExampleStream(train_examples, tc.seed)
        self.coin = random.Random(tc.seed)  # λ coin: identical on every process
        self.step_count = 0

        self.optimizer = torch.optim.AdamW(  # LoRA: the adapters only
            [p for p in student.parameters() if p.requires_grad],
            lr=tc.lr,
            weight_decay=tc.weight_decay,
        )
        self.scheduler = get_scheduler(
            "cosine_with_min_lr",
            self.optimizer,
            num_warmup_steps=tc.warmup_steps,
            num_training_steps=max(1, tc.steps),
            scheduler_specific_kwargs={"min_lr_rate": tc.min_lr_ratio},
        )
        self.student, self.optimizer, self.scheduler = self.accelerator.prepare(
            student, self.optimizer, self.scheduler
        )
        unwrapped = self.accelerator.unwrap_model(self.student)

        if needs_teacher(config) and teacher is None and teacher_model is None:
            raise OpdistillError(
                f"loss.kind={lc.kind!r} / train.off_policy_source={tc.off_policy_source!r} "
                "needs a teacher model"
            )
        if teacher_model is not None:
            teacher_model.to(self.accelerator.device)
            teacher = teacher or ModelTeacher(teacher_model, self.vocab_size)
        self.teacher = teacher
        self.scores_with_teacher = scores_with_teacher(config)
        # Self-distillation: the teacher is the student's own network reading privileged context,
        # with the weights of a frozen initial copy, an EMA copy, or the live student.
        self.teacher_copy: PreTrainedModel | None = None
        self.initial_copy: PreTrainedModel | None = None
        if config.self_distill.enabled:
            self.teacher = self._self_teacher(unwrapped)

        # Samplers: the student (or the teacher–student mixture of MiniLLM), and the teacher.
        # Sampler log-probs feed the importance ratio / PPO clip and the replay buffer only.
        record = lc.kind in ("sampled_token", "minillm") or tc.adaptive_source.enabled
        self.student_sampler: RolloutBackend = HFGenerateRollout(unwrapped, tokenizer, record)
        self.teacher_sampler: RolloutBackend | None = None
        if teacher_model is not None:
            self.teacher_sampler = HFGenerateRollout(teacher_model, tokenizer, record)
            if samples_teacher_mixture(config):
                self.student_sampler = TeacherMixedRollout(
                    unwrapped, teacher_model, tokenizer, lc.minillm.teacher_mix
                )
        elif samples_from_teacher(config) or samples_teacher_mixture(config):
            raise OpdistillError(
                "sampling from the teacher (off_policy_source='teacher' or "
                "loss.minillm.teacher_mix > 0) needs a teacher model in this process"
            )

        # Verifier reward (GKD eq. 5 / GRPO): on-policy steps sample group_size per prompt.
        self.rewarded = config.reward.distill_weight < 1.0
        if self.rewarded and not task.has_verifier:
            raise OpdistillError(
                f"reward.distill_weight < 1 needs a task with a verifier; {task.name!r} has none"
            )
        # TAID's interpolation coefficient, DistiLLM's φ and replay buffer, TIP's sampler.
        self.taid = (
            TaidSchedule(max(1, tc.steps), lc.taid.t_start, lc.taid.alpha, lc.taid.beta)
            if lc.kind == "taid"
            else None
        )
        self.student_data_fraction = tc.student_data_fraction
        self.last_validation_loss: float | None = None
        adaptive = tc.adaptive_source
        self.replay = (
            ReplayBuffer(adaptive.replay_size, tokenizer.pad_token_id, tc.seed)
            if adaptive.enabled
            else None
        )
        self.token_generator = torch.Generator().manual_seed(tc.seed)

        self.output_dir = Path(tc.output_dir)
        self._writer: SummaryWriter | None = None
        self.train_seconds = 0.0  # time spent in steps, without evaluation and checkpoints
        self.skipped_steps = 0  # non-finite steps skipped under train.on_nonfinite: skip

    def _self_teacher(self, student: PreTrainedModel) -> PrivilegedContextTeacher:
        sd = self.config.self_distill
        if sd.weights == "base" and not is_lora(student):
            raise OpdistillError(
                "self_distill.weights=base needs a LoRA student (model.lora.r > 0)"
            )
        if sd.weights in ("frozen", "ema"):
            self.teacher_copy = frozen_copy(student)
        source: ContextSource
        if sd.context == "reference":
            lacking = [e for e in self.stream.examples if e.reference is None and not e.completion]
            if lacking:
                where = lacking[0].meta.get("source") or repr(lacking[0].prompt[:40])
                raise OpdistillError(
                    f"self_distill.context=reference: example {where} has neither a "
                    "'reference' nor a 'completion'"
                )
            source = ReferenceContext()
        else:
            if not self.task.has_verifier:
                raise OpdistillError(
                    "self_distill.context=demonstration needs a task with a verifier to check "
                    f"the sampled demonstrations; {self.task.name!r} has none"
                )
            demo_model = student
            if sd.demo_model == "initial" and sd.weights == "frozen":
                demo_model = self.teacher_copy
            elif sd.demo_model == "initial" and sd.weights != "base":
                self.initial_copy = demo_model = frozen_copy(student)
            sampler: RolloutBackend = HFGenerateRollout(demo_model, self.tokenizer, False)
            if sd.demo_model == "initial" and sd.weights == "base":
                sampler = BaseModelRollout(sampler, student)  # LoRA starts at its base model
            source = DemonstrationContext(
                sampler,
                self.tokenizer,
                self.task,
                num_demonstrations=sd.num_demonstrations,
                attempts=sd.demo_attempts,
                selection=sd.demo_selection,
                max_new_tokens=self.config.train.max_new_tokens,
                temperature=sd.demo_temperature,
                separator=sd.separator,
                seed=self.config.train.seed,
            )
        network = self.teacher_copy if self.teacher_copy is not None else student
        return PrivilegedContextTeacher(
            network,
            self.tokenizer,
            self.vocab_size,
            source,
            sd.template,
            base_weights=sd.weights == "base",
        )

    # ----------------------------------------------------------------------------------- step
    def step(self) -> StepStats:
        """One optimizer step over `batch_size × grad_accum` sequences on each process."""
        tc = self.config.train
        started = time.perf_counter()
        self.student.train()

        # 1. Pick the batch source with probability λ (φ under the adaptive schedule).
        on_policy = self.coin.random() < self.student_data_fraction

        # 2. Roll out: student samples, teacher samples (SeqKD) or dataset completions.
        if on_policy:
            batches = [self._student_batch() for _ in range(tc.grad_accum)]
        elif tc.off_policy_source == "teacher":
            batches = [
                self._sample(self.teacher_sampler, self._take_examples(tc.batch_size))
                for _ in range(tc.grad_accum)
            ]
        else:
            batches = [
                dataset_batch(self.tokenizer, self._take_examples(tc.batch_size))
                for _ in range(tc.grad_accum)
            ]
        rewards = [self._rewards(b) if on_policy and self.rewarded else None for b in batches]

        # The loss is a mean over every response token of the step, on every process.
        num_tokens = self._global_sum(sum(b.num_tokens for b in batches))
        num_sequences = self._global_sum(sum(len(b.examples) for b in batches))
        world = self.accelerator.num_processes  # DDP averages gradients over processes
        weighted = uses_token_weights(self.config)
        taid_t = self.taid.t if self.taid is not None else 1.0

        total_loss = 0.0
        for index, (batch, reward) in enumerate(zip(batches, rewards, strict=True)):
            batch = batch.to(self.accelerator.device)
            last = index == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.student):
                # 3. Score with the teacher (no gradient): full logits, or top-k log-probs.
                teacher_logits = self._teacher_scores(batch) if self.scores_with_teacher else None
                # 4. Loss.
                student_logits = batch_logits(self.student, batch, self.vocab_size)
                advantages = None
                if reward is not None:
                    advantages = group_advantages(
                        reward.to(student_logits.device),
                        self.config.reward.group_size,
                        normalize_std=self.config.reward.normalize_std,
                    )
                per_token = per_token_loss(
                    self.config,
                    student_logits,
                    teacher_logits,
                    batch,
                    StepInputs(taid_t=taid_t, advantages=advantages),
                )
                weights = None
                if weighted:
                    weights = token_weights(
                        self.config,
                        student_logits,
                        teacher_logits,
                        batch.response_mask,
                        self.token_generator,
                    )
                loss = reduce_weighted(
                    self.config,
                    per_token,
                    weights,
                    batch.response_mask,
                    num_tokens,
                    num_sequences,
                )
                self.accelerator.backward(loss * world)
            total_loss += float(loss.detach()) * world

        # 5. Clip and step (never from a non-finite loss or gradient).
        total_loss = self._global_mean(total_loss)
        grad_norm = float(
            self.accelerator.clip_grad_norm_(
                self.student.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf
            )
        )
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            culprit = self._nonfinite_tensor(total_loss)
            self.optimizer.zero_grad(set_to_none=True)
            if tc.on_nonfinite == "stop":
                raise OpdistillError(
                    f"step {self.step_count + 1}: {culprit} is not finite (loss {total_loss}, "
                    f"gradient norm {grad_norm}); stopping before the weights are updated "
                    "(train.on_nonfinite: skip skips such steps instead)"
                )
            warnings.warn(
                f"step {self.step_count + 1}: {culprit} is not finite; step skipped", stacklevel=2
            )
            self.skipped_steps += 1
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(total_loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()  # a skipped step does not advance the schedule either
            if self.config.self_distill.enabled and self.config.self_distill.weights == "ema":
                student = self.accelerator.unwrap_model(self.student)
                ema_update(self.teacher_copy, student, self.config.self_distill.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.taid is not None:
            self.taid.update(self.step_count, total_loss)
        mean_reward = None
        if any(r is not None for r in rewards):
            mean_reward = float(torch.cat([r for r in rewards if r is not None]).mean())
        context_fraction = None
        if isinstance(self.teacher, PrivilegedContextTeacher) and self.scores_with_teacher:
            context_fraction = self.teacher.context_fraction()
        return StepStats(
            loss=total_loss,
            on_policy=on_policy,
            num_tokens=num_tokens,
            grad_norm=grad_norm,
            lr=lr,
            seconds=time.perf_counter() - started,
            reward=mean_reward,
            context_fraction=context_fraction,
        )

    def _teacher_scores(self, batch: Batch) -> torch.Tensor | TopKLogprobs:
        """The teacher's logits [B, R, V], or its top-k log-probs when `loss.teacher_top_k` > 0."""
        lc = self.config.loss
        if lc.teacher_top_k > 0:
            return self.teacher.topk(batch, lc.teacher_top_k, lc.temperature)
        return self.teacher.logits(batch)

    def _nonfinite_tensor(self, loss: float) -> str:
        """Name what went non-finite: the loss, or the first parameter with a bad gradient."""
        if not math.isfinite(loss):
            return "the loss"
        for name, param in self.student.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                return f"the gradient of {name}"
        return "the gradient norm"

    def _take_examples(self, size: int) -> list[Example]:
        """This process's share of the next global micro-batch (same stream on every process)."""
        rank = self.accelerator.process_index
        examples = self.stream.take(size * self.accelerator.num_processes)
        return examples[rank * size : (rank + 1) * size]

    def _student_batch(self) -> Batch:
        """A micro-batch of student samples: fresh, grouped per prompt, or from the replay."""
        tc, adaptive = self.config.train, self.config.train.adaptive_source
        replay = self.replay
        if replay is not None and len(replay) >= tc.batch_size:  # noqa: SIM102 (draw order)
            if replay.rng.random() < adaptive.replay_reuse:
                return replay.sample(tc.batch_size)
        group = self.config.reward.group_size if self.rewarded else 1
        prompts = self._take_examples(tc.batch_size // group)
        batch = self._sample(self.student_sampler, [e for e in prompts for _ in range(group)])
        if self.replay is not None:
            self.replay.add(batch)
        return batch

    def _sample(self, sampler: RolloutBackend, examples: list[Example]) -> Batch:
        tc = self.config.train
        return sampler.generate(examples, tc.max_new_tokens, tc.temperature)

    def _rewards(self, batch: Batch) -> torch.Tensor:
        """The task verifier's 0/1 reward of every sampled response."""
        texts = decode_responses(self.tokenizer, batch)
        correct = [self.task.is_correct(e, t) for e, t in zip(batch.examples, texts, strict=True)]
        return torch.tensor(correct, dtype=torch.float32)

    def _global_sum(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor(value, device=self.accelerator.device)
        return int(self.accelerator.reduce(tensor, reduction="sum"))

    def _global_mean(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor(value, device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    # ------------------------------------------------------------------------------ the run
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run `train.steps` steps with logging, evaluation and checkpoints; return final eval."""
        tc = self.config.train
        is_main = self.accelerator.is_main_process
        if resume:
            self.load_latest_checkpoint()
        if is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(
                self.output_dir / "config.yaml",
                yaml.safe_dump(config_to_dict(self.config), sort_keys=False),
            )
            if resume:  # steps after the checkpoint are run again: drop their records
                truncate_metrics(self.output_dir / "metrics.jsonl", self.step_count or -1)
        if self.step_count == 0:
            self._log("data", self.data_report)
        progress = tqdm(
            total=tc.steps,
            initial=self.step_count,
            desc="train",
            dynamic_ncols=True,
            disable=not (tc.progress and is_main),
        )
        window: list[StepStats] = []
        final: dict[str, float] = {}
        evaluated = False
        while self.step_count < tc.steps:
            stats = self.step()
            self.train_seconds += stats.seconds
            window.append(stats)
            progress.update(1)
            progress.set_postfix(loss=f"{stats.loss:.4f}", src="on" if stats.on_policy else "off")
            if self.step_count % tc.log_every == 0 or self.step_count == tc.steps:
                self._log("train", _summarise_window(window))
                window = []
            evaluated = bool(tc.eval_every) and self.step_count % tc.eval_every == 0
            if evaluated:
                final = self.evaluate()
                self._log("eval", final)
            adaptive = tc.adaptive_source
            if adaptive.enabled and self.step_count % adaptive.validate_every == 0:
                self._log("validation", self.adapt_student_data_fraction())
            if tc.save_every and self.step_count % tc.save_every == 0:
                self.save_checkpoint()
        progress.close()
        if not evaluated:
            final = self.evaluate()
            self._log("eval", final)
        if is_main:
            self.save_final()
        if self._writer is not None:
            self._writer.close()
        return final

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current student (every process computes the same; main logs)."""
        if not self.eval_examples:
            return {}
        return evaluate_with_config(
            self.accelerator.unwrap_model(self.student),
            self.tokenizer,
            self.task,
            self.eval_examples,
            self.config.eval,
            # a self-distillation teacher is the student with context, and a cached teacher
            # knows only the dataset's completions: no distance is reported for either
            teacher=None
            if self.config.self_distill.enabled or isinstance(self.teacher, CachedTeacher)
            else self.teacher,
            seed=self.config.data.seed,
        )

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The distillation divergence on held-out reference completions (token mean).

        Objectives that are not a token divergence (vOPD, MiniLLM, ...) are measured with
        reverse KL; `nll` with NLL.
        """
        kind = self.config.loss.kind
        kind = kind if kind in (*DIVERGENCE_KINDS, "nll") else "reverse_kl"
        held_out = self.eval_examples[: self.config.eval.num_prompts]
        examples = [e for e in held_out if e.completion is not None]
        if not examples:
            raise OpdistillError("train.adaptive_source needs eval examples with a completion")
        student = self.accelerator.unwrap_model(self.student)
        total, count = 0.0, 0
        for start in range(0, len(examples), self.config.eval.batch_size):
            batch = dataset_batch(
                self.tokenizer, examples[start : start + self.config.eval.batch_size]
            ).to(self.accelerator.device)
            logits = batch_logits(student, batch, self.vocab_size)
            if kind == "nll":
                values = token_nll(logits, batch.response_ids)
            else:
                values = token_divergence(
                    logits,
                    self.teacher.logits(batch),
                    kind,
                    beta=self.config.loss.beta,
                    alpha=self.config.loss.alpha,
                )
            total += float(masked_token_sum(values, batch.response_mask))
            count += batch.num_tokens
        return total / max(1, count)

    def adapt_student_data_fraction(self) -> dict[str, float]:
        """DistiLLM: φ += `increase` when the validation loss rose by more than `threshold`."""
        adaptive = self.config.train.adaptive_source
        loss = self.validation_loss()
        last = self.last_validation_loss
        if last is not None and loss > last + adaptive.threshold:
            self.student_data_fraction = min(1.0, self.student_data_fraction + adaptive.increase)
        self.last_validation_loss = loss
        return {"validation_loss": loss, "student_data_fraction": self.student_data_fraction}

    def _log(self, split: str, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process or not metrics:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._writer is None:  # purge_step: events after a resumed checkpoint are dropped
            self._writer = SummaryWriter(
                str(self.output_dir / "tensorboard"), purge_step=self.step_count or None
            )
        for name, value in metrics.items():
            self._writer.add_scalar(f"{split}/{name}", value, self.step_count)
        record = {"step": self.step_count, "split": split, **metrics}
        append_line(self.output_dir / "metrics.jsonl", json.dumps(record))

    # ------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Model, tokenizer, optimizer, schedule, RNGs, data position, step; written atomically."""
        self.accelerator.wait_for_everyone()
        final = self.checkpoint_dir / f"step-{self.step_count:08d}"
        if self.accelerator.is_main_process:
            staging = final.with_name(final.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.unwrap_model(self.student).save_pretrained(staging / "model")
            self.tokenizer.save_pretrained(staging / "model")
            torch.save(
                {
                    "step": self.step_count,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "stream": self.stream.state_dict(),
                    "coin": self.coin.getstate(),
                    "python_rng": random.getstate(),
                    "numpy_rng": np.random.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "token_generator": self.token_generator.get_state(),
                    "student_data_fraction": self.student_data_fraction,
                    "last_validation_loss": self.last_validation_loss,
                    "taid": None if self.taid is None else self.taid.state_dict(),
                    "replay": None if self.replay is None else self.replay.state_dict(),
                    "context": self._context_state(),
                },
                staging / "trainer_state.pt",
            )
            for name, copy_model in self._weight_copies().items():
                save_model(copy_model, str(staging / f"{name}.safetensors"))
            fsync_tree(staging)  # contents on disk before the marker makes them visible
            (staging / CHECKPOINT_DONE).write_text(str(self.step_count))
            fsync_tree(staging)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            fsync_tree(self.checkpoint_dir, recursive=False)
            keep = self.config.train.keep_checkpoints
            for old in self.complete_checkpoints()[:-keep] if keep else []:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints whose writing finished, oldest first (a torn one has no marker)."""
        return sorted(
            p
            for p in self.checkpoint_dir.glob("step-*")
            if p.is_dir() and (p / CHECKPOINT_DONE).exists()
        )

    def latest_checkpoint(self) -> Path | None:
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def load_latest_checkpoint(self) -> Path | None:
        """Restore the newest readable checkpoint; start fresh when there is none.

        A checkpoint whose files cannot be read (truncated, corrupted) is skipped with a warning
        in favour of the one before it.
        """
        for path in reversed(self.complete_checkpoints()):
            try:
                student = self.accelerator.unwrap_model(self.student)
                weights = load_file(str(path / "model" / weights_file(student)))
                state = torch.load(path / "trainer_state.pt", weights_only=False)
                state["copies"] = {
                    name: load_file(str(path / f"{name}.safetensors"))
                    for name in self._weight_copies()
                }
            except Exception as error:  # any unreadable file: fall back to an older checkpoint
                warnings.warn(
                    f"checkpoint {path} is unreadable ({type(error).__name__}: "
                    f"{str(error)[:80]}); trying the one before it",
                    stacklevel=2,
                )
                continue
            self._restore(path, weights, state)
            return path
        return None

    def _restore(self, path: Path, weights: dict, state: dict[str, Any]) -> None:
        model = self.accelerator.unwrap_model(self.student)
        if is_lora(model):
            load_adapter_weights(model, weights, path)
        else:
            _load_weights(model, weights, path)
        for name, copy_model in self._weight_copies().items():
            _load_weights(copy_model, state["copies"][name], path)
        source = getattr(self.teacher, "source", None)
        if state.get("context") is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(state["context"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.coin.setstate(state["coin"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.token_generator.set_state(state["token_generator"])
        self.student_data_fraction = state["student_data_fraction"]
        self.last_validation_loss = state["last_validation_loss"]
        if self.taid is not None:
            self.taid.load_state_dict(state["taid"])
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])
        self.step_count = state["step"]

    def _weight_copies(self) -> dict[str, PreTrainedModel]:
        """Models besides the student whose weights are part of the training state."""
        copies = {"teacher_copy": self.teacher_copy, "initial_copy": self.initial_copy}
        return {name: model for name, model in copies.items() if model is not None}

    def _context_state(self) -> dict[str, Any] | None:
        source = getattr(self.teacher, "source", None)
        return source.state_dict() if hasattr(source, "state_dict") else None

    def save_final(self) -> Path:
        """The trained student and its tokenizer under `output_dir/final`.

        A LoRA student is saved merged (a plain causal LM) with its adapters in `final/adapter`.
        """
        path = self.output_dir / "final"
        student = self.accelerator.unwrap_model(self.student)
        if is_lora(student):
            student.save_pretrained(path / "adapter")
            save_merged(student, path)
        else:
            student.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path


def _check_launch(accelerator: Accelerator) -> None:
    """Refuse a multi-process launch that accelerate would run as independent single processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise OpdistillError(
            f"launched as {world} processes, but accelerate found no distributed backend and "
            "would train them independently; without GPUs set ACCELERATE_USE_CPU=1 (gloo), "
            "see docs/scaling.md"
        )


def _load_weights(model: PreTrainedModel, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's weights; either side of a pair of tied weights may be absent."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied_pairs = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(tied_pairs) | set(tied_pairs.values()) if isinstance(tied_pairs, dict) else set()
    real_missing = [k for k in missing if k not in tied]
    if unexpected or (real_missing and "lm_head.weight" not in real_missing):
        raise OpdistillError(f"checkpoint {path} does not match the student model")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the records of `metrics.jsonl` up to `step` (and no torn line); return dropped.

    After a resume from the checkpoint at `step`, the steps after it run again and log again.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False  # a line torn by a crash
        if keep:
            kept.append(line)
        else:
            dropped += bool(line.strip())
    if dropped:
        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def _summarise_window(window: list[StepStats]) -> dict[str, float]:
    rewards = [s.reward for s in window if s.reward is not None]
    contexts = [s.context_fraction for s in window if s.context_fraction is not None]
    return {
        **({"reward": float(np.mean(rewards))} if rewards else {}),
        **({"context_fraction": float(np.mean(contexts))} if contexts else {}),
        "loss": float(np.mean([s.loss for s in window])),
        "on_policy_fraction": float(np.mean([s.on_policy for s in window])),
        "tokens_per_step": float(np.mean([s.num_tokens for s in window])),
        "grad_norm": float(np.mean([s.grad_norm for s in window])),
        "lr": window[-1].lr,
        "seconds_per_step": float(np.mean([s.seconds for s in window])),
    }


def build_trainer(config: Config) -> Trainer:
    """Load tokenizer, models and task data named by `config` and return a ready `Trainer`."""
    mc, dc = config.model, config.data
    task = make_task(dc.task, **dc.task_args)  # cheap checks first, before loading weights
    tokenizer = load_tokenizer(mc.tokenizer or mc.student)
    cached = None  # an offline teacher: no teacher model is loaded
    if mc.teacher_cache:
        cached = CachedTeacher(mc.teacher_cache, len(tokenizer), tokenizer_fingerprint(tokenizer))
    served = None  # a teacher behind `opdistill serve-teacher` (it only scores)
    if is_served_teacher(mc.teacher):
        from opdistill.remote_teacher import remote_teacher_for

        served = remote_teacher_for(mc.teacher, tokenizer, mc.teacher_token_env, mc.teacher_timeout)
    student = load_model(mc.student, mc.dtype)
    if mc.lora.r > 0:
        student = add_lora(student, mc.lora)
    teacher_model = None
    if mc.teacher and served is None:
        teacher_tokenizer = load_tokenizer(mc.teacher) if mc.tokenizer is None else tokenizer
        check_tokenizers_match(teacher_tokenizer, tokenizer)
        teacher_model = load_model(mc.teacher, mc.dtype)
    window = context_window(student, teacher_model)
    if served is not None and served.context_window:
        window = min(window or served.context_window, served.context_window)
    if cached is not None:  # the prompts must be fitted as they were for the cache
        window = cached.fit_window(window)
    fits = {
        "train": fit_split(
            dc,
            tokenizer,
            window,
            task.examples("train", dc.train_size, seed=dc.seed),
            "train",
            config.train.max_new_tokens,
        ),
        "eval": fit_split(
            dc,
            tokenizer,
            window,
            task.examples("eval", dc.eval_size, seed=dc.seed) if dc.eval_size else [],
            "eval",
            config.eval.max_new_tokens,
        ),
    }
    for split, fit in fits.items():
        if fit.too_long:
            print(f"opdistill: {fit.summary(split)}", file=sys.stderr)
    data_report = {
        f"{split}_{name}": float(value)
        for split, fit in fits.items()
        for name, value in (("prompts", fit.total), ("long_prompts", fit.too_long))
    }
    return Trainer(
        config,
        student,
        tokenizer,
        task,
        fits["train"].examples,
        fits["eval"].examples,
        teacher_model=teacher_model,
        teacher=cached if cached is not None else served,
        data_report=data_report,
    )
