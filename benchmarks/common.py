"""What the benchmarks share: tiny models with a realistic vocabulary, the opdistill trainer they
run, workers in fresh subprocesses, memory readings and result files.

The scripts run from the repository root (`python benchmarks/NAME.py`), which puts this directory
on `sys.path`; heavy imports (torch, transformers, opdistill) happen inside the functions, so a
worker subprocess pays only for what it uses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from opdistill.tasks.base import Example
    from opdistill.trainer import Trainer

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 1024 * 1024

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# The graph path-finding task of `opdistill demo`: prompts of about 25 tokens.
GRAPH_TASK_ARGS: dict[str, Any] = {"num_nodes": 10, "path_length": 2, "num_distractors": 2}


@dataclass(frozen=True)
class ModelShape:
    """Hidden size, decoder layers and attention heads of a tiny Llama."""

    hidden: int
    layers: int
    heads: int

    def __str__(self) -> str:
        return f"Llama hidden {self.hidden}, {self.layers} layers, {self.heads} heads"


@dataclass(frozen=True)
class StepSetup:
    """The on-policy distillation step the step benchmarks time (JSD β = 0.5, λ = 1, τ = 1)."""

    vocab: int = 49_152
    student: ModelShape = ModelShape(256, 4, 4)
    teacher: ModelShape = ModelShape(384, 6, 6)
    batch_size: int = 4
    max_new_tokens: int = 128
    lr: float = 1e-4
    beta: float = 0.5
    seed: int = 0
    num_prompts: int = 2000

    @classmethod
    def quick(cls, **changes: Any) -> StepSetup:
        """A tiny setup for smoke runs (its numbers mean nothing)."""
        values: dict[str, Any] = {
            "vocab": 1024,
            "student": ModelShape(64, 2, 2),
            "teacher": ModelShape(96, 2, 2),
            "batch_size": 2,
            "max_new_tokens": 8,
            "num_prompts": 200,
        }
        values.update(changes)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepSetup:
        values = dict(values)
        values["student"] = ModelShape(**values["student"])
        values["teacher"] = ModelShape(**values["teacher"])
        return cls(**values)


# ----------------------------------------------------------------------------- models and data
def graph_examples(num_prompts: int, seed: int = 0) -> list[Example]:
    """Training examples of the demo's graph task."""
    from opdistill.tasks import make_task

    return make_task("graph", **GRAPH_TASK_ARGS).examples("train", num_prompts, seed=seed)


def padded_tokenizer(vocab: int, examples: Sequence[Example]) -> PreTrainedTokenizerBase:
    """opdistill's word-level tokenizer (with its chat template) for `examples`, padded with
    added dummy tokens so that `len(tokenizer) == vocab`."""
    from opdistill.models.tokenizers import build_word_tokenizer

    tokenizer = build_word_tokenizer(f"{e.prompt} {e.completion or ''}" for e in examples)
    missing = vocab - len(tokenizer)
    if missing < 0:
        raise SystemExit(f"--vocab {vocab} is below the task's own vocabulary ({len(tokenizer)})")
    tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    return tokenizer


def tiny_model(
    tokenizer: PreTrainedTokenizerBase, shape: ModelShape, seed: int, max_positions: int = 4096
) -> PreTrainedModel:
    """A randomly initialised Llama whose vocabulary is exactly `len(tokenizer)` (no padding)."""
    from opdistill.models.loading import tiny_llama

    return tiny_llama(
        tokenizer,
        hidden_size=shape.hidden,
        num_layers=shape.layers,
        num_heads=shape.heads,
        max_positions=max_positions,
        pad_vocab_to_multiple_of=1,
        seed=seed,
    )


@dataclass
class Built:
    """Tokenizer, student, teacher and prompts of a `StepSetup`."""

    tokenizer: PreTrainedTokenizerBase
    student: PreTrainedModel
    teacher: PreTrainedModel
    examples: list[Example]


def build(setup: StepSetup) -> Built:
    """Build everything a `StepSetup` names, deterministically from its seed."""
    examples = graph_examples(setup.num_prompts, setup.seed)
    tokenizer = padded_tokenizer(setup.vocab, examples)
    student = tiny_model(tokenizer, setup.student, setup.seed)
    teacher = tiny_model(tokenizer, setup.teacher, setup.seed + 1)
    return Built(tokenizer, student, teacher, examples)


def save_built(built: Built, directory: Path) -> None:
    """Write the tokenizer and both models with `save_pretrained`."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    built.tokenizer.save_pretrained(directory / "tokenizer")
    built.student.save_pretrained(directory / "student")
    built.teacher.save_pretrained(directory / "teacher")


def load_built(directory: Path, setup: StepSetup) -> Built:
    """Load what `save_built` wrote (float32); prompts are rebuilt from the setup's seed."""
    from transformers.utils import logging

    from opdistill.models.loading import load_model, load_tokenizer

    logging.disable_progress_bar()
    return Built(
        load_tokenizer(str(directory / "tokenizer")),
        load_model(str(directory / "student")),
        load_model(str(directory / "teacher")),
        graph_examples(setup.num_prompts, setup.seed),
    )


def prompt_order(examples: Sequence[Example], seed: int, count: int) -> list[Example]:
    """The first `count` examples opdistill's trainer draws (its seeded shuffle), in order."""
    from opdistill.trainer import ExampleStream

    return ExampleStream(examples, seed).take(count)


def prompt_rows(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """The unpadded token ids of each row of a padded prompt batch."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask, strict=True)]


def digest(value: Any) -> str:
    """A short hash of JSON-serialisable `value`."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def opdistill_trainer(
    setup: StepSetup,
    built: Built,
    steps: int,
    output_dir: str | Path,
    loss: dict[str, Any] | None = None,
    rollout: dict[str, Any] | None = None,
    **train: Any,
) -> Trainer:
    """opdistill's `Trainer` for the on-policy JSD step of `setup` (models passed in memory);
    `loss` overrides keys of the `loss` section, `rollout` of `rollout`, `train` of `train`."""
    from opdistill.config import config_from_dict
    from opdistill.trainer import Trainer

    values = {
        "model": {"student": "(in memory)", "teacher": "(in memory)"},
        "data": {"task": "graph", "task_args": GRAPH_TASK_ARGS},
        "loss": {"kind": "jsd", "beta": setup.beta, "temperature": 1.0, **(loss or {})},
        "train": {
            "steps": steps,
            "batch_size": setup.batch_size,
            "student_data_fraction": 1.0,
            "max_new_tokens": setup.max_new_tokens,
            "temperature": 1.0,
            "lr": setup.lr,
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": setup.seed,
            "output_dir": str(output_dir),
            "progress": False,
            **train,
        },
        "rollout": rollout or {},
    }
    return Trainer(
        config_from_dict(values),
        built.student,
        built.tokenizer,
        _graph_task(),
        built.examples,
        teacher_model=built.teacher,
    )


def _graph_task() -> Any:
    from opdistill.tasks import make_task

    return make_task("graph", **GRAPH_TASK_ARGS)


def step_setup(args: Any) -> StepSetup:
    """The `StepSetup` of the --vocab/--batch-size/--max-new-tokens/--lr/--seed/--quick flags."""
    names = ("vocab", "batch_size", "max_new_tokens", "lr")
    changes = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    changes["seed"] = args.seed
    return StepSetup.quick(**changes) if args.quick else StepSetup(**changes)


# ------------------------------------------------------------------------ processes and memory
def set_threads(threads: int) -> None:
    """Use `threads` intra-op threads (0: torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / MIB


def available_mib() -> float:
    """Memory the system can still give to a new process, in MiB."""
    import psutil

    return psutil.virtual_memory().available / MIB


def run_worker(
    script: Path, arguments: Sequence[str], label: str, python: str | None = None
) -> dict[str, Any]:
    """Run `script --worker ...` in a fresh CPU-only Python process (`python`, default this
    one); return the JSON it wrote.

    A failed worker gives `{"error": ...}` (with the tail of its output) instead of raising, so
    one tool's failure (for instance running out of memory) does not hide the other's result.
    """
    with tempfile.TemporaryDirectory(prefix="opdistill-bench-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        command = [python or sys.executable, str(script), "--worker-result", str(result)]
        command += arguments
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode == 0 and result.exists():
            return json.loads(result.read_text())
        reason = f"exit code {done.returncode}"
        if done.returncode in (-9, 137):
            reason += " (killed: out of memory?)"
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        print(f"{label}: worker failed, {reason}:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"error": reason}


def write_result(path: str | Path, values: dict[str, Any]) -> None:
    """Write `values` as indented JSON, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------ presentation
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers right-aligned."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]

    def line(row: list[str]) -> str:
        cells_widths = zip(row, widths, numeric, strict=True)
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in cells_widths) + " |"

    rule = ["-" * (w - 1) + (":" if n else "-") for w, n in zip(widths, numeric, strict=True)]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |", *map(line, cells[1:])])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return text == "–"
    return True


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--quick, --threads, --json and the hidden worker flag every script takes."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run, numbers not meaningful"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
