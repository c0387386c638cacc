"""Where one opdistill on-policy step spends its time.

The setup is the opdistill side of `vs_trl_step.py` (same models, vocabulary, batch and response
budget). The trainer's collaborators are wrapped with wall-clock timers (and
`torch.profiler.record_function` markers), so `Trainer.step` runs unchanged:

    generation       the student's sampler (`generate` with KV cache)
    teacher forward  the teacher's logits (no gradient)
    student forward  the student's logits at the response positions
    loss             per-token loss and its reduction (a loss that computes its gradient during
                     the forward pass shows that work here, not under backward)
    backward         `accelerator.backward`
    optimizer step   gradient clipping, AdamW, zero_grad and the schedule
    other            the rest of `Trainer.step` (batching, bookkeeping)

CPU work is synchronous, so wall-clock time around a call is the time of its work.

    python benchmarks/profile_step.py [--steps 5] [--batch-size 4] [--max-new-tokens 128]
        [--vocab 49152] [--trace PATH] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

PHASES = (
    "generation",
    "teacher forward",
    "student forward",
    "loss",
    "backward",
    "optimizer step",
)
LOSS_FUNCTIONS = ("per_token_loss", "token_weights", "reduce_weighted", "chunked_token_divergence")


class PhaseClock:
    """Accumulates wall-clock seconds per phase; a call nested in a timed call is not re-counted."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        import torch

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            started = time.perf_counter()
            try:
                with torch.profiler.record_function(f"phase: {phase}"):
                    return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
                self._depth -= 1

        return timed

    def take(self) -> dict[str, float]:
        """The seconds gathered since the last call, and start afresh."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


def instrument(trainer: Any, clock: PhaseClock) -> None:
    """Wrap the calls `Trainer.step` makes for each phase with `clock`'s timers."""
    import opdistill.trainer as trainer_module

    sampler = trainer.student_sampler
    sampler.generate = clock.wrap("generation", sampler.generate)
    for name in ("logits", "topk"):
        if hasattr(trainer.teacher, name):
            setattr(
                trainer.teacher, name, clock.wrap("teacher forward", getattr(trainer.teacher, name))
            )
    trainer_module.batch_logits = clock.wrap("student forward", trainer_module.batch_logits)
    for name in LOSS_FUNCTIONS:
        if hasattr(trainer_module, name):
            setattr(trainer_module, name, clock.wrap("loss", getattr(trainer_module, name)))
    accelerator = trainer.accelerator
    accelerator.backward = clock.wrap("backward", accelerator.backward)
    accelerator.clip_grad_norm_ = clock.wrap("optimizer step", accelerator.clip_grad_norm_)
    trainer.optimizer.step = clock.wrap("optimizer step", trainer.optimizer.step)
    trainer.optimizer.zero_grad = clock.wrap("optimizer step", trainer.optimizer.zero_grad)
    trainer.scheduler.step = clock.wrap("optimizer step", trainer.scheduler.step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (mean reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response budget (128)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (49152)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", metavar="PATH", help="profile one more step to a Chrome trace")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick and args.steps == 5:
        args.steps = 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    setup = common.step_setup(args)
    print(
        f"opdistill on-policy step (JSD β = {setup.beta}, λ = 1, fp32, CPU): student "
        f"{setup.student}; teacher {setup.teacher}; vocabulary {setup.vocab}; batch "
        f"{setup.batch_size}, max_new_tokens {setup.max_new_tokens}"
    )
    built = common.build(setup)
    clock = PhaseClock()
    per_step: list[dict[str, float]] = []
    tokens: list[int] = []
    extra = 1 if args.trace else 0
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-profile-") as output_dir:
        trainer = common.opdistill_trainer(
            setup, built, args.warmup + args.steps + extra, output_dir
        )
        instrument(trainer, clock)
        for index in range(args.warmup + args.steps):
            clock.take()
            started = time.perf_counter()
            stats = trainer.step()
            total = time.perf_counter() - started
            phases = clock.take()
            if index >= args.warmup:
                phases["total"] = total
                per_step.append(phases)
                tokens.append(stats.num_tokens)
        if args.trace:
            write_trace(trainer, Path(args.trace))
    return report(args, per_step, tokens)


def write_trace(trainer: Any, path: Path) -> None:
    """One more step under `torch.profiler`: a Chrome trace and the costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        trainer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"trace of one step written to {path}")


def report(args: argparse.Namespace, per_step: list[dict[str, float]], tokens: list[int]) -> int:
    steps = len(per_step)
    mean = {phase: sum(s.get(phase, 0.0) for s in per_step) / steps for phase in (*PHASES, "total")}
    mean["other"] = mean["total"] - sum(mean[p] for p in PHASES)
    rows = [
        [phase, f"{mean[phase]:.3f}", f"{100 * mean[phase] / mean['total']:.1f}%"]
        for phase in (*PHASES, "other", "total")
    ]
    print(
        f"\nmean over {steps} steps after {args.warmup} warmup; "
        f"{sum(tokens) / max(1, len(tokens)):.0f} response tokens per step"
    )
    print(common.table(["phase", "seconds", "share"], rows))
    if args.quick:
        print("(--quick: tiny sizes, a smoke run; the numbers mean nothing)")
    if args.json:
        common.write_result(args.json, {"mean_seconds": mean, "steps": per_step})
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
