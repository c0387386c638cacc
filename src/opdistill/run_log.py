"""What a run records: `metrics.jsonl` (one JSON object a line) and TensorBoard scalars."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from opdistill.files import append_line, write_atomic


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
    teacher_metrics: dict[str, float] = field(default_factory=dict)  # `Teacher.metrics()`
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (`timing.PHASES`)
    generated_tokens: int = 0  # response tokens sampled by this step's rollouts (this process)
    staleness: float = 0.0  # optimizer steps between the sampling weights and these (mean)
    sampler_mismatch: float | None = None  # mean |log π_learner − log π_sampler| per token

    @property
    def context_fraction(self) -> float | None:
        """Self-distillation: the share of teacher rows that had privileged context."""
        return self.teacher_metrics.get("context_fraction")


class RunLog:
    """Appends records to `output_dir/metrics.jsonl` and `output_dir/tensorboard` (main process)."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.output_dir = output_dir
        self.enabled = enabled
        self._writer: SummaryWriter | None = None

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._writer is None:  # purge_step: events after a resumed checkpoint are dropped
            self._writer = SummaryWriter(
                str(self.output_dir / "tensorboard"), purge_step=step or None
            )
        for name, value in metrics.items():
            self._writer.add_scalar(f"{split}/{name}", value, step)
        append_line(
            self.output_dir / "metrics.jsonl", json.dumps({"step": step, "split": split, **metrics})
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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


def summarise_window(window: Sequence[StepStats]) -> dict[str, float]:
    """The means over the steps since the last train record."""
    rewards = [s.reward for s in window if s.reward is not None]
    per_teacher: dict[str, list[float]] = {}
    for stats in window:
        for name, value in stats.teacher_metrics.items():
            per_teacher.setdefault(name, []).append(value)
    mismatches = [s.sampler_mismatch for s in window if s.sampler_mismatch is not None]
    phases = sorted({name for s in window for name in s.phases})
    seconds = {
        f"seconds_{name}": float(np.mean([s.phases.get(name, 0.0) for s in window]))
        for name in phases
    }
    generation = sum(s.phases.get("generation", 0.0) for s in window)
    generated = sum(s.generated_tokens for s in window)
    return {
        **{name: float(np.mean(values)) for name, values in per_teacher.items()},
        **({"reward": float(np.mean(rewards))} if rewards else {}),
        **({"sampler_mismatch": float(np.mean(mismatches))} if mismatches else {}),
        **seconds,
        **(
            {"generated_tokens_per_second": generated / generation}
            if generated and generation > 0
            else {}
        ),
        "staleness": float(np.mean([s.staleness for s in window])),
        "loss": float(np.mean([s.loss for s in window])),
        "on_policy_fraction": float(np.mean([s.on_policy for s in window])),
        "tokens_per_step": float(np.mean([s.num_tokens for s in window])),
        "grad_norm": float(np.mean([s.grad_norm for s in window])),
        "lr": window[-1].lr,
        "seconds_per_step": float(np.mean([s.seconds for s in window])),
    }
