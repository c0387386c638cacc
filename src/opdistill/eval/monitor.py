"""Teacher hacking: the proxy (distance to the teacher) keeps improving while a golden metric
(distance to the true answers) worsens (Tiapkin et al., "On Teacher Hacking in Language Model
Distillation", 2025).

Both metrics are "lower is better": the proxy is `teacher_rkl` (token reverse KL to the teacher
on the student's samples), the golden one `golden_kl` (`opdistill.eval.golden`). Over the last
`window` evaluations, the flag is raised when the least-squares slope of the proxy per
evaluation is below −`tolerance` and that of the golden metric above +`tolerance`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from opdistill.config import EvalConfig
from opdistill.errors import OpdistillError
from opdistill.tasks.base import Task


def slope(values: Sequence[float]) -> float:
    """The least-squares slope of `values` against 0, 1, 2, ... (0.0 for fewer than 2)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return cov / sum((i - mean_x) ** 2 for i in range(n))


def is_teacher_hacking(
    proxy: Sequence[float], golden: Sequence[float], tolerance: float = 0.0
) -> bool:
    """Whether the proxy falls while the golden metric rises (both lower-is-better) over the
    sequences given (the same evaluations, oldest first; at least 2)."""
    if len(proxy) != len(golden):
        raise ValueError(f"proxy and golden differ in length: {len(proxy)} and {len(golden)}")
    if len(proxy) < 2:
        return False
    return slope(proxy) < -tolerance and slope(golden) > tolerance


@dataclass
class TeacherHackingMonitor:
    """Keeps the proxy and golden metrics of each evaluation and flags teacher hacking."""

    window: int = 4
    tolerance: float = 0.0
    proxy: str = "teacher_rkl"
    golden: str = "golden_kl"
    verbose: bool = True  # print a line when the flag is raised
    history: list[tuple[int, float, float]] = field(default_factory=list)

    def observe(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """`update`, printing `message` when the flag is raised."""
        result = self.update(step, metrics)
        if result.get("teacher_hacking") and self.verbose:
            tqdm.write(self.message(step), file=sys.stderr)
        return result

    def update(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Record an evaluation; once `window` are recorded, return {"teacher_hacking": 0 or 1,
        "proxy_slope", "golden_slope"} over the last `window` (empty before, or when the
        evaluation lacks either metric)."""
        if self.proxy not in metrics or self.golden not in metrics:
            return {}
        self.history.append((step, float(metrics[self.proxy]), float(metrics[self.golden])))
        recent = self.history[-self.window :]
        if len(recent) < self.window:
            return {}
        proxy, golden = [p for _, p, _ in recent], [g for _, _, g in recent]
        flagged = is_teacher_hacking(proxy, golden, self.tolerance)
        return {
            "teacher_hacking": float(flagged),
            "proxy_slope": slope(proxy),
            "golden_slope": slope(golden),
        }

    def message(self, step: int) -> str:
        """The log line for a flag raised at `step`."""
        (first, p0, g0), (_, p1, g1) = self.history[-self.window], self.history[-1]
        return (
            f"opdistill: teacher hacking at step {step}: since step {first} {self.proxy} went "
            f"{p0:.4g} -> {p1:.4g} while {self.golden} went {g0:.4g} -> {g1:.4g}"
        )


def check_golden(config: EvalConfig, task: Task) -> None:
    """Refuse `eval.golden` for a task without a golden distribution."""
    if config.golden and not task.has_golden:
        raise OpdistillError(
            f"eval.golden: task {task.name!r} defines no golden distribution (tasks that do: "
            "graph, arithmetic, chain); set eval.golden: false"
        )


def hacking_monitor(
    config: EvalConfig, task: Task, verbose: bool = True
) -> TeacherHackingMonitor | None:
    """The monitor an `eval:` section asks for (`eval.golden`), or None."""
    if not config.golden:
        return None
    check_golden(config, task)
    return TeacherHackingMonitor(config.hacking_window, config.hacking_tolerance, verbose=verbose)


class EvalRecords:
    """What a run's evaluation records carry besides the metrics, for learning curves and the
    teacher-hacking flag: `train_seconds` (time in optimizer steps), `wall_seconds` (since the
    run started) and, with `eval.golden`, the monitor's `teacher_hacking`, `proxy_slope` and
    `golden_slope`."""

    def __init__(self, config: EvalConfig, task: Task, verbose: bool = True):
        self.started = time.perf_counter()
        self.monitor = hacking_monitor(config, task, verbose)

    def record(self, step: int, metrics: dict[str, float], train_seconds: float) -> dict:
        wall = time.perf_counter() - self.started
        extra = {"train_seconds": train_seconds, "wall_seconds": wall}
        if self.monitor is not None:
            extra.update(self.monitor.observe(step, metrics))
        return {**metrics, **extra}
