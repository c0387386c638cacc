"""Where a step's micro-batches come from: the student's samples, the teacher's, or the dataset."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from opdistill.batch import Batch, dataset_batch
from opdistill.config import Config
from opdistill.replay import ReplayBuffer
from opdistill.rollout import RolloutBackend, decode_responses
from opdistill.stream import ExampleStream
from opdistill.tasks.base import Example, Task


class BatchSources:
    """The micro-batches of a step, each process taking its share of one example stream.

    On-policy: student samples, `reward.group_size` per prompt when a verifier reward is mixed
    in, or (DistiLLM) drawn again from the replay buffer. Off-policy: the teacher's samples
    (SeqKD) or the dataset's completions.
    """

    def __init__(
        self,
        config: Config,
        stream: ExampleStream,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        student_sampler: RolloutBackend,
        teacher_sampler: RolloutBackend | None,
        replay: ReplayBuffer | None,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.config = config
        self.stream = stream
        self.tokenizer = tokenizer
        self.task = task
        self.student_sampler = student_sampler
        self.teacher_sampler = teacher_sampler
        self.replay = replay
        self.process_index = process_index
        self.num_processes = num_processes
        self.group = config.reward.group_size if config.reward.distill_weight < 1.0 else 1

    def next_batch(self, on_policy: bool) -> Batch:
        """A micro-batch from the source the λ coin picked."""
        tc = self.config.train
        if on_policy:
            return self.student_batch()
        examples = self.take(tc.batch_size)
        if tc.off_policy_source == "teacher":
            return self.sample(self.teacher_sampler, examples)
        return dataset_batch(self.tokenizer, examples)

    def student_batch(self) -> Batch:
        """A micro-batch of student samples: fresh, grouped per prompt, or from the replay."""
        tc, adaptive = self.config.train, self.config.train.adaptive_source
        replay = self.replay
        if replay is not None and len(replay) >= tc.batch_size:  # noqa: SIM102 (draw order)
            if replay.rng.random() < adaptive.replay_reuse:
                return replay.sample(tc.batch_size)
        prompts = self.take(tc.batch_size // self.group)
        batch = self.sample(self.student_sampler, [e for e in prompts for _ in range(self.group)])
        if replay is not None:
            replay.add(batch)
        return batch

    def step_prompts(self) -> list[list[Example]]:
        """The prompts of one step's micro-batches (pipelined rollouts draw them ahead)."""
        tc = self.config.train
        return [
            [e for e in self.take(tc.batch_size // self.group) for _ in range(self.group)]
            for _ in range(tc.grad_accum)
        ]

    def take(self, size: int) -> list[Example]:
        """This process's share of the next global micro-batch (same stream on every process)."""
        examples = self.stream.take(size * self.num_processes)
        return examples[self.process_index * size : (self.process_index + 1) * size]

    def sample(self, sampler: RolloutBackend, examples: list[Example]) -> Batch:
        tc = self.config.train
        return sampler.generate(examples, tc.max_new_tokens, tc.temperature)

    def rewards(self, batch: Batch) -> torch.Tensor:
        """The task verifier's 0/1 reward of every sampled response."""
        texts = decode_responses(self.tokenizer, batch)
        correct = [self.task.is_correct(e, t) for e, t in zip(batch.examples, texts, strict=True)]
        return torch.tensor(correct, dtype=torch.float32)
