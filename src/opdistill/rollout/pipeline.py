"""Pipelined rollouts (`train.max_staleness: S ≥ 1`): a worker thread samples the batches of the
next steps while the learner trains on the current one.

Schedule (deterministic, whatever the threads' timing): the batches of step j are sampled by the
weights after optimizer step max(0, j − 1 − S), so a batch is never more than S steps stale and
its staleness is exactly min(j − 1, S). After optimizer step k the learner queues a snapshot of
θ_k and the prompts of step k + 1 + S; the worker applies snapshots and serves requests in that
order, on its own copy of the student (or its own vLLM engine). Each request samples with a
generator seeded from (train.seed, step), so draws do not depend on the global RNG.

Checkpoints hold the in-flight batches (the worker is drained first): a resumed run trains on
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from opdistill.batch import Batch
from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example

Prompts = list[list[Example]]  # the micro-batches of one step


def request_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """The sampling generator of one micro-batch of one step."""
    return torch.Generator().manual_seed(
        ((seed * 1_000_003 + step) * 1_000_003 + micro_batch) % 2**63
    )


class StudentCopy:
    """A sampler over a private copy of the student, updated from weight snapshots."""

    def __init__(self, student: torch.nn.Module, make_rollout: Callable[[torch.nn.Module], Any]):
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.rollout = make_rollout(self.model)

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)

    def generate(self, *args: Any, **kwargs: Any) -> Batch:
        return self.rollout.generate(*args, **kwargs)


class RolloutPipeline:
    """Serves each step's batches, sampled ahead by a worker thread (see the module docstring).

    sampler: has `generate(examples, max_new_tokens, temperature, generator=...)` and
        `load_state(state_dict)`; it holds its own weights.
    draw_prompts: the next step's micro-batches of prompts (called on the learner's thread).
    """

    def __init__(
        self,
        sampler: Any,
        student: torch.nn.Module,
        draw_prompts: Callable[[], Prompts],
        max_staleness: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ):
        if max_staleness < 1:
            raise ValueError("a pipeline needs max_staleness >= 1")
        self.sampler, self.student = sampler, student
        self.draw_prompts = draw_prompts
        self.max_staleness = max_staleness
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.primed = False
        self._inbox: queue.Queue = queue.Queue()
        self._ready: dict[int, tuple[int, list[Batch], float]] = {}
        self._pending: set[int] = set()
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._version = 0
        self._worker = threading.Thread(target=self._serve, name="opdistill-rollouts", daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------- learner side
    def next(self, step: int) -> tuple[list[Batch], int, float]:
        """The batches of `step` (1-based), their policy version (the optimizer steps of the
        weights that sampled them) and the worker's seconds spent sampling them."""
        if not self.primed:
            self._prime(step - 1)
        with self._done:
            while step not in self._ready:
                self._raise_worker_error()
                if step not in self._pending:
                    raise OpdistillError(f"rollout pipeline: step {step} was never requested")
                self._done.wait(timeout=1.0)
            version, batches, seconds = self._ready.pop(step)
        return batches, version, seconds

    def after_optimizer_step(self, step_count: int) -> None:
        """Queue θ_k (k = `step_count`) and the prompts of step k + 1 + S."""
        self._push(step_count)
        self._request(step_count + 1 + self.max_staleness)

    def _prime(self, step_count: int) -> None:
        self._push(step_count)
        for step in range(step_count + 1, step_count + 2 + self.max_staleness):
            self._request(step)
        self.primed = True

    def _push(self, version: int) -> None:
        snapshot = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self._inbox.put(("weights", version, snapshot))

    def _request(self, step: int) -> None:
        with self._done:
            self._pending.add(step)
        self._inbox.put(("sample", step, self.draw_prompts()))

    def drain(self) -> None:
        """Wait until every requested batch is ready."""
        with self._done:
            while self._pending:
                self._raise_worker_error()
                self._done.wait(timeout=1.0)

    def close(self) -> None:
        self._inbox.put(None)
        self._worker.join(timeout=60)

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise OpdistillError(
                f"the rollout worker failed: {type(self._error).__name__}: {self._error}"
            ) from self._error

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The in-flight batches (sampled to completion first)."""
        self.drain()
        ready = {
            step: [version, [b.state_dict() for b in batches], seconds]
            for step, (version, batches, seconds) in self._ready.items()
        }
        return {"primed": self.primed, "ready": ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the in-flight batches; the worker continues from the learner's weights."""
        with self._done:
            self._ready = {
                int(step): (int(version), [Batch.from_state_dict(b) for b in batches], seconds)
                for step, (version, batches, seconds) in state["ready"].items()
            }
        if state["primed"]:
            self.primed = True
            self._push(self._resume_version())

    def _resume_version(self) -> int:
        # The checkpoint of step k holds the batches of steps k+1 … k+1+S: the next request,
        # step k+2+S, is sampled by θ_{k+1}, pushed after that step. θ_k is pushed now so the
        # worker's weights are the learner's.
        return min(self._ready) - 1 if self._ready else 0

    # ----------------------------------------------------------------- worker side
    def _serve(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            kind, index, payload = item
            started = time.perf_counter()
            try:
                if kind == "weights":
                    self.sampler.load_state(payload)
                    self._version = index
                    continue
                batches = [
                    self.sampler.generate(
                        examples,
                        self.max_new_tokens,
                        self.temperature,
                        generator=request_generator(self.seed, index, i),
                    )
                    for i, examples in enumerate(payload)
                ]
            except BaseException as error:  # reported on the learner's thread
                with self._done:
                    self._error = error
                    self._done.notify_all()
                return
            with self._done:
                self._ready[index] = (self._version, batches, time.perf_counter() - started)
                self._pending.discard(index)
                self._done.notify_all()


def build_pipeline(
    config: Any,
    student: torch.nn.Module,
    student_sampler: Any,
    make_rollout: Callable[[torch.nn.Module], Any],
    draw_prompts: Callable[[], Prompts],
) -> RolloutPipeline:
    """The pipeline of `train.max_staleness`: on the vLLM engine itself (it holds its own
    weights), else on a private copy of the student sampled by `make_rollout`."""
    tc = config.train
    sampler = (
        student_sampler if config.rollout.backend == "vllm" else StudentCopy(student, make_rollout)
    )
    return RolloutPipeline(
        sampler,
        student,
        draw_prompts,
        tc.max_staleness,
        tc.max_new_tokens,
        tc.temperature,
        tc.seed,
    )
