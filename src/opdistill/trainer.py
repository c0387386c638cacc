"""The on-policy distillation loop (GKD, Agarwal et al. 2024) and the objectives built on it.

One optimizer step, top to bottom (`Trainer.step`):
  1. pick the batch source: student rollouts with probability λ (`student_data_fraction`, or φ
     under DistiLLM's adaptive schedule), else the off-policy source (dataset completions, or
     teacher generations = SeqKD);
  2. roll out (student, teacher-mixed sampling for MiniLLM, the replay buffer, or the dataset) and,
     with a verifier reward, score each sample and form group-normalised advantages;
  3. score every response token with the teacher (no gradient), asking for the cheapest answer
     the objective needs (full logits, top-k log-probs, or the sampled tokens' log-probs);
  4. compute the loss of the configured objective (`opdistill.objectives`), optionally mixed with
     the reward's policy gradient and weighted by TIP / position weights, averaged over all
     response tokens of the step;
  5. clip, step the optimizer, then the step hooks: the schedules (LR, TAID) and the teacher's
     (an EMA teacher follows the student).
Methods are configurations of this loop (see docs/objectives.md), not subclasses.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from opdistill import run_dir
from opdistill.adaptive import validation_loss
from opdistill.batch import (
    Batch,
    batch_logits,
    batch_projected,
    check_completions,
    dataset_batch,
    projectable_head,
)
from opdistill.checkpoint import Checkpoints, RandomState
from opdistill.config import (
    Config,
    needs_teacher,
    samples_from_teacher,
    samples_teacher_mixture,
)
from opdistill.errors import OpdistillError
from opdistill.eval.evaluate import evaluate_with_config
from opdistill.losses import TaidSchedule, group_advantages
from opdistill.losses.projected import ProjectedLogits
from opdistill.models.loading import (
    DTYPES,
    check_vocabulary,
    load_model,
    load_tokenizer,
)
from opdistill.models.lora import add_lora, is_lora, save_merged
from opdistill.objectives import (
    StepInputs,
    TeacherScores,
    chunks_output,
    objective_for,
    per_token_loss,
    reduce_weighted,
    teacher_answer,
    token_weights,
    uses_token_weights,
)
from opdistill.prompts import context_window, fit_split
from opdistill.replay import ReplayBuffer
from opdistill.rollout import (
    RolloutBackend,
    SamplerMismatch,
    build_samplers,
    decode_responses,
    push_weights,
)
from opdistill.rollout.hf_static import StaticRollout
from opdistill.rollout.pipeline import build_pipeline
from opdistill.run_log import RunLog, StepStats, summarise_window, truncate_metrics
from opdistill.stream import ExampleStream
from opdistill.tasks import make_task
from opdistill.tasks.base import Example, Task
from opdistill.tasks.mixture import make_mixture
from opdistill.teachers import (
    Teacher,
    TopKLogprobs,
    accuracy_by_teacher,
    build_teacher,
    check_answers,
    cross_tokenizer_teacher,
    open_teacher,
)
from opdistill.timing import PhaseTimer

__all__ = ["ExampleStream", "StepStats", "Trainer", "build_trainer", "truncate_metrics"]


class Trainer:
    """Trains `student` against `teacher` following `config`; see the module docstring.

    The teacher is `teacher` (any `Teacher`), or `teacher_model` held in this process (which can
    also sample, for SeqKD and MiniLLM's mixture), or under `self_distill` the student itself.
    """

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
        _shard_on_cpu(self.accelerator)
        rank = self.accelerator.process_index
        RandomState.seed(tc.seed, rank)  # each process draws its own samples
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.task = task
        self.eval_examples = list(eval_examples)
        self.stream = ExampleStream(train_examples, tc.seed)
        self.coin = random.Random(tc.seed)  # λ coin: identical on every process
        self.step_count = 0

        # LoRA: the adapters only. Fused: one kernel per parameter, without the foreach
        # implementation's temporaries the size of all parameters.
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            fused=True,
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

        _check_dtypes(config, student, teacher_model)
        if teacher_model is not None:
            teacher_model.to(self.accelerator.device)
        self.teacher = build_teacher(
            config,
            tokenizer,
            opened=teacher,
            teacher_model=teacher_model,
            student=unwrapped,
            task=task,
            examples=self.stream.examples,
        )
        if needs_teacher(config) and self.teacher is None:
            raise OpdistillError(
                f"loss.kind={lc.kind!r} / train.off_policy_source={tc.off_policy_source!r} "
                "needs a teacher model"
            )
        self.teacher_answer = teacher_answer(config)
        if self.teacher is not None:
            check_answers(self.teacher, self.teacher_answer, f"loss.kind={lc.kind!r}")

        # Samplers: the student (or MiniLLM's teacher–student mixture), and the teacher. Sampler
        # log-probs feed the importance ratio / PPO clip and the replay buffer only.
        adaptive = tc.adaptive_source
        record = objective_for(config).sampler_logprobs or adaptive.enabled
        self.student_sampler: RolloutBackend
        self.teacher_sampler: RolloutBackend | None
        self.student_sampler, self.teacher_sampler = build_samplers(
            config, unwrapped, teacher_model, tokenizer, record
        )
        self.pipeline = None  # train.max_staleness >= 1: rollouts sampled ahead by a worker
        if tc.max_staleness:
            self.pipeline = build_pipeline(
                config,
                unwrapped,
                self.student_sampler,
                lambda model: StaticRollout(model, tokenizer, record, config.rollout.compile),
                self._step_prompts,
            )
        if teacher_model is None and (
            samples_from_teacher(config) or samples_teacher_mixture(config)
        ):
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
        self.replay = (
            ReplayBuffer(adaptive.replay_size, tokenizer.pad_token_id, tc.seed)
            if adaptive.enabled
            else None
        )
        self.token_generator = torch.Generator().manual_seed(tc.seed + rank)
        self.random_state = RandomState(
            {"coin": self.coin, "token_generator": self.token_generator},
            process_index=rank,
            num_processes=self.accelerator.num_processes,
        )
        # Logits formed per chunk need the student's plain linear head, and a whole model here.
        sharded = self.accelerator.distributed_type in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        )
        self.output_chunkable = not sharded and projectable_head(unwrapped) is not None

        if self.accelerator.distributed_type == DistributedType.FSDP and tc.save_every:
            raise OpdistillError(
                f"train.save_every={tc.save_every}: checkpoints of FSDP runs are not supported "
                "yet (set train.save_every: 0; final/ is saved), see docs/scaling.md"
            )

        self.output_dir = Path(tc.output_dir)
        self.checkpoints = Checkpoints(self.output_dir / "checkpoints", tc.keep_checkpoints)
        self.run_log = RunLog(self.output_dir, self.accelerator.is_main_process)
        self.train_seconds = 0.0  # time spent in steps, without evaluation and checkpoints
        self.skipped_steps = 0  # non-finite steps skipped under train.on_nonfinite: skip

    # ----------------------------------------------------------------------------------- step
    def step(self) -> StepStats:
        """One optimizer step over `batch_size × grad_accum` sequences on each process."""
        tc = self.config.train
        started = time.perf_counter()
        self.student.train()

        # 1. Pick the batch source with probability λ (φ under the adaptive schedule).
        on_policy = self.coin.random() < self.student_data_fraction

        # 2. Roll out: student samples, teacher samples (SeqKD) or dataset completions.
        timer = PhaseTimer(self.accelerator.device)
        staleness = 0
        if self.pipeline is not None:  # sampled ahead by the rollout worker
            with timer.phase("waiting"):
                batches, version, seconds = self.pipeline.next(self.step_count + 1)
            timer.add("generation", seconds)  # the worker's, concurrent with earlier steps
            staleness = self.step_count - version
        else:
            with timer.phase("generation"):
                batches = [self._next_batch(on_policy) for _ in range(tc.grad_accum)]
        sampled = on_policy or tc.off_policy_source == "teacher"
        rewards = [self._rewards(b) if on_policy and self.rewarded else None for b in batches]

        # The loss is a mean over every response token of the step, on every process.
        num_tokens = self._global_sum(sum(b.num_tokens for b in batches))
        num_sequences = self._global_sum(sum(len(b.examples) for b in batches))
        world = self.accelerator.num_processes  # DDP averages gradients over processes
        taid_t = self.taid.t if self.taid is not None else 1.0

        total_loss = 0.0
        mismatch = SamplerMismatch(tc.temperature)
        for index, (batch, reward) in enumerate(zip(batches, rewards, strict=True)):
            batch = batch.to(self.accelerator.device)
            last = index == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.student):
                # Large vocabularies: logits formed per chunk of positions inside the loss.
                chunked = self.output_chunkable and chunks_output(
                    self.config, batch.response_ids.numel(), self.vocab_size
                )
                # 3. Score with the teacher (no gradient).
                with timer.phase("teacher"):
                    teacher_scores = self._teacher_scores(batch, chunked)
                # 4. Loss.
                with timer.phase("forward_backward"):
                    student_logits = self._student_logits(batch, chunked)
                if on_policy:
                    mismatch.add(student_logits, batch)
                with timer.phase("loss"):
                    loss = self._loss(
                        batch,
                        student_logits,
                        teacher_scores,
                        reward,
                        taid_t,
                        num_tokens,
                        num_sequences,
                    )
                with timer.phase("forward_backward"):
                    self.accelerator.backward(loss * world)
            total_loss += float(loss.detach()) * world

        # 5. Clip and step (never from a non-finite loss or gradient), then the step hooks.
        total_loss = self._global_mean(total_loss)
        lr = self.scheduler.get_last_lr()[0]
        with timer.phase("optimizer"):
            grad_norm = self._optimizer_step(total_loss)
        self.step_count += 1
        with timer.phase("optimizer"):  # the sampler's copy of the weights follows (vLLM)
            if self.pipeline is not None:
                self.pipeline.after_optimizer_step(self.step_count)
            else:
                push_weights(self.student_sampler, self.accelerator.unwrap_model(self.student))
        if self.taid is not None:
            self.taid.update(self.step_count, total_loss)
        mean_reward = None
        if any(r is not None for r in rewards):
            mean_reward = float(torch.cat([r for r in rewards if r is not None]).mean())
        teacher_metrics = self.teacher.metrics() if self.teacher_answer is not None else {}
        return StepStats(
            loss=total_loss,
            on_policy=on_policy,
            num_tokens=num_tokens,
            grad_norm=grad_norm,
            lr=lr,
            seconds=time.perf_counter() - started,
            reward=mean_reward,
            context_fraction=teacher_metrics.pop("context_fraction", None),
            teacher_metrics=teacher_metrics,
            phases=timer.seconds,
            generated_tokens=sum(b.num_tokens for b in batches) if sampled else 0,
            sampler_mismatch=mismatch.mean(),
            staleness=float(staleness),
        )

    def _loss(
        self,
        batch: Batch,
        student_logits: torch.Tensor | ProjectedLogits,
        teacher_scores: TeacherScores,
        reward: torch.Tensor | None,
        taid_t: float,
        num_tokens: int,
        num_sequences: int,
    ) -> torch.Tensor:
        """The objective's per-token loss, TIP/position weights, reduced over the step's tokens."""
        advantages = None
        if reward is not None:
            advantages = group_advantages(
                reward.to(batch.response_ids.device),
                self.config.reward.group_size,
                normalize_std=self.config.reward.normalize_std,
            )
        per_token = per_token_loss(
            self.config,
            student_logits,
            teacher_scores,
            batch,
            StepInputs(taid_t=taid_t, advantages=advantages),
        )
        if self.teacher is not None and teacher_scores is not None:
            self.teacher.observe(batch, per_token, student_logits)
        weights = None
        if uses_token_weights(self.config):  # TIP selection, position weights
            weights = token_weights(
                self.config,
                student_logits,
                teacher_scores,
                batch.response_mask,
                self.token_generator,
            )
        return reduce_weighted(
            self.config, per_token, weights, batch.response_mask, num_tokens, num_sequences
        )

    def _next_batch(self, on_policy: bool) -> Batch:
        """A micro-batch from the source the λ coin picked."""
        tc = self.config.train
        if on_policy:
            return self._student_batch()
        examples = self._take_examples(tc.batch_size)
        if tc.off_policy_source == "teacher":
            return self._sample(self.teacher_sampler, examples)
        return dataset_batch(self.tokenizer, examples)

    def _teacher_scores(self, batch: Batch, chunked: bool) -> TeacherScores:
        """The teacher's cheapest sufficient answer: logits [B, R, V] (with `chunked`, as hidden
        states and projection where it can), its top-k log-probs, or the response tokens'
        log-probs (a `TopKLogprobs` with k = 0)."""
        lc, answer = self.config.loss, self.teacher_answer
        if answer is None:
            return None
        if answer == "logits" and chunked and "projected" in self.teacher.answers:
            return self.teacher.projected_logits(batch)
        if answer == "topk":
            return self.teacher.topk(batch, lc.teacher_top_k, lc.temperature)
        if answer == "token_logprobs":
            return TopKLogprobs.tokens(self.teacher.token_logprobs(batch, lc.temperature))
        return self.teacher.logits(batch)

    def _student_logits(self, batch: Batch, chunked: bool) -> torch.Tensor | ProjectedLogits:
        if chunked:
            unwrapped = self.accelerator.unwrap_model(self.student)
            return batch_projected(self.student, unwrapped, batch, self.vocab_size)
        return batch_logits(self.student, batch, self.vocab_size)

    def _optimizer_step(self, total_loss: float) -> float:
        """Clip and step the optimizer and schedules (a non-finite step stops or is skipped);
        return the gradient norm."""
        tc = self.config.train
        grad_norm = float(
            self.accelerator.clip_grad_norm_(
                self.student.parameters(), tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf
            )
        )
        if math.isfinite(total_loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()  # a skipped step does not advance the schedule either
            if self.teacher is not None:
                self.teacher.after_optimizer_step(self.accelerator.unwrap_model(self.student))
        else:
            culprit = self._nonfinite_tensor(total_loss)
            self.optimizer.zero_grad(set_to_none=True)
            if tc.on_nonfinite == "stop":
                raise OpdistillError(
                    f"step {self.step_count + 1}: {culprit} is not finite (loss {total_loss}, "
                    f"gradient norm {grad_norm}); stopping before the weights are updated "
                    "(train.on_nonfinite: skip skips such steps instead)"
                )
            warnings.warn(
                f"step {self.step_count + 1}: {culprit} is not finite; step skipped", stacklevel=3
            )
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

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

    def _step_prompts(self) -> list[list[Example]]:
        """The prompts of one step's micro-batches (pipelined rollouts draw them ahead)."""
        tc = self.config.train
        group = self.config.reward.group_size if self.rewarded else 1
        return [
            [e for e in self._take_examples(tc.batch_size // group) for _ in range(group)]
            for _ in range(tc.grad_accum)
        ]

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
        is_main = self.accelerator.is_main_process
        with run_dir.RunLock(self.output_dir) if is_main else nullcontext():
            return self._train(resume and bool(run_dir.contents(self.output_dir)))

    def _train(self, resume: bool) -> dict[str, Any]:
        tc = self.config.train
        is_main = self.accelerator.is_main_process
        changes = run_dir.resume_changes(self.output_dir, self.config) if resume else {}
        if resume:
            self.load_latest_checkpoint()
            if self.step_count > tc.steps:
                raise OpdistillError(
                    f"--resume: train.steps={tc.steps} is below the step of the newest "
                    f"checkpoint ({self.step_count}); set train.steps >= {self.step_count}"
                )
        if is_main and resume:  # the run's config.yaml stays; what changed is recorded
            run_dir.record_resume(self.output_dir, self.step_count, changes)
            # steps after the checkpoint are run again: drop their records
            truncate_metrics(self.output_dir / "metrics.jsonl", self.step_count or -1)
        elif is_main:
            run_dir.start(self.output_dir, self.config)
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
                self._log("train", summarise_window(window))
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
        if self.pipeline is not None:
            self.pipeline.close()
        if not evaluated:
            final = self.evaluate()
            self._log("eval", final)
        self.save_final()
        self.run_log.close()
        return final

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current student (every process computes the same; main logs)."""
        if not self.eval_examples:
            return {}
        reports = self.teacher is not None and self.teacher.reports_distance
        result = evaluate_with_config(
            self.accelerator.unwrap_model(self.student),
            self.tokenizer,
            self.task,
            self.eval_examples,
            self.config.eval,
            teacher=self.teacher if reports else None,
            seed=self.config.data.seed,
        )
        shown = self.eval_examples[: self.config.eval.num_prompts]
        correct = result.greedy_correct
        result.update(accuracy_by_teacher(shown, correct, self.config.model.teacher_field))
        return result

    def validation_loss(self) -> float:
        """DistiLLM's validation divergence on held-out reference completions."""
        return validation_loss(
            self.config,
            self.accelerator.unwrap_model(self.student),
            self.teacher,
            self.tokenizer,
            self.eval_examples,
            self.accelerator.device,
        )

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
        self.run_log.log(split, self.step_count, metrics)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The loop's own counters (the rest of the training state is in `_stateful`)."""
        return {
            "student_data_fraction": self.student_data_fraction,
            "last_validation_loss": self.last_validation_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student_data_fraction = state["student_data_fraction"]
        self.last_validation_loss = state["last_validation_loss"]

    def _stateful(self) -> dict[str, Any]:
        """Every object whose state a checkpoint holds, by name."""
        objects = {
            "trainer": self,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "stream": self.stream,
            "rng": self.random_state,
            "taid": self.taid,
            "replay": self.replay,
            "teacher": self.teacher,
            "pipeline": self.pipeline,
        }
        return {name: obj for name, obj in objects.items() if obj is not None}

    def _networks(self) -> dict[str, torch.nn.Module]:
        return self.teacher.networks() if self.teacher is not None else {}

    def save_checkpoint(self) -> Path:
        """The training state after this step, written atomically (see `opdistill.checkpoint`)."""
        self.accelerator.wait_for_everyone()
        self.random_state.gather()  # every process's RNG state, on every process
        if self.accelerator.is_main_process:
            path = self.checkpoints.save(
                self.step_count,
                self.accelerator.unwrap_model(self.student),
                self.tokenizer,
                self._stateful(),
                self._networks(),
            )
        else:
            path = self.checkpoints.directory / f"step-{self.step_count:08d}"
        self.accelerator.wait_for_everyone()
        return path

    def load_latest_checkpoint(self) -> Path | None:
        """Restore the newest readable checkpoint (an unreadable one is skipped with a warning);
        start fresh when there is none."""
        restored = self.checkpoints.restore_latest(
            self.accelerator.unwrap_model(self.student), self._stateful(), self._networks()
        )
        if restored is None:
            return None
        path, self.step_count = restored
        return path

    def save_final(self) -> Path:
        """The trained student and its tokenizer under `output_dir/final`, written by the main
        process (every process calls this: sharded parameters are gathered first).

        A LoRA student is saved merged (a plain causal LM) with its adapters in `final/adapter`.
        """
        path = self.output_dir / "final"
        student = self.accelerator.unwrap_model(self.student)
        sharded = self.accelerator.distributed_type == DistributedType.FSDP
        state_dict = None
        if sharded:  # gathered copies share no storage: drop the tied aliases (lm_head)
            state_dict = self.accelerator.get_state_dict(self.student)
            for alias in getattr(student, "all_tied_weights_keys", {}):
                state_dict.pop(alias, None)
        if self.accelerator.is_main_process:
            if is_lora(student):
                student.save_pretrained(path / "adapter", state_dict=state_dict)
                save_merged(student, path)
            else:
                student.save_pretrained(path, state_dict=state_dict)
            self.tokenizer.save_pretrained(path)
        self.accelerator.wait_for_everyone()
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


def _check_dtypes(
    config: Config, student: torch.nn.Module, teacher_model: torch.nn.Module | None
) -> None:
    """The student and an in-process teacher hold their weights in one dtype: `model.dtype`, in
    which `build_trainer` loads both (models passed in directly must agree with it)."""
    expected = DTYPES[config.model.dtype]
    for name, model in (("student", student), ("teacher", teacher_model)):
        if model is None:
            continue
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), expected)
        if dtype != expected:
            raise OpdistillError(
                f"model.dtype={config.model.dtype!r}, but the {name}'s weights are {dtype}: "
                "load the student and the teacher in model.dtype"
            )


def _shard_on_cpu(accelerator: Accelerator) -> None:
    """Apply an FSDP launch (`ACCELERATE_USE_FSDP`, set by an FSDP accelerate config) to CPU
    processes joined over gloo.

    accelerate 1.15 marks such processes MULTI_CPU and then ignores the FSDP plugin, training
    them as DDP; torch's FSDP2 (`fully_shard`) runs on CPU over gloo, so the state is switched
    to FSDP before the student is prepared. GPUs take accelerate's own path.
    """
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables of the launch
    if plugin.fsdp_version != 2:
        raise OpdistillError(
            f"fsdp_version: {plugin.fsdp_version} on CPU: only FSDP2 (fsdp_config.fsdp_version: "
            "2) shards over gloo, see docs/scaling.md"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def build_trainer(config: Config) -> Trainer:
    """Load tokenizer, models and task data named by `config` and return a ready `Trainer`."""
    mc, dc = config.model, config.data
    # cheap checks first, before loading weights
    task = make_mixture(dc.mix) if dc.mix else make_task(dc.task, **dc.task_args)
    tokenizer = load_tokenizer(mc.tokenizer or mc.student)
    teacher = open_teacher(config, tokenizer)  # served or cached: no teacher weights here
    student = load_model(mc.student, mc.dtype)
    check_vocabulary(student, tokenizer, "model.student")
    if mc.lora.r > 0:
        student = add_lora(student, mc.lora)
    teacher_model = None
    if mc.teacher and teacher is None:
        teacher_tokenizer = load_tokenizer(mc.teacher) if mc.tokenizer is None else tokenizer
        teacher = cross_tokenizer_teacher(config, teacher_tokenizer, tokenizer)  # None: same
    if mc.teacher and teacher is None:
        teacher_model = load_model(mc.teacher, mc.dtype)
        check_vocabulary(teacher_model, tokenizer, "model.teacher")
    window = context_window(student, teacher_model)
    if teacher is not None and teacher.context_window:  # prompts fitted as the teacher's were
        window = min(window or teacher.context_window, teacher.context_window)
    fits = {
        split: fit_split(
            dc,
            tokenizer,
            window,
            task.examples(split, size, seed=dc.seed) if size or split == "train" else [],
            split,
            max_new_tokens,
        )
        for split, size, max_new_tokens in (
            ("train", dc.train_size, config.train.max_new_tokens),
            ("eval", dc.eval_size, config.eval.max_new_tokens),
        )
    }
    if config.train.student_data_fraction < 1 and config.train.off_policy_source == "dataset":
        check_completions(fits["train"].examples)  # every row an off-policy batch may draw
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
        teacher=teacher,
        data_report=data_report,
    )
