"""Peak memory and time of one whole on-policy step: opdistill against TRL's DistillationTrainer.

The step: λ = 1 (the student samples every batch), JSD β = 0.5, temperature 1, fp32 on the CPU,
AdamW, at a Qwen-sized vocabulary (152,064) on tiny Llama bodies (student hidden 256 × 4 layers,
teacher 384 × 6), 8 prompts × 512 response tokens. Both tools get the same models, initial
weights, prompts in the same order, batch, response budget and learning rate (the setup of
`vs_trl_step.py`). opdistill runs twice: with `loss.output_chunking: auto` (at this size the
logits are formed per chunk from the hidden states) and with `off` (the full [B, R, V] logits).

How the peak is measured. Each tool runs in its own fresh subprocess. Around every step (from
just before rollout to just after the optimizer step; for TRL between the `on_step_begin` and
`on_step_end` callbacks) the worker resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs resets VmHWM), reads the resident memory just before the step (VmRSS),
and reads VmHWM after it: the step's peak is VmHWM − VmRSS-before, i.e. what the step itself
allocated on top of the models, optimizer state and everything set up before it. The kernel
counter sees every page, so short-lived tensors are caught, which a sampling thread would miss.
torch's CPU allocator takes its memory from glibc malloc, which keeps freed memory for reuse and
adjusts its mmap threshold as it goes, so the resident size would also depend on what the setup
freed before. The workers therefore run with `MALLOC_MMAP_THRESHOLD_=65536`: every allocation
of 64 KiB or more (every tensor that matters) is its own mapping, returned to the system when
freed, and the resident size follows the live tensors. Where clear_refs cannot be written, a
thread samples VmRSS every millisecond instead (the method used is printed). The first step
(warm-up: AdamW allocates its state there) is excluded; the largest peak of the timed steps is
reported, with the median seconds per step. For opdistill the Trainer's phase timer also reads
the counter around each phase (generation, teacher, forward_backward, loss, the backward as
forward_backward#2, optimizer), so each phase's peak above the step's starting size is printed.

Equal losses: on one fixed batch (the same prompts and response tokens, the same student and
teacher) the script computes TRL's `_chunked_divergence_loss` (the loss its DistillationTrainer
runs, from the hidden states and the heads), opdistill's step loss with the chunked projection
(`per_token_loss` of `ProjectedLogits`) and with the full logits, and compares values and
gradients with respect to the student's hidden states; it exits with status 1 when they differ
by more than 1e-5 (relative; 1e-4 on the gradient).

    python benchmarks/step_memory.py [--vocab 152064] [--batch-size 8] [--max-new-tokens 512]
        [--steps 2] [--quick] [--json PATH]

The default size needs about 20 GiB free; try `--vocab 16384 --batch-size 4 --max-new-tokens
64` first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import common
import vs_trl_step
from common import StepSetup

DEFAULTS = {"vocab": 152_064, "batch_size": 8, "max_new_tokens": 512}
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
# Every allocation of 64 KiB or more gets its own mapping, returned to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
TOOLS = {
    "opdistill": "opdistill (output_chunking auto)",
    "opdistill-full-logits": "opdistill (output_chunking off)",
    "trl": "TRL DistillationTrainer",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="measured steps per tool")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (≥ 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response budget (512)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (152064)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS), help="what to run"
    )
    common.add_common_args(parser)
    parser.add_argument("--worker", choices=list(TOOLS), help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    return args


def setup_of(args: argparse.Namespace) -> StepSetup:
    if args.quick:
        return common.step_setup(args)
    values = {name: getattr(args, name) or default for name, default in DEFAULTS.items()}
    return replace(StepSetup(), **values, lr=args.lr, seed=args.seed)


# -------------------------------------------------------------------------------- the meter
def _status_mib(field: str) -> float:
    """A `Vm*` line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class StepMeter:
    """Peak resident memory of each measured region above the reading just before it."""

    def __init__(self) -> None:
        self.peaks: list[float] = []
        self.before: list[float] = []
        self.method = ""
        self._sampled = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        # Per step: each phase's peak above the step's starting RSS ("between" phases too).
        self.phase_peaks: list[dict[str, float]] = []
        self._running = 0.0  # the step's peak so far, where the counter was reset in between

    def start(self) -> None:
        gc.collect()
        kernel = _reset_peak()
        self.method = "VmHWM after clear_refs" if kernel else "VmRSS sampled every 1 ms"
        self.before.append(_status_mib("VmRSS"))
        self.phase_peaks.append({})
        self._running = 0.0
        if not kernel:
            self._sampled = self.before[-1]
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            peak = self._sampled
        else:
            peak = self._note("between", _status_mib("VmHWM"))
        self.peaks.append(max(peak, self._running + self.before[-1]) - self.before[-1])

    def _note(self, phase: str, peak: float) -> float:
        """Record `peak` (absolute MiB) as `phase`'s in the current step."""
        above = peak - self.before[-1]
        peaks = self.phase_peaks[-1]
        peaks[phase] = max(peaks.get(phase, 0.0), above)
        self._running = max(self._running, above)
        return peak

    @contextmanager
    def phase(self, name: str) -> Any:
        """Within a measured step: the peak of the block, and of what ran since the last one
        (as "between"); needs the kernel counter (a no-op where RSS is sampled)."""
        if self._thread is not None or not self.before:
            yield
            return
        self._note("between", _status_mib("VmHWM"))
        _reset_peak()
        try:
            yield
        finally:
            self._note(name, _status_mib("VmHWM"))
            _reset_peak()

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _status_mib("VmRSS"))

    @contextmanager
    def measure(self) -> Any:
        self.start()
        try:
            yield
        finally:
            self.stop()

    def result(self, warmup: int) -> dict[str, Any]:
        measured = self.peaks[warmup:]
        return {
            "step_peak_mib": max(measured) if measured else None,
            "step_peaks_mib": self.peaks,
            "phase_peaks_mib": self.phase_peaks,
            "rss_before_step_mib": self.before,
            "method": self.method,
        }


# ----------------------------------------------------------------------------------- workers
def _meter_phases(meter: StepMeter) -> None:
    """Have the Trainer's phase timer also record each phase's memory peak (a phase entered
    again in the same step, e.g. forward_backward for the backward, is named `name#2`)."""
    import opdistill.trainer
    from opdistill.timing import PhaseTimer

    class MeteredPhaseTimer(PhaseTimer):
        def __init__(self, device: Any = "cpu") -> None:
            super().__init__(device)
            self.entered: dict[str, int] = {}

        @contextmanager
        def phase(self, name: str) -> Any:
            self.entered[name] = self.entered.get(name, 0) + 1
            label = name if self.entered[name] == 1 else f"{name}#{self.entered[name]}"
            with meter.phase(label), super().phase(name):
                yield

    opdistill.trainer.PhaseTimer = MeteredPhaseTimer  # type: ignore[misc]


def opdistill_worker(setup: StepSetup, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    meter = StepMeter()
    _meter_phases(meter)
    chunking = "off" if args.worker == "opdistill-full-logits" else "auto"
    result = vs_trl_step.opdistill_worker(
        setup,
        models,
        args.steps,
        args.warmup,
        around_step=meter.measure,
        loss={"output_chunking": chunking},
    )
    return {**result, **meter.result(args.warmup)}


def trl_worker(setup: StepSetup, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback

    meter = StepMeter()

    class StepMemory(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.stop()

    result = vs_trl_step.trl_worker(
        setup, models, args.steps, args.warmup, "distillation", callbacks=[StepMemory()]
    )
    return {**result, **meter.result(args.warmup)}


# ----------------------------------------------------------------------------- equal losses
def loss_agreement(built: common.Built, setup: StepSetup) -> dict[str, Any]:
    """TRL's chunked JSD and opdistill's step loss (chunked projection and full logits) on one
    fixed batch; values and gradients with respect to the student's hidden states, every row
    against the first (TRL's)."""
    import torch
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from opdistill.batch import Batch, batch_projected, chat_prompt, left_pad, right_pad
    from opdistill.config import config_from_dict
    from opdistill.losses.projected import ProjectedLogits
    from opdistill.objectives import StepInputs, per_token_loss, reduce_weighted

    tokenizer, rows, width = built.tokenizer, setup.batch_size, setup.max_new_tokens
    examples = built.examples[:rows]
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(setup.seed)
    lengths = [max(1, width - row * width // (2 * rows)) for row in range(rows)]  # some padding
    responses = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    prompt_ids, prompt_mask = left_pad(
        [chat_prompt(tokenizer, e.prompt) for e in examples], tokenizer.pad_token_id
    )
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    batch = Batch(prompt_ids, prompt_mask, response_ids, response_mask, examples)
    with torch.no_grad():
        student = batch_projected(built.student, built.student, batch, vocab)
        teacher = batch_projected(built.teacher, built.teacher, batch, vocab)
    config = config_from_dict(
        {
            "model": {"student": "(in memory)", "teacher": "(in memory)"},
            "loss": {"kind": "jsd", "beta": setup.beta, "temperature": 1.0},
        }
    )
    head = student.weight.detach()

    def trl_loss(hidden: torch.Tensor) -> torch.Tensor:
        loss, _, _ = _chunked_divergence_loss(
            hidden, teacher.hidden, head, teacher.weight, response_mask, setup.beta
        )
        return loss

    def opdistill_loss(hidden: torch.Tensor, projected: bool) -> torch.Tensor:
        logits: Any = ProjectedLogits(hidden, head, None, vocab)
        teacher_answer: Any = teacher
        if not projected:
            logits, teacher_answer = logits.materialize(), teacher.materialize()
        per_token = per_token_loss(config, logits, teacher_answer, batch, StepInputs())
        return reduce_weighted(
            config, per_token, None, batch.response_mask, batch.num_tokens, len(examples)
        )

    losses = {
        "TRL _chunked_divergence_loss (DistillationTrainer)": trl_loss,
        "opdistill step loss, chunked projection": lambda h: opdistill_loss(h, projected=True),
        "opdistill step loss, full logits": lambda h: opdistill_loss(h, projected=False),
    }
    results: dict[str, Any] = {"rows": [], "tokens": batch.num_tokens, "vocab": vocab}
    reference_value, reference_grad = None, None
    ok = True
    for name, function in losses.items():
        hidden = student.hidden.detach().clone().requires_grad_(True)
        loss = function(hidden)
        loss.backward()
        value, grad = float(loss.detach()), hidden.grad
        row: dict[str, Any] = {"name": name, "value": value}
        if reference_value is None:
            reference_value, reference_grad = value, grad
        else:
            diff = abs(value - reference_value)
            rel = diff / max(abs(reference_value), abs(value), 1e-30)
            grad_rel = float((grad - reference_grad).abs().max() / reference_grad.abs().max())
            row.update(abs_diff=diff, rel_diff=rel, grad_rel_diff=grad_rel)
            ok = ok and rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL
        results["rows"].append(row)
    results["ok"] = ok
    return results


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.set_threads(args.threads)
        setup = StepSetup.from_dict(json.loads(args.setup))
        worker = trl_worker if args.worker == "trl" else opdistill_worker
        common.write_result(args.worker_result, worker(setup, Path(args.models), args))
        return 0

    setup = setup_of(args)
    versions = {p: version(p) for p in ("torch", "transformers", "accelerate", "trl", "opdistill")}
    print("peak memory of one on-policy step: opdistill vs TRL DistillationTrainer (CPU, fp32)")
    print("  " + ", ".join(f"{p} {v}" for p, v in versions.items()))
    print(f"  student: {setup.student}; teacher: {setup.teacher}; vocabulary {setup.vocab}")
    print(
        f"  batch {setup.batch_size} prompts, max_new_tokens {setup.max_new_tokens}, λ = 1, JSD "
        f"β = {setup.beta}; {args.warmup} warm-up + {args.steps} measured steps per tool, each "
        "tool in its own process"
    )
    common.set_threads(args.threads)
    os.environ.update(MALLOC_ENV)  # inherited by the workers (they start afterwards)
    results: dict[str, Any] = {"setup": setup.to_dict(), "versions": versions}
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-models-") as tmp:
        models = Path(tmp)
        built = common.build(setup)
        common.save_built(built, models)
        results["loss_agreement"] = loss_agreement(built, setup)
        del built
        gc.collect()
        vs_trl_step.print_agreement(results["loss_agreement"])
        worker_args = [
            *("--setup", json.dumps(setup.to_dict()), "--models", str(models)),
            *("--steps", str(args.steps), "--warmup", str(args.warmup)),
            *("--threads", str(args.threads)),
        ]
        for tool in args.tools:
            print(f"\nrunning {TOOLS[tool]} ...", flush=True)
            results[tool] = common.run_worker(
                Path(__file__), ["--worker", tool, *worker_args], tool
            )
    return report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> int:
    trl = results.get("trl", {})
    for tool in args.tools:
        if "error" not in results[tool]:
            results[tool]["median_seconds"] = common.median(results[tool]["seconds"])
    rows = []
    for tool in args.tools:
        result = results[tool]
        if "error" in result:
            rows.append([TOOLS[tool], result["error"], "–", "–", "–", "–", "–"])
            continue
        result["peak_ratio"] = common.ratio(result["step_peak_mib"], trl.get("step_peak_mib"))
        result["time_ratio"] = common.ratio(result["median_seconds"], trl.get("median_seconds"))
        tokens = sum(result["response_tokens"]) / max(1, len(result["response_tokens"]))
        rows.append(
            [
                TOOLS[tool],
                f"{result['step_peak_mib']:.0f}",
                common.fmt(result["peak_ratio"]),
                f"{result['median_seconds']:.3f}",
                common.fmt(result["time_ratio"]),
                f"{tokens:.0f}",
                f"{result['rss_after_load_mib']:.0f}",
            ]
        )
    methods = {results[t].get("method") for t in args.tools if "method" in results[t]}
    print(
        f"\nsummary (largest step peak of {args.steps} measured steps after {args.warmup} "
        f"warm-up; peak = {', '.join(sorted(methods))} minus VmRSS just before the step):"
    )
    headers = [
        "tool",
        "step peak MiB",
        "× TRL",
        "s/step (median)",
        "× TRL",
        "response tokens/step",
        "RSS loaded MiB",
    ]
    print(common.table(headers, rows))
    print_phases(results, args)
    digests = {results[t].get("prompts_digest") for t in args.tools if "error" not in results[t]}
    results["same_prompts"] = len(digests) == 1
    print(f"same prompts in the same order in every tool: {'yes' if len(digests) == 1 else 'NO'}")
    agreement = results["loss_agreement"]
    worst = max((r.get("rel_diff", 0.0) for r in agreement["rows"]), default=0.0)
    verdict = "agree" if agreement["ok"] else "DISAGREE"
    print(
        f"loss agreement on the fixed batch: {verdict} (largest relative difference {worst:.1e}; "
        f"tolerance {LOSS_RTOL:g} on the value, {GRAD_RTOL:g} on the gradient)"
    )
    ours = results.get("opdistill", {})
    if ours.get("peak_ratio") is not None:
        print(f"step peak ratio opdistill/TRL: {ours['peak_ratio']:.3f} (goal ≤ 0.5)")
    if args.quick:
        print("(--quick: tiny sizes, a smoke run; the numbers mean nothing)")
    if args.json:
        common.write_result(args.json, results)
        print(f"results written to {args.json}")
    failed = not agreement["ok"] or any("error" in results[t] for t in args.tools)
    return 1 if failed else 0


def print_phases(results: dict[str, Any], args: argparse.Namespace) -> None:
    """opdistill's peak per phase of its largest measured step, above the RSS before the step."""
    for tool in args.tools:
        result = results[tool]
        phases = result.get("phase_peaks_mib") or []
        if "error" in result or len(phases) <= args.warmup or not phases[args.warmup]:
            continue
        measured = list(range(args.warmup, len(phases)))
        largest = max(measured, key=lambda i: result["step_peaks_mib"][i])
        rows = [[name, f"{mib:.0f}"] for name, mib in phases[largest].items()]
        print(f"\n{TOOLS[tool]}: peak above the step's starting RSS, per phase (step {largest}):")
        print(common.table(["phase", "MiB"], rows))


if __name__ == "__main__":
    sys.exit(main())
