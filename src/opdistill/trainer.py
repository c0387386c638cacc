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

import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill import run_dir
from opdistill.adaptive import validation_loss
from opdistill.batch import Batch, batch_logits, batch_projected, projectable_head
from opdistill.checkpoint import Checkpoints, RandomState, save_final
from opdistill.config import Config
from opdistill.distributed import (
    check_checkpointing,
    check_launch,
    global_mean,
    global_sum,
    is_sharded,
    shard_on_cpu,
)
from opdistill.errors import OpdistillError
from opdistill.eval import EvalRecords, evaluate_with_config
from opdistill.losses import TaidSchedule
from opdistill.losses.projected import ProjectedLogits
from opdistill.models.loading import check_dtypes
from opdistill.objectives import chunks_output, objective_for, step_loss, teacher_answer
from opdistill.optim import make_optimizer, optimizer_step
from opdistill.replay import ReplayBuffer
from opdistill.rollout import RolloutBackend, SamplerMismatch, build_samplers, push_weights
from opdistill.rollout.hf_static import StaticRollout
from opdistill.rollout.pipeline import build_pipeline
from opdistill.run_log import RunLog, StepStats, summarise_window, truncate_metrics
from opdistill.sources import BatchSources
from opdistill.stream import ExampleStream
from opdistill.tasks.base import Example, Task
from opdistill.teachers import (
    Teacher,
    accuracy_by_teacher,
    ask_teacher,
    build_teacher,
    check_teacher,
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
        check_launch(self.accelerator)
        shard_on_cpu(self.accelerator)
        rank = self.accelerator.process_index
        RandomState.seed(tc.seed, rank)  # each process draws its own samples
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.task = task
        self.eval_examples = list(eval_examples)
        self.stream = ExampleStream(train_examples, tc.seed)
        self.coin = random.Random(tc.seed)  # λ coin: identical on every process
        self.step_count = 0

        optimizer, scheduler = make_optimizer(tc, student)
        self.student, self.optimizer, self.scheduler = self.accelerator.prepare(
            student, optimizer, scheduler
        )
        unwrapped = self.accelerator.unwrap_model(self.student)

        check_dtypes(config.model.dtype, student=student, teacher=teacher_model)
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
        self.teacher_answer = teacher_answer(config)
        self.anchored = config.self_distill.enabled and config.self_distill.anchor_weight > 0
        check_teacher(config, self.teacher, self.teacher_answer)

        if config.eval.backend == "vllm" and config.rollout.backend != "vllm":
            raise OpdistillError(
                "eval.backend=vllm samples with the student's vLLM engine during training: "
                "set rollout.backend=vllm (or eval.backend=hf)"
            )
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
                lambda: self.sources.step_prompts(),
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
        self.sources = BatchSources(
            config,
            self.stream,
            tokenizer,
            task,
            self.student_sampler,
            self.teacher_sampler,
            self.replay,
            rank,
            self.accelerator.num_processes,
        )
        self.token_generator = torch.Generator().manual_seed(tc.seed + rank)
        self.random_state = RandomState(
            {"coin": self.coin, "token_generator": self.token_generator},
            process_index=rank,
            num_processes=self.accelerator.num_processes,
        )
        # Logits formed per chunk need the student's plain linear head, and a whole model here.
        sharded = is_sharded(self.accelerator)
        self.output_chunkable = not sharded and projectable_head(unwrapped) is not None

        check_checkpointing(self.accelerator, tc.save_every, self._networks())

        self.output_dir = Path(tc.output_dir)
        self.checkpoints = Checkpoints(self.output_dir / "checkpoints", tc.keep_checkpoints)
        self.run_log = RunLog(self.output_dir, self.accelerator.is_main_process)
        self.records = EvalRecords(config.eval, task, self.accelerator.is_main_process)
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
                batches = [self.sources.next_batch(on_policy) for _ in range(tc.grad_accum)]
        sampled = on_policy or tc.off_policy_source == "teacher"
        rewards = [
            self.sources.rewards(b) if on_policy and self.rewarded else None for b in batches
        ]

        # The loss is a mean over every response token of the step, on every process.
        num_tokens = global_sum(self.accelerator, sum(b.num_tokens for b in batches))
        num_sequences = global_sum(self.accelerator, sum(len(b.examples) for b in batches))
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
                    teacher_scores = ask_teacher(
                        self.teacher, self.teacher_answer, batch, self.config.loss, chunked
                    )
                    anchor = self.teacher.base_logits(batch) if self.anchored else None
                # 4. Loss.
                with timer.phase("forward_backward"):
                    student_logits = self._student_logits(batch, chunked)
                if on_policy:
                    mismatch.add(student_logits, batch)
                with timer.phase("loss"):
                    loss = step_loss(
                        self.config,
                        student_logits,
                        teacher_scores,
                        batch,
                        (num_tokens, num_sequences),
                        taid_t=taid_t,
                        rewards=reward,
                        generator=self.token_generator,
                        observe=self.teacher.observe if self.teacher is not None else None,
                        base_logits=anchor,
                    )
                with timer.phase("forward_backward"):
                    self.accelerator.backward(loss * world)
            total_loss += float(loss.detach()) * world

        # 5. Clip and step (never from a non-finite loss or gradient), then the step hooks.
        total_loss = global_mean(self.accelerator, total_loss)
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
            teacher_metrics=teacher_metrics,
            phases=timer.seconds,
            generated_tokens=sum(b.num_tokens for b in batches) if sampled else 0,
            sampler_mismatch=mismatch.mean(),
            staleness=float(staleness),
        )

    def _student_logits(self, batch: Batch, chunked: bool) -> torch.Tensor | ProjectedLogits:
        if chunked:
            unwrapped = self.accelerator.unwrap_model(self.student)
            return batch_projected(self.student, unwrapped, batch, self.vocab_size)
        return batch_logits(self.student, batch, self.vocab_size)

    def _optimizer_step(self, total_loss: float) -> float:
        """Clip and step (a non-finite step stops or is skipped), then the teacher's hook."""
        grad_norm, stepped = optimizer_step(
            self.accelerator,
            self.student,
            self.optimizer,
            self.scheduler,
            self.config.train,
            total_loss,
            self.step_count + 1,
        )
        if stepped and self.teacher is not None:
            self.teacher.after_optimizer_step(self.accelerator.unwrap_model(self.student))
        self.skipped_steps += not stepped
        return grad_norm

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
                self._log("eval", self.records.record(self.step_count, final, self.train_seconds))
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
            self._log("eval", self.records.record(self.step_count, final, self.train_seconds))
        self.save_final()
        self.run_log.close()
        return final

    def close(self) -> None:
        """Stop the rollout worker and release the student's engine (a vLLM engine's memory, a
        server connection); the trainer cannot sample afterwards."""
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        close = getattr(self.student_sampler, "close", None)
        if close is not None:
            close()

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current student (every process computes the same; main logs)."""
        if not self.eval_examples:
            return {}
        reports = self.teacher is not None and self.teacher.reports_distance
        rollout = None
        if self.config.eval.backend == "vllm":  # the engine already holds the current weights
            if self.pipeline is not None:
                self.pipeline.drain()  # the worker, done with its requests, leaves it free
            rollout = self.student_sampler
        result = evaluate_with_config(
            self.accelerator.unwrap_model(self.student),
            self.tokenizer,
            self.task,
            self.eval_examples,
            self.config.eval,
            teacher=self.teacher if reports else None,
            seed=self.config.data.seed,
            rollout=rollout,
        )
        shown, correct = self.eval_examples[: self.config.eval.num_prompts], result.greedy_correct
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
        """The training state after this step, written atomically; every process calls this
        (sharded runs save through accelerate, see `opdistill.checkpoint`)."""
        return self.checkpoints.save_run(
            self.accelerator,
            self.step_count,
            self.student,
            self.tokenizer,
            self._stateful(),
            self._networks(),
        )

    def load_latest_checkpoint(self) -> Path | None:
        """Restore the newest readable checkpoint (an unreadable one is skipped with a warning);
        start fresh when there is none."""
        restored = self.checkpoints.restore_run(
            self.accelerator, self.student, self._stateful(), self._networks()
        )
        if restored is None:
            return None
        path, self.step_count = restored
        return path

    def save_final(self) -> Path:
        """The trained student and its tokenizer under `output_dir/final` (a LoRA student merged,
        its adapters in `final/adapter`); every process calls this (see `checkpoint.save_final`)."""
        return save_final(self.accelerator, self.student, self.tokenizer, self.output_dir / "final")


def build_trainer(config: Config) -> Trainer:
    """Load tokenizer, models and task data named by `config` and return a ready `Trainer`
    (see `opdistill.build`)."""
    from opdistill.build import build_trainer as build

    return build(config)
