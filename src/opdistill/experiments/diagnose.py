"""`opdistill experiment diagnose`: why on-policy objectives lose accuracy on a demo task.

On the demo's cached teacher and initial student (built as `opdistill demo` builds them):
1. train copies of the initial student with some of the demo's methods, evaluating every
   `--eval-every` steps with the golden metrics (learning curves and the teacher-hacking flag
   land in each run's metrics.jsonl);
2. for the teacher, the initial student and each trained student: greedy accuracy by the
   verifier and with the whole worked solution right; sample responses, measure the
   teacher's greedy accuracy when it continues from prefixes of those samples
   (`opdistill.eval.diagnostics.prefix_recovery`), how often samples hit the token budget, and
   how many correct samples are golden answers (for arithmetic: the whole worked solution right,
   not only the number after "####");
3. write `diagnosis.json`, a markdown table and learning-curve plots.

`--reuse` diagnoses the students a previous run left in `OUTPUT_DIR/runs/*/final` instead of
training them again.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opdistill import Trainer, model_teacher
from opdistill.eval import (
    X_LABELS,
    divergence_report,
    learning_curves,
    length_report,
    plot_learning_curves,
    prefix_recovery,
    sample_responses,
)
from opdistill.experiments.demo import (
    ARITHMETIC,
    CHAIN,
    GRAPH,
    OBJECTIVES,
    DemoSettings,
    default_cache_dir,
    merge_options,
    prepare,
    run_config,
    slug,
    task_data,
)
from opdistill.files import write_atomic
from opdistill.tasks import Example, Task

TASKS = {"arithmetic": ARITHMETIC, "chain": CHAIN, "graph": GRAPH}
DEFAULT_METHODS = ("SFT", "supervised KD (FKL)", "GKD (λ=1, RKL)", "GKD (λ=1, JSD 0.9)")
CURVE_METRICS = ("accuracy", "pass@1", "golden_kl", "golden_mass", "teacher_rkl")


def golden_sample_accuracy(task: Task, samples: list) -> dict[str, float]:
    """Samples whose text is in the golden support, and correct samples that are not (right by
    the verifier with a wrong worked solution: a lucky final answer)."""
    golden = [
        " ".join(s.text.split())
        in {" ".join(y.split()) for y in task.golden_distribution(s.example)}
        for s in samples
    ]
    correct = [s.correct for s in samples]
    lucky = sum(c and not g for c, g in zip(correct, golden, strict=True))
    return {
        "sample_golden_accuracy": sum(golden) / max(1, len(samples)),
        "lucky_fraction_of_correct": lucky / max(1, sum(correct)),
    }


def diagnose_model(
    model: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer,
    task: Task,
    examples: list[Example],
    args: argparse.Namespace,
    max_new_tokens: int,
) -> dict[str, float]:
    samples = sample_responses(
        model, tokenizer, task, examples, args.num_samples, max_new_tokens, seed=args.seed
    )
    greedy = sample_responses(model, tokenizer, task, examples, 1, max_new_tokens, greedy=True)
    report = {"greedy_accuracy": sum(s.correct for s in greedy) / max(1, len(greedy))}
    if task.has_golden:
        report["greedy_golden_accuracy"] = golden_sample_accuracy(task, greedy)[
            "sample_golden_accuracy"
        ]
    report |= prefix_recovery(samples, teacher, tokenizer, task, args.fractions, max_new_tokens)
    report.update(length_report(samples, tokenizer, max_new_tokens))
    if task.has_golden:
        report.update(golden_sample_accuracy(task, samples))
        report.update(divergence_report(samples, tokenizer, task))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="opdistill experiment diagnose", description=__doc__)
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(DEFAULT_METHODS),
        help=f"methods of the objectives suite (default: {', '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--window", type=int, default=3, help="eval.hacking_window")
    parser.add_argument("--num-prompts", type=int, default=100, help="prompts diagnosed")
    parser.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    parser.add_argument(
        "--fractions",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[0.0, 0.25, 0.5, 0.75],
        help="prefix fractions, comma-separated (default 0,0.25,0.5,0.75)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the diagnosis")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/diagnose"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="diagnose the students a previous run left in OUTPUT_DIR/runs/*/final instead of "
        "training them again",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} (valid: {', '.join(OBJECTIVES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    started = time.perf_counter()
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    demo_task = TASKS[args.task]
    root = prepare(args.cache_dir or default_cache_dir(), settings, demo_task, args.quick)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    student_init = AutoModelForCausalLM.from_pretrained(root / "student_init")
    task, train, evals = task_data(settings, demo_task)
    train = train[: demo_task.labelled_prompts]
    scorer = model_teacher(teacher, len(tokenizer))
    steps = args.steps or settings.method_steps
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    models: dict[str, PreTrainedModel] = {"teacher": teacher, "initial student": student_init}
    run_dirs: list[Path] = []
    extra = {
        "train": {"eval_every": args.eval_every},
        "eval": {"golden": True, "hacking_window": args.window},
    }
    for seed in range(args.seeds):
        for method in args.methods:
            run_dir = out / "runs" / f"{slug(method)}-seed{seed}"
            run_dirs.append(run_dir)
            if args.reuse and (run_dir / "final" / "config.json").exists():
                model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
                models[f"{method} seed{seed}"] = model
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            options = merge_options(OBJECTIVES[method], extra)
            config = run_config(
                settings, demo_task, run_dir, steps, seed, settings.method_lr, options
            )
            trainer = Trainer(
                config,
                copy.deepcopy(student_init),
                tokenizer,
                task,
                train,
                evals,
                teacher_model=teacher,
                teacher=scorer,
            )
            final = trainer.train()
            print(f"{method} seed {seed}: accuracy {final['accuracy']:.3f}", flush=True)
            models[f"{method} seed{seed}"] = trainer.accelerator.unwrap_model(trainer.student)

    shown = evals[: min(args.num_prompts, len(evals))]
    rows: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        rows[name] = diagnose_model(
            model, teacher, tokenizer, task, shown, args, demo_task.max_new_tokens
        )
        print(f"diagnosed {name}: {json.dumps(rows[name])}", flush=True)

    plots = []
    for metric in CURVE_METRICS:
        curves = learning_curves(run_dirs, metric) if run_dirs else {}
        if curves:
            path = out / f"curve_{metric.replace('@', '_at_')}.png"
            plots.append(str(plot_learning_curves(curves, path, metric, X_LABELS["step"])))
    results: dict[str, Any] = {
        "task": args.task,
        "steps": steps,
        "seeds": args.seeds,
        "num_prompts": len(shown),
        "num_samples": args.num_samples,
        "max_new_tokens": demo_task.max_new_tokens,
        "diagnosis": rows,
        "plots": plots,
        "seconds": time.perf_counter() - started,
    }
    write_atomic(out / "diagnosis.json", json.dumps(results, indent=2) + "\n")
    table = diagnosis_table(rows, args.fractions)
    write_atomic(out / "diagnosis.md", table)
    print(table)
    print(f"results: {out / 'diagnosis.json'}  ({results['seconds'] / 60:.1f} min)")
    return 0


def diagnosis_table(rows: dict[str, dict[str, float]], fractions: list[float]) -> str:
    """One row per model: sample accuracy, golden accuracy, recovery per fraction, truncation."""
    columns = [
        ("greedy_accuracy", "greedy acc."),
        ("greedy_golden_accuracy", "greedy golden acc."),
        ("sample_accuracy", "sample acc."),
        ("sample_golden_accuracy", "golden acc."),
        ("lucky_fraction_of_correct", "lucky / correct"),
        *[(f"recovery@{f:g}", f"teacher from {f:g}") for f in fractions],
        *[(f"recovery_wrong@{f:g}", f"… wrong samples {f:g}") for f in fractions if f > 0],
        ("first_divergence", "leaves golden at token"),
        ("mean_length", "mean len"),
        ("reference_length", "ref len"),
        ("truncated_fraction", "truncated"),
    ]
    lines = [
        "| model | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        cells = [f"{row[key]:.3f}" if key in row else "–" for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
