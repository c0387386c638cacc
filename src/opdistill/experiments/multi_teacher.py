"""`opdistill demo --suite multi-teacher`: one student, two expert teachers, at the same time.

1. a mixture of the graph and arithmetic tasks (equal weights) and one word-level tokenizer;
2. a graph teacher trained by SFT on graph problems only, an arithmetic teacher on arithmetic
   only, and a small initial student by a little SFT on the mixture (all cached);
3. copies of the initial student trained on the mixture for the same number of steps, over
   several seeds: SFT on the mixed data, on-policy reverse KL to each teacher alone, to both
   routed by task, and to their 50/50 per-token mixture;
4. one markdown table of the greedy accuracy on each task (held-out), `results.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill import Config, Trainer, config_from_dict
from opdistill.eval import evaluate_with_config
from opdistill.experiments.demo import (
    cached,
    mark_cached,
    merge_options,
    report_results,
    settings_fingerprint,
    slug,
)
from opdistill.models import build_word_tokenizer, count_parameters, tiny_llama
from opdistill.tasks import MixtureTask, make_mixture
from opdistill.teachers import Teacher, accuracy_by_teacher, model_teacher, routed_teacher

VERSION = "4"
PARTS = [
    {
        "task": "graph",
        "task_args": {"num_nodes": 8, "path_length": 2, "num_distractors": 1},
        "teacher": "graph",
    },
    {
        "task": "arithmetic",
        "task_args": {"num_steps": 1, "max_value": 9},
        "teacher": "arithmetic",
    },
]
METRICS = ["accuracy", "accuracy/graph", "accuracy/arithmetic"]
HEADERS = {
    "accuracy": "accuracy (both)",
    "accuracy/graph": "graph",
    "accuracy/arithmetic": "arithmetic",
}


@dataclass(frozen=True)
class MultiTeacherSettings:
    """Sizes of the suite; `quick` shrinks everything for smoke tests (numbers not meaningful)."""

    teacher_size: tuple[int, int, int] = (96, 2, 4)  # hidden size, layers, heads
    student_size: tuple[int, int, int] = (64, 2, 4)
    train_size: int = 6000
    eval_prompts: int = 60
    teacher_steps: int = 300
    student_init_steps: int = 300
    method_steps: int = 50
    batch_size: int = 16  # on-policy steps
    sft_batch_size: int = 32  # training the teachers and the initial student
    teacher_lr: float = 2e-3
    method_lr: float = 1e-3
    max_new_tokens: int = 16

    @classmethod
    def quick(cls) -> MultiTeacherSettings:
        return cls(
            teacher_size=(16, 1, 2),
            student_size=(16, 1, 2),
            train_size=200,
            eval_prompts=8,
            teacher_steps=2,
            student_init_steps=1,
            method_steps=2,
            batch_size=4,
            sft_batch_size=4,
        )


# method → (teacher routes: None = SFT, a teacher name, "routed" or "mixture"; config options)
METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "SFT on the mixed data": (
        None,
        {"loss": {"kind": "nll"}, "train": {"student_data_fraction": 0.0}},
    ),
    "graph teacher only (RKL)": ("graph", {}),
    "arithmetic teacher only (RKL)": ("arithmetic", {}),
    "both teachers, routed by task (RKL)": ("routed", {}),
    "both teachers, 50/50 mixture per token (RKL)": ("mixture", {}),
}


def mixture_task() -> MixtureTask:
    return make_mixture(PARTS)


def run_config(
    settings: MultiTeacherSettings,
    output_dir: Path,
    steps: int,
    seed: int,
    lr: float,
    method: dict[str, Any] | None = None,
    teachers: str | None = "routed",
) -> Config:
    """A validated config on the task mixture (models are passed in memory)."""
    names = [part["teacher"] for part in PARTS]
    model: dict[str, Any] = {"student": "(in memory)"}
    if teachers in ("routed", "mixture"):
        model["teachers"] = dict.fromkeys(names, "(in memory)")
    elif teachers is not None:
        model["teacher"] = "(in memory)"
    if teachers == "mixture":  # no example is routed: all take the per-token mixture
        model |= {"teacher_weights": dict.fromkeys(names, 1.0), "teacher_field": "unrouted"}
    values = {
        "model": model,
        "data": {
            "mix": PARTS,
            "train_size": settings.train_size,
            "eval_size": settings.eval_prompts,
        },
        "loss": {"kind": "reverse_kl"},
        "train": {
            "steps": steps,
            "batch_size": settings.batch_size,
            "lr": lr,
            "warmup_steps": steps // 10,
            "seed": seed,
            "student_data_fraction": 1.0,
            "max_new_tokens": settings.max_new_tokens,
            "log_every": 25,
            "output_dir": str(output_dir),
            "progress": False,
        },
        "eval": {
            "num_prompts": settings.eval_prompts,
            "num_samples": 2,
            "ks": [1],
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": 400,
            "self_bleu": False,
        },
    }
    return config_from_dict(merge_options(values, method or {}))


def prepare(cache_dir: Path, settings: MultiTeacherSettings, quick: bool = False) -> Path:
    """Tokenizer, the two expert teachers and the initial student, trained once and cached."""
    root = cache_dir / ("multi-teacher-quick" if quick else "multi-teacher")
    fingerprint = settings_fingerprint(VERSION, PARTS, settings)
    if cached(root, fingerprint, "teachers and initial student"):
        return root
    task = mixture_task()
    train = task.examples("train", settings.train_size)
    evals = task.examples("eval", settings.eval_prompts)
    tokenizer = build_word_tokenizer(e.prompt + " " + e.completion for e in train + evals)
    tokenizer.save_pretrained(root / "tokenizer")
    roles = [
        (part["teacher"], settings.teacher_size, settings.teacher_steps, part["task"])
        for part in PARTS
    ]
    roles.append(("student_init", settings.student_size, settings.student_init_steps, None))
    for role, (hidden, layers, heads), steps, only in roles:
        started = time.perf_counter()
        model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads)
        sft = {
            "loss": {"kind": "nll"},
            "train": {"student_data_fraction": 0.0, "batch_size": settings.sft_batch_size},
        }
        config = run_config(
            settings, root / f"{role}_run", steps, 0, settings.teacher_lr, sft, None
        )
        examples = [e for e in train if only is None or e.meta["task"] == only]
        print(
            f"training {role} by SFT: {count_parameters(model) / 1e6:.2f}M parameters, "
            f"{steps} steps"
        )
        Trainer(config, model, tokenizer, task, examples).train()
        model.save_pretrained(root / role)
        shutil.rmtree(root / f"{role}_run", ignore_errors=True)
        print(f"  done in {time.perf_counter() - started:.0f}s")
    mark_cached(root, fingerprint)
    return root


def _evaluate(model, tokenizer, task, evals, config: Config) -> dict[str, float]:
    result = evaluate_with_config(model, tokenizer, task, evals, config.eval)
    shown = evals[: config.eval.num_prompts]
    return {
        "accuracy": result["accuracy"],
        **accuracy_by_teacher(shown, result.greedy_correct, "task"),
    }


def run_multi_teacher_suite(
    output_dir: Path, cache_dir: Path, seeds: int = 3, steps: int | None = None, quick: bool = False
) -> dict[str, Any]:
    """Run the suite; return what it writes to `results.json`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    settings = MultiTeacherSettings.quick() if quick else MultiTeacherSettings()
    root = prepare(cache_dir, settings, quick)
    steps = steps or settings.method_steps
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    experts = {
        p["teacher"]: AutoModelForCausalLM.from_pretrained(root / p["teacher"]) for p in PARTS
    }
    student_init = AutoModelForCausalLM.from_pretrained(root / "student_init")
    task = mixture_task()
    train = task.examples("train", settings.train_size)
    evals = task.examples("eval", settings.eval_prompts)
    scorers = {name: model_teacher(model, len(tokenizer)) for name, model in experts.items()}
    probe = run_config(settings, output_dir, 1, 0, 1.0)

    per_seed: dict[str, list[dict[str, float]]] = {}
    for name, model in (
        *((f"{n} teacher", m) for n, m in experts.items()),
        ("initial student", student_init),
    ):
        per_seed[name] = [_evaluate(model, tokenizer, task, evals, probe)]

    runs = [(seed, method) for seed in range(seeds) for method in METHODS]
    progress = tqdm(runs, desc="multi-teacher runs", dynamic_ncols=True)
    for seed, method in progress:
        progress.set_postfix_str(f"seed {seed}, {method}")
        route, options = METHODS[method]
        run_dir = output_dir / "runs" / f"{slug(method)}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = run_config(settings, run_dir, steps, seed, settings.method_lr, options, route)
        teacher: Teacher | None = None
        if route in ("routed", "mixture"):
            mc = config.model
            teacher = routed_teacher(scorers, mc.teacher_weights, mc.teacher_field)
        elif route is not None:
            teacher = scorers[route]
        student = copy.deepcopy(student_init)
        trainer = Trainer(config, student, tokenizer, task, train, teacher=teacher)
        trainer.train()  # no held-out set here: the suite evaluates below, per task
        metrics = _evaluate(student, tokenizer, task, evals, probe)
        metrics["seconds_per_step"] = trainer.train_seconds / max(1, steps)
        per_seed.setdefault(method, []).append(metrics)
        progress.write(
            f"seed {seed}  {method:46s} graph {metrics.get('accuracy/graph', 0):.2f}  "
            f"arithmetic {metrics.get('accuracy/arithmetic', 0):.2f}"
        )
    progress.close()
    header = {"suite": "multi-teacher", "steps_per_method": steps, "seeds": seeds}
    header["settings"] = dataclasses.asdict(settings)
    return report_results(output_dir, header, per_seed, METRICS, HEADERS, [], started)
