"""`opdistill experiment teacher-hacking`: distillation from an imperfect teacher, watched by the
golden metrics (after Tiapkin et al., "On Teacher Hacking in Language Model Distillation").

On the demo's graph task, whose golden distribution is uniform over every valid path:
1. an *imperfect teacher* is trained as the demo's teacher is, but on a skewed subset of the
   paths: each training prompt's completion is its alphabetically first valid path with
   probability `--skew`, otherwise a valid path drawn uniformly (`skewed_examples`); it stays
   accurate while its distribution over valid paths is far from the golden one;
2. copies of the demo's initial student are distilled from it with some of the demo's methods,
   evaluating every `--eval-every` steps with `eval.golden` on: the proxy (`teacher_rkl`) and
   golden metrics (`golden_kl`, `golden_mass`, accuracy) and the `teacher_hacking` flag land in
   each run's metrics.jsonl;
3. `teacher_hacking.json` summarises each run (the steps at which the flag was raised) and
   learning-curve plots of the proxy and golden metrics are written.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill import Trainer, model_teacher
from opdistill.eval import X_LABELS, learning_curves, plot_learning_curves, read_records
from opdistill.experiments.demo import (
    DEMO_VERSION,
    GRAPH,
    OBJECTIVES,
    DemoSettings,
    cached,
    default_cache_dir,
    mark_cached,
    merge_options,
    prepare,
    run_config,
    settings_fingerprint,
    slug,
    task_data,
)
from opdistill.files import write_atomic
from opdistill.models import tiny_llama
from opdistill.tasks import Example

DEFAULT_METHODS = ("GKD (λ=1, RKL)", "GKD (λ=1, JSD 0.9)", "supervised KD (FKL)")
CURVE_METRICS = ("teacher_rkl", "golden_kl", "golden_mass", "accuracy")


def skewed_examples(examples: list[Example], skew: float, seed: int = 0) -> list[Example]:
    """Graph examples whose completion is the first valid path (sorted) with probability `skew`,
    else a valid path drawn uniformly: training data for a teacher biased towards one path."""
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must lie in [0, 1], got {skew}")
    rng = random.Random(seed)
    out = []
    for example in examples:
        solutions = example.meta["solutions"]
        path = solutions[0] if rng.random() < skew else rng.choice(solutions)
        out.append(replace(example, completion=path, reference=path))
    return out


def build_imperfect_teacher(
    cache_dir: Path, settings: DemoSettings, skew: float, quick: bool = False
) -> Path:
    """A teacher of the demo's size and recipe trained on `skewed_examples`, cached under
    `cache_dir`; returns its directory (holding `teacher` and `tokenizer`)."""
    name = f"demo-imperfect-teacher-skew{skew:g}" + ("-quick" if quick else "")
    root = cache_dir / name
    fingerprint = settings_fingerprint(DEMO_VERSION, GRAPH, settings, skew)
    if cached(root, fingerprint, "imperfect teacher"):
        return root
    demo_root = prepare(cache_dir, settings, GRAPH, quick)  # the demo's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(demo_root / "tokenizer")
    task, train, _ = task_data(settings, GRAPH)
    hidden, layers, heads = settings.teacher_size
    model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads)
    sft = {"loss": {"kind": "nll"}, "train": {"student_data_fraction": 0.0}}
    steps = settings.teacher_steps
    run_dir = root / "teacher_run"
    config = run_config(settings, GRAPH, run_dir, steps, 0, settings.teacher_lr, sft)
    print(f"training the imperfect teacher (skew {skew:g}) by SFT, {steps} steps", flush=True)
    Trainer(config, model, tokenizer, task, skewed_examples(train, skew)).train()
    shutil.rmtree(run_dir, ignore_errors=True)
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "tokenizer")
    mark_cached(root, fingerprint)
    return root


def summarise_run(run_dir: Path) -> dict[str, Any]:
    """The last evaluation's proxy and golden metrics and the steps flagged as teacher hacking."""
    records = read_records(run_dir)
    last = records[-1] if records else {}
    keys = ("accuracy", "pass@1", "teacher_rkl", "golden_kl", "golden_mass")
    return {
        **{key: last[key] for key in keys if key in last},
        "flagged_steps": [r["step"] for r in records if r.get("teacher_hacking")],
        "evaluations": len(records),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opdistill experiment teacher-hacking", description=__doc__
    )
    parser.add_argument("--skew", type=float, default=0.9, help="share of first-path targets")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--window", type=int, default=3, help="eval.hacking_window")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/teacher-hacking"))
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} (valid: {', '.join(OBJECTIVES)})")
    if not 0.0 <= args.skew <= 1.0:
        parser.error(f"--skew {args.skew}: must lie in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    started = time.perf_counter()
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    cache_dir = args.cache_dir or default_cache_dir()
    demo_root = prepare(cache_dir, settings, GRAPH, args.quick)
    teacher_root = build_imperfect_teacher(cache_dir, settings, args.skew, args.quick)
    tokenizer = AutoTokenizer.from_pretrained(demo_root / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_root / "teacher")
    student_init = AutoModelForCausalLM.from_pretrained(demo_root / "student_init")
    task, train, evals = task_data(settings, GRAPH)
    scorer = model_teacher(teacher, len(tokenizer))
    steps = args.steps or settings.method_steps
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    extra = {
        "train": {"eval_every": args.eval_every},
        "eval": {"golden": True, "hacking_window": args.window},
    }
    runs: dict[str, dict[str, Any]] = {}
    run_dirs = []
    for seed in range(args.seeds):
        for method in args.methods:
            run_dir = out / "runs" / f"{slug(method)}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            options = merge_options(OBJECTIVES[method], extra)
            lr = settings.method_lr
            config = run_config(settings, GRAPH, run_dir, steps, seed, lr, options)
            student = copy.deepcopy(student_init)
            Trainer(
                config,
                student,
                tokenizer,
                task,
                train,
                evals,
                teacher_model=teacher,
                teacher=scorer,
            ).train()
            runs[f"{method} seed{seed}"] = summarise_run(run_dir)
            run_dirs.append(run_dir)
            print(f"{method} seed {seed}: {json.dumps(runs[f'{method} seed{seed}'])}", flush=True)
    plots = []
    for metric in CURVE_METRICS:
        path = out / f"curve_{metric}.png"
        curves = learning_curves(run_dirs, metric)
        plots.append(str(plot_learning_curves(curves, path, metric, X_LABELS["step"])))
    results = {
        "skew": args.skew,
        "steps": steps,
        "eval_every": args.eval_every,
        "window": args.window,
        "runs": runs,
        "plots": plots,
        "seconds": time.perf_counter() - started,
    }
    write_atomic(out / "teacher_hacking.json", json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'teacher_hacking.json'}  ({results['seconds'] / 60:.1f} min)")
    return 0
