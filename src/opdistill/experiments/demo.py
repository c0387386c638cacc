"""`opdistill demo`: the embedded experiments, offline on a CPU.

For each task of the chosen suite:
1. build the task and a word-level tokenizer for it;
2. train a teacher (a few M parameters) to high accuracy and a several-times-smaller initial
   student by SFT; both are cached, so a second run skips this;
3. train copies of the initial student with each method of the suite for the same number of steps,
   over several seeds;
4. print one markdown table, write `results.json` and pass@k plots to the output directory
   (`update_readme_results` puts the table into a README between its two markers).

Suites: `default` (arithmetic chains, reference solutions for 256 prompts; SFT, SeqKD,
supervised KD, on-policy GKD with JSD(0.9) and reverse KL, mixed λ = 0.5), `gkd` (the same task;
GKD's grid of λ ∈ {0, 0.5, 1} and five divergences beside SFT and SeqKD, with learning curves),
`graph` (the default methods on the graph task), `objectives` (graph and arithmetic tasks; every
objective of docs/objectives.md) and `engines` (graph task; on-policy GKD with reverse KL sampled
by transformers `generate`, by a vLLM engine, and pipelined one step stale on hf_static and on
vLLM; run it from .venv-vllm).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill import Config, Trainer, config_from_dict, make_task, model_teacher
from opdistill.errors import OpdistillError
from opdistill.eval import (
    X_LABELS,
    evaluate_with_config,
    learning_curves,
    markdown_table,
    plot_learning_curves,
    plot_pass_at_k,
    summarise,
    summarise_curves,
)
from opdistill.files import write_atomic
from opdistill.models import build_word_tokenizer, count_parameters, tiny_llama

DEMO_VERSION = "3"


@dataclass(frozen=True)
class DemoTask:
    """A synthetic task of the demo and the response length it needs."""

    name: str
    task_args: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 12
    teacher_steps: int | None = None  # SFT steps, when the settings' default does not suit
    student_init_steps: int | None = None
    # Reference solutions for only the first N training prompts: the initial student and every
    # method train on those prompts (the teacher on all of them), the regime of distillation.
    labelled_prompts: int | None = None
    # Whether prompts have several correct responses (else "distinct correct" is left out).
    several_answers: bool = True


GRAPH = DemoTask("graph", {"num_nodes": 10, "path_length": 2, "num_distractors": 2}, 12)
# Single-digit values: the teacher masters it in 600 steps; 150 leave the student at ~40%.
ARITHMETIC = DemoTask("arithmetic", {"num_steps": 2, "max_value": 9}, 24, 600, 150)
# Chains of 3-5 single-digit operations, every intermediate result written out (responses of
# 20-32 tokens, judged wrong at the first wrong step): early mistakes derail the rest of the
# response. The teacher learns from 20,000 worked solutions; the student has 256.
CHAIN = DemoTask(
    "chain",
    {"min_steps": 3, "max_steps": 5, "max_value": 9},
    40,
    teacher_steps=500,
    student_init_steps=300,
    labelled_prompts=256,
    several_answers=False,
)
TASK = {"task": GRAPH.name, "task_args": GRAPH.task_args}  # what the example configs use
MAX_NEW_TOKENS = GRAPH.max_new_tokens


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; `quick` shrinks everything for smoke tests (numbers not meaningful)."""

    teacher_size: tuple[int, int, int] = (192, 4, 6)  # hidden size, layers, heads
    student_size: tuple[int, int, int] = (96, 2, 4)
    train_size: int = 20_000
    eval_prompts: int = 100
    eval_samples: int = 16
    teacher_steps: int = 1000
    student_init_steps: int = 300
    method_steps: int = 150
    batch_size: int = 32
    teacher_lr: float = 1e-3
    method_lr: float = 5e-4  # every method's, unless `on_policy_lr` is set
    on_policy_lr: float | None = None  # methods that sample from the student (λ > 0)
    eval_every: int = 0  # evaluations during training, for learning curves (0: only at the end)

    def lr(self, method: dict[str, Any]) -> float:
        """The learning rate of `method`'s family: off-policy (λ = 0) or on-policy (λ > 0)."""
        on_policy = method.get("train", {}).get("student_data_fraction", 0.0) > 0
        return self.on_policy_lr if on_policy and self.on_policy_lr else self.method_lr

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            teacher_size=(32, 1, 2),
            student_size=(16, 1, 2),
            train_size=500,
            eval_prompts=10,
            eval_samples=4,
            teacher_steps=4,
            student_init_steps=2,
            method_steps=3,
            batch_size=4,
        )


def _on_policy(loss: dict[str, Any], **extra: dict[str, Any]) -> dict[str, Any]:
    return {"loss": loss, "train": {"student_data_fraction": 1.0}, **extra}


# Each method is a configuration of the one training loop.
METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"loss": {"kind": "nll"}, "train": {"student_data_fraction": 0.0}},
    "SeqKD": {
        "loss": {"kind": "nll"},
        "train": {"student_data_fraction": 0.0, "off_policy_source": "teacher"},
    },
    "supervised KD (λ=0, FKL)": {
        "loss": {"kind": "forward_kl"},
        "train": {"student_data_fraction": 0.0},
    },
    "GKD on-policy (λ=1, JSD 0.9)": _on_policy({"kind": "jsd", "beta": 0.9}),
    "GKD on-policy (λ=1, RKL)": _on_policy({"kind": "reverse_kl"}),
    "GKD mixed (λ=0.5, JSD 0.9)": {
        "loss": {"kind": "jsd", "beta": 0.9},
        "train": {"student_data_fraction": 0.5},
    },
}

OBJECTIVES: dict[str, dict[str, Any]] = {
    "SFT": METHODS["SFT"],
    "supervised KD (FKL)": METHODS["supervised KD (λ=0, FKL)"],
    "GKD (λ=1, JSD 0.9)": METHODS["GKD on-policy (λ=1, JSD 0.9)"],
    "GKD (λ=1, RKL)": METHODS["GKD on-policy (λ=1, RKL)"],
    "sampled-token": _on_policy({"kind": "sampled_token"}),
    "vOPD": _on_policy({"kind": "vopd"}),
    "vOPD top-8": _on_policy({"kind": "vopd", "top_k": 8}),
    "MiniLLM": _on_policy({"kind": "minillm", "minillm": {"teacher_mix": 0.2, "clip": 0.2}}),
    "DistiLLM (skew FKL, adaptive)": {
        "loss": {"kind": "skew_forward_kl", "alpha": 0.1},
        "train": {"student_data_fraction": 0.0, "adaptive_source": {"enabled": True}},
    },
    "TAID": _on_policy({"kind": "taid"}),
    "TIP (RKL, keep 50%)": _on_policy(
        {"kind": "reverse_kl", "tip": {"mode": "weighted", "keep_fraction": 0.5}}
    ),
    "position-weighted vOPD": _on_policy({"kind": "vopd", "position_weights": {"enabled": True}}),
    "GKD + reward (RKL, w=0.5)": _on_policy(
        {"kind": "reverse_kl"}, reward={"distill_weight": 0.5, "group_size": 4}
    ),
    "GRPO (verifier only)": _on_policy(
        {"kind": "nll"}, reward={"distill_weight": 0.0, "group_size": 4}
    ),
}


DIVERGENCES: dict[str, dict[str, Any]] = {
    "FKL": {"kind": "forward_kl"},
    "RKL": {"kind": "reverse_kl"},
    **{f"JSD {beta:g}": {"kind": "jsd", "beta": beta} for beta in (0.1, 0.5, 0.9)},
}
# The grid of the GKD paper's comparison: SFT, SeqKD and supervised KD against GKD with each
# divergence at student-data fractions λ = 0 (reference responses only), 0.5 and 1 (the
# student's own samples only). λ = 0 with FKL is supervised KD.
GKD_GRID: dict[str, dict[str, Any]] = {
    "SFT": METHODS["SFT"],
    "SeqKD": METHODS["SeqKD"],
    **{
        f"GKD λ={fraction:g} {name}": {
            "loss": loss,
            "train": {"student_data_fraction": float(fraction)},
        }
        for fraction in (0, 0.5, 1)
        for name, loss in DIVERGENCES.items()
    },
}


def _engine(rollout: dict[str, Any], max_staleness: int = 0) -> dict[str, Any]:
    """On-policy GKD with reverse KL, sampled by `rollout` (evaluated by transformers, like
    every arm), optionally pipelined `max_staleness` steps ahead."""
    train = {"student_data_fraction": 1.0, "max_staleness": max_staleness}
    return {"loss": {"kind": "reverse_kl"}, "train": train, "rollout": rollout}


VLLM_ROLLOUT = {"backend": "vllm", "vllm_enforce_eager": True, "vllm_gpu_memory_utilization": 0.2}
ENGINES: dict[str, dict[str, Any]] = {
    "RKL · hf": _engine({"backend": "hf"}),
    "RKL · vllm": _engine(VLLM_ROLLOUT),
    "RKL · hf_static, staleness 1": _engine({"backend": "hf_static"}, max_staleness=1),
    "RKL · vllm, staleness 1": _engine(VLLM_ROLLOUT, max_staleness=1),
}

SUITES: dict[str, tuple[tuple[DemoTask, ...], dict[str, dict[str, Any]]]] = {
    "default": ((CHAIN,), METHODS),
    "graph": ((GRAPH,), METHODS),
    "objectives": ((GRAPH, ARITHMETIC), OBJECTIVES),
    "engines": ((GRAPH,), ENGINES),
    "gkd": ((CHAIN,), GKD_GRID),
}
# Suites whose models differ from the default ones (own cache): vLLM on CPU needs attention
# heads of at least 32 dimensions.
SUITE_SIZES: dict[str, dict[str, tuple[int, int, int]]] = {
    "engines": {"student_size": (96, 2, 3)},
}
QUICK_SUITE_SIZES: dict[str, dict[str, tuple[int, int, int]]] = {
    "engines": {"teacher_size": (64, 1, 2), "student_size": (32, 1, 1)},
}
# How a suite's runs differ from the default ones (the models stay those of the task's cache).
# The chain suites' learning rates are the best of a sweep per method family (SFT and on-policy
# GKD with reverse KL at 2e-4 … 6e-3, seed 0, 150 steps; docs/findings.md).
CHAIN_LRS = {"method_lr": 6e-3, "on_policy_lr": 3e-3}
SUITE_RUNS: dict[str, dict[str, Any]] = {
    "default": CHAIN_LRS,
    "gkd": {"eval_every": 50, **CHAIN_LRS},
}
# Settings that change only the method runs, not the cached teacher and initial student.
RUN_FIELDS = ("eval_samples", "method_steps", "method_lr", "on_policy_lr", "eval_every")
METRICS = ["accuracy", "pass@1", "pass@4", "pass@16", "distinct_correct", "teacher_rkl"]
HEADERS = {
    "distinct_correct": "distinct correct",
    "teacher_rkl": "RKL to teacher",
    "seconds_per_step": "s/step",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPDISTILL_CACHE", "~/.cache/opdistill")).expanduser()


def settings_fingerprint(*parts: Any) -> str:
    """A short hash of what a cache is built from (dataclasses are hashed as their fields)."""
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:12]


def cached(root: Path, fingerprint: str, what: str) -> bool:
    """Whether `root` holds a finished build of `fingerprint`; if not, it is emptied for one
    (mark it finished with `mark_cached` at the end)."""
    done = root / "COMPLETE"
    if done.exists() and done.read_text().strip() == fingerprint:
        print(f"using the cached {what} in {root}")
        return True
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return False


def mark_cached(root: Path, fingerprint: str) -> None:
    (root / "COMPLETE").write_text(fingerprint + "\n")


def merge_options(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_options(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def run_config(
    settings: DemoSettings,
    task: DemoTask,
    output_dir: Path,
    steps: int,
    seed: int,
    lr: float,
    method: dict[str, Any] | None = None,
) -> Config:
    """A validated run config for `method` on `task` (models are passed in memory)."""
    values = {
        "model": {"student": "(in memory)", "teacher": "(in memory)"},
        "data": {
            "task": task.name,
            "task_args": task.task_args,
            "train_size": settings.train_size,
            "eval_size": settings.eval_prompts,
        },
        "train": {
            "steps": steps,
            "batch_size": settings.batch_size,
            "lr": lr,
            "warmup_steps": steps // 10,
            "seed": seed,
            "max_new_tokens": task.max_new_tokens,
            "log_every": 25,
            "output_dir": str(output_dir),
            "progress": False,
        },
        "eval": {
            "num_prompts": settings.eval_prompts,
            "num_samples": settings.eval_samples,
            "ks": [k for k in (1, 4, 16) if k <= settings.eval_samples],
            "max_new_tokens": task.max_new_tokens,
            "batch_size": 400,
        },
    }
    return config_from_dict(merge_options(values, method or {}))


def task_data(settings: DemoSettings, task: DemoTask):
    instance = make_task(task.name, **task.task_args)
    return (
        instance,
        instance.examples("train", settings.train_size, seed=0),
        instance.examples("eval", settings.eval_prompts, seed=0),
    )


def _cache_name(task: DemoTask, quick: bool, suite: str = "default") -> str:
    name = "demo" if task == GRAPH else f"demo-{task.name}"
    if suite in SUITE_SIZES:
        name += f"-{suite}"
    return f"{name}-quick" if quick else name


def suite_settings(suite: str, quick: bool, **run_settings: Any) -> DemoSettings:
    """The sizes of `suite`'s models and runs, with `run_settings` (`RUN_FIELDS`; None values
    ignored) over the suite's; a `method_lr` without `on_policy_lr` is every method's."""
    unknown = sorted(set(run_settings) - set(RUN_FIELDS))
    if unknown:
        raise OpdistillError(f"run_demo: unknown run setting {unknown[0]!r}")
    settings = DemoSettings.quick() if quick else DemoSettings()
    sizes = (QUICK_SUITE_SIZES if quick else SUITE_SIZES).get(suite, {})
    runs = {k: v for k, v in SUITE_RUNS.get(suite, {}).items() if not quick or k == "eval_every"}
    overrides = {k: v for k, v in run_settings.items() if v is not None}
    if "method_lr" in overrides and "on_policy_lr" not in overrides:
        overrides["on_policy_lr"] = overrides["method_lr"]
    return dataclasses.replace(settings, **sizes, **{**runs, **overrides})


def models_fingerprint(task: DemoTask, settings: DemoSettings) -> str:
    """What the cached teacher and initial student of `task` are built from: every setting but
    those of the method runs (`RUN_FIELDS`)."""
    models = {k: v for k, v in dataclasses.asdict(settings).items() if k not in RUN_FIELDS}
    return settings_fingerprint(DEMO_VERSION, task, models)


def prepare(
    cache_dir: Path,
    settings: DemoSettings,
    task: DemoTask,
    quick: bool = False,
    suite: str = "default",
) -> Path:
    """Tokenizer, teacher and initial student for `task`, trained once and cached."""
    root = cache_dir / _cache_name(task, quick, suite)
    fingerprint = models_fingerprint(task, settings)
    if cached(root, fingerprint, "teacher and initial student"):
        return root
    instance, train, evals = task_data(settings, task)
    tokenizer = build_word_tokenizer(e.prompt + " " + e.completion for e in train + evals)
    tokenizer.save_pretrained(root / "tokenizer")
    teacher_steps, student_steps = settings.teacher_steps, settings.student_init_steps
    if not quick:
        teacher_steps = task.teacher_steps or teacher_steps
        student_steps = task.student_init_steps or student_steps
    for role, (hidden, layers, heads), steps in (
        ("teacher", settings.teacher_size, teacher_steps),
        ("student_init", settings.student_size, student_steps),
    ):
        started = time.perf_counter()
        model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads)
        sft = {"loss": {"kind": "nll"}, "train": {"student_data_fraction": 0.0, "progress": True}}
        run_dir = root / f"{role}_run"
        config = run_config(settings, task, run_dir, steps, 0, settings.teacher_lr, sft)
        data = train if role == "teacher" else train[: task.labelled_prompts]
        print(
            f"{task.name}: training the {role.replace('_', ' ')} by SFT, "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {steps} steps "
            f"on {len(data)} labelled prompts"
        )
        Trainer(config, model, tokenizer, instance, data).train()
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"  done in {time.perf_counter() - started:.0f}s")
    mark_cached(root, fingerprint)
    return root


def run_demo(
    output_dir: Path,
    cache_dir: Path | None = None,
    seeds: int = 3,
    steps: int | None = None,
    prepare_only: bool = False,
    quick: bool = False,
    suite: str = "default",
    only: tuple[str, ...] = (),
    **run_settings: Any,
) -> dict[str, Any]:
    """Run a suite; return what it writes to `results.json`.

    only: run just the methods whose names contain one of these strings.
    run_settings: `DemoSettings` fields of the method runs (`RUN_FIELDS`, e.g. `method_lr`,
        `on_policy_lr`, `eval_every`) that override the suite's; None values are ignored. A
        `method_lr` without `on_policy_lr` is every method's learning rate.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    settings = suite_settings(suite, quick, **run_settings)
    tasks, methods = SUITES[suite]
    if only:
        methods = {m: o for m, o in methods.items() if any(text in m for text in only)}
        if not methods:
            raise OpdistillError(
                f"--only {' '.join(only)}: no method of the {suite} suite matches "
                f"(methods: {', '.join(SUITES[suite][1])})"
            )
    cache = cache_dir or default_cache_dir()
    roots = {t.name: prepare(cache, settings, t, quick, suite) for t in tasks}
    if prepare_only:
        return {}
    steps = steps or settings.method_steps
    output_dir.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, list[dict[str, float]]] = {}
    plots = []
    for task in tasks:
        results = _run_task(task, roots[task.name], methods, settings, output_dir, seeds, steps)
        prefix = f"{task.name} · " if len(tasks) > 1 else ""
        per_seed.update({prefix + m: r for m, r in results.items()})
        curves = {m: summarise_curves([_curve(r) for r in runs]) for m, runs in results.items()}
        name = f"pass_at_k_{task.name}.png" if len(tasks) > 1 else "pass_at_k.png"
        if settings.eval_every:
            plots += plot_task_curves(output_dir, task, methods, steps, seeds)
        plots.append(
            plot_pass_at_k(
                curves,
                output_dir / name,
                title=f"{task.name}: {steps} steps per method, {seeds} seeds",
                dashed=("teacher", "initial student"),
            )
        )

    header = {"suite": suite, "steps_per_method": steps, "seeds": seeds, "methods": list(methods)}
    header["settings"] = dataclasses.asdict(settings)
    metrics = [
        m for m in METRICS if m != "distinct_correct" or any(t.several_answers for t in tasks)
    ]
    return report_results(output_dir, header, per_seed, metrics, HEADERS, plots, started)


CURVE_METRICS = ("accuracy", "pass@1")


def plot_task_curves(
    output_dir: Path, task: DemoTask, methods: dict[str, Any], steps: int, seeds: int
) -> list[Path]:
    """Learning curves of every method of `task`: each of `CURVE_METRICS` against the step and
    against the training seconds (mean ± std over the seeds), one PNG each."""
    runs = output_dir / "runs" / task.name
    run_dirs = [runs / f"{slug(m)}-seed{seed}" for seed in range(seeds) for m in methods]
    names = {slug(m): m for m in methods}
    plots = []
    for metric in CURVE_METRICS:
        for x in ("step", "seconds"):
            curves = learning_curves(run_dirs, metric, x)
            labelled = {names[group]: curve for group, curve in curves.items()}
            path = output_dir / f"curve_{task.name}_{metric.replace('@', '_at_')}_{x}.png"
            title = f"{task.name}: {metric}, {steps} steps, {seeds} seed{'s' * (seeds > 1)}"
            plots.append(plot_learning_curves(labelled, path, metric, X_LABELS[x], title))
    return plots


README_START = "<!-- demo-results:start -->"
README_END = "<!-- demo-results:end -->"


def update_readme_results(readme: Path, table: str) -> None:
    """Put `table` into `readme` between its `README_START` and `README_END` lines (lines that
    hold only the marker).

    Only the lines between the two markers are replaced, so no other table of the file can be
    touched, whatever its rows are called; a file without exactly one pair of markers, in order,
    is an error and stays as it is.
    """
    lines = readme.read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == README_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == README_END]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise OpdistillError(
            f"{readme}: the demo's results go between one {README_START} line and one "
            f"{README_END} line after it (found {len(starts)} and {len(ends)})"
        )
    body = table.rstrip("\n") + "\n"
    write_atomic(readme, "".join([*lines[: starts[0] + 1], body, *lines[ends[0] :]]))


def report_results(
    output_dir: Path,
    header: dict[str, Any],
    per_seed: dict[str, list[dict[str, float]]],
    metrics: list[str],
    headers: dict[str, str],
    plots: list[Path],
    started: float,
) -> dict[str, Any]:
    """Summarise over seeds; print the table and write `results.json` (atomically)."""
    summary = summarise(per_seed)
    shown = [m for m in [*metrics, "seconds_per_step"] if any(m in s for s in summary.values())]
    table = markdown_table(summary, shown, headers=headers)
    elapsed = time.perf_counter() - started
    results = {
        **header,
        "summary": {m: {k: list(v) for k, v in s.items()} for m, s in summary.items()},
        "per_seed": per_seed,
        "seconds": elapsed,
        "table": table,
    }
    write_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    print(
        f"\nresults: {output_dir / 'results.json'}   plots: {', '.join(map(str, plots))}   "
        f"total {elapsed / 60:.1f} min"
    )
    return results


def _run_task(
    task: DemoTask,
    root: Path,
    methods: dict[str, dict[str, Any]],
    settings: DemoSettings,
    output_dir: Path,
    seeds: int,
    steps: int,
) -> dict[str, list[dict[str, float]]]:
    """Evaluate the teacher and initial student, then train every method for every seed."""
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    student_init = AutoModelForCausalLM.from_pretrained(root / "student_init")
    instance, train, evals = task_data(settings, task)
    train = train[: task.labelled_prompts]
    scorer = model_teacher(teacher, len(tokenizer))
    ec = run_config(settings, task, output_dir, 1, 0, 1.0).eval

    per_seed: dict[str, list[dict[str, float]]] = {}
    for name, model in (("teacher", teacher), ("initial student", student_init)):
        per_seed[name] = [evaluate_with_config(model, tokenizer, instance, evals, ec, scorer)]
    print(
        f"{task.name}: teacher {count_parameters(teacher) / 1e6:.2f}M parameters, greedy "
        f"accuracy {per_seed['teacher'][0]['accuracy']:.2f}; initial student "
        f"{count_parameters(student_init) / 1e6:.2f}M, "
        f"{per_seed['initial student'][0]['accuracy']:.2f}"
    )

    runs = [(seed, method) for seed in range(seeds) for method in methods]
    progress = tqdm(runs, desc=f"{task.name} runs", dynamic_ncols=True)
    for seed, method in progress:
        progress.set_postfix_str(f"seed {seed}, {method}")
        run_dir = output_dir / "runs" / task.name / f"{slug(method)}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        options = methods[method]
        if settings.eval_every:
            options = merge_options(options, {"train": {"eval_every": settings.eval_every}})
        config = run_config(settings, task, run_dir, steps, seed, settings.lr(options), options)
        trainer = Trainer(
            config,
            copy.deepcopy(student_init),
            tokenizer,
            instance,
            train,
            evals,
            teacher_model=teacher,
            teacher=scorer,
        )
        metrics = trainer.train()  # ends with the held-out evaluation
        trainer.close()  # a vLLM engine's memory is freed before the next run
        metrics["seconds_per_step"] = trainer.train_seconds / max(1, steps)
        per_seed.setdefault(method, []).append(metrics)
        progress.write(
            f"{task.name} seed {seed}  {method:32s} accuracy {metrics['accuracy']:.3f}  "
            f"pass@1 {metrics['pass@1']:.3f}  ({trainer.train_seconds:.0f}s)"
        )
    progress.close()
    return per_seed


def _curve(metrics: dict[str, float]) -> dict[int, float]:
    return {int(k[5:]): v for k, v in metrics.items() if k.startswith("pass@")}


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
