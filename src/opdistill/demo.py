"""`opdistill demo`: the embedded default experiment, offline on a CPU.

1. Build the graph path-finding task and a word-level tokenizer for it.
2. Train a teacher (a few M parameters) to high accuracy and a several-times-smaller initial student
   by SFT; both are cached, so a second run skips this.
3. Train copies of the initial student with SFT, SeqKD, supervised KD, on-policy GKD (JSD(0.9) and
   reverse KL) and mixed λ = 0.5, for the same number of steps, over several seeds.
4. Print a markdown table, write `results.json` and a pass@k plot to the output directory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill.config import Config, DataConfig, EvalConfig, LossConfig, ModelConfig, TrainConfig
from opdistill.eval import markdown_table, plot_pass_at_k, summarise, summarise_curves
from opdistill.eval.evaluate import evaluate
from opdistill.models import count_parameters, tiny_llama
from opdistill.tasks import make_task
from opdistill.tokenizer import build_word_tokenizer
from opdistill.trainer import Trainer

DEMO_VERSION = "1"
TASK = {"task": "graph", "task_args": {"num_nodes": 12, "path_length": 2}}
TEACHER_SIZE = {"hidden_size": 192, "num_layers": 4, "num_heads": 6}
STUDENT_SIZE = {"hidden_size": 96, "num_layers": 2, "num_heads": 4}
TRAIN_SIZE, EVAL_PROMPTS = 20_000, 100
TEACHER_STEPS, STUDENT_INIT_STEPS, METHOD_STEPS = 1500, 300, 150
MAX_NEW_TOKENS = 12

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
    "GKD on-policy (λ=1, JSD 0.9)": {
        "loss": {"kind": "jsd", "beta": 0.9},
        "train": {"student_data_fraction": 1.0},
    },
    "GKD on-policy (λ=1, RKL)": {
        "loss": {"kind": "reverse_kl"},
        "train": {"student_data_fraction": 1.0},
    },
    "GKD mixed (λ=0.5, JSD 0.9)": {
        "loss": {"kind": "jsd", "beta": 0.9},
        "train": {"student_data_fraction": 0.5},
    },
}
METRICS = ["accuracy", "pass@1", "pass@4", "pass@16", "distinct_correct", "teacher_rkl"]
HEADERS = {"distinct_correct": "distinct correct", "teacher_rkl": "RKL to teacher"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPDISTILL_CACHE", "~/.cache/opdistill")).expanduser()


def _fingerprint() -> str:
    spec = json.dumps(
        [
            DEMO_VERSION,
            TASK,
            TEACHER_SIZE,
            STUDENT_SIZE,
            TRAIN_SIZE,
            TEACHER_STEPS,
            STUDENT_INIT_STEPS,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:10]


def _config(output_dir: Path, steps: int, seed: int, lr: float, **sections: dict) -> Config:
    config = Config(
        model=ModelConfig(student="(in memory)", teacher="(in memory)"),
        data=DataConfig(**TASK, train_size=TRAIN_SIZE, eval_size=EVAL_PROMPTS),
        loss=LossConfig(),
        train=TrainConfig(
            steps=steps,
            batch_size=32,
            lr=lr,
            warmup_steps=min(50, steps // 10),
            seed=seed,
            max_new_tokens=MAX_NEW_TOKENS,
            log_every=25,
            output_dir=str(output_dir),
        ),
        eval=EvalConfig(
            num_prompts=EVAL_PROMPTS,
            num_samples=16,
            ks=[1, 4, 16],
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=400,
        ),
    )
    for section, values in sections.items():
        setattr(config, section, dataclasses.replace(getattr(config, section), **values))
    return config


def prepare(cache_dir: Path, quick: bool = False) -> Path:
    """Tokenizer, teacher and initial student, trained once and cached under `cache_dir`."""
    root = cache_dir / ("demo-quick" if quick else "demo")
    done = root / "COMPLETE"
    if done.exists() and done.read_text().strip() == _fingerprint():
        print(f"using the cached teacher and initial student in {root}")
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    task = make_task(TASK["task"], **TASK["task_args"])
    train = task.examples("train", TRAIN_SIZE, seed=0)
    evals = task.examples("eval", EVAL_PROMPTS, seed=0)
    tokenizer = build_word_tokenizer(e.prompt + " " + e.completion for e in train + evals)
    tokenizer.save_pretrained(root / "tokenizer")
    scale = 0.05 if quick else 1.0
    for name, size, steps, lr in (
        ("teacher", TEACHER_SIZE, TEACHER_STEPS, 1e-3),
        ("student_init", STUDENT_SIZE, STUDENT_INIT_STEPS, 1e-3),
    ):
        started = time.perf_counter()
        model = tiny_llama(tokenizer, **size, seed=0)
        steps = max(2, int(steps * scale))
        config = _config(
            root / f"{name}_run",
            steps,
            seed=0,
            lr=lr,
            loss={"kind": "nll"},
            train={"student_data_fraction": 0.0},
        )
        config.train.warmup_steps = steps // 20
        print(f"training {name}: {count_parameters(model) / 1e6:.2f}M parameters, {steps} steps")
        Trainer(config, model, tokenizer, task, train).train()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        shutil.rmtree(root / f"{name}_run", ignore_errors=True)
        print(f"  {name} trained in {time.perf_counter() - started:.0f}s")
    done.write_text(_fingerprint() + "\n")
    return root


def run_demo(
    output_dir: Path,
    cache_dir: Path | None = None,
    seeds: int = 3,
    steps: int | None = None,
    prepare_only: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the whole demo; return the per-method summary."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    root = prepare(cache_dir or default_cache_dir(), quick=quick)
    if prepare_only:
        return {}
    steps = steps or (10 if quick else METHOD_STEPS)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    student_init = AutoModelForCausalLM.from_pretrained(root / "student_init")
    task = make_task(TASK["task"], **TASK["task_args"])
    train = task.examples("train", TRAIN_SIZE, seed=0)
    evals = task.examples("eval", EVAL_PROMPTS, seed=0)
    output_dir.mkdir(parents=True, exist_ok=True)

    from opdistill.teacher import ModelTeacher

    scorer = ModelTeacher(teacher, len(tokenizer))
    eval_config = _config(output_dir, 1, 0, 1e-3).eval

    def measure(model) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        metrics = evaluate(
            model,
            tokenizer,
            task,
            evals,
            num_samples=eval_config.num_samples,
            ks=eval_config.ks,
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=eval_config.batch_size,
            teacher=scorer,
        )
        return metrics, time.perf_counter() - t0

    per_seed: dict[str, list[dict[str, float]]] = {}
    curves: dict[str, list[dict[int, float]]] = {}
    for name, model in (("teacher", teacher), ("initial student", student_init)):
        metrics, _ = measure(model)
        per_seed[name] = [metrics]
        curves[name] = [_curve(metrics)]
    print(
        f"teacher: {count_parameters(teacher) / 1e6:.2f}M parameters, "
        f"student: {count_parameters(student_init) / 1e6:.2f}M parameters"
    )

    for seed in range(seeds):
        for method, sections in METHODS.items():
            run_dir = output_dir / "runs" / f"{_slug(method)}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = _config(run_dir, steps, seed, lr=5e-4, **copy.deepcopy(sections))
            config.train.progress = False
            student = copy.deepcopy(student_init)
            trainer = Trainer(config, student, tokenizer, task, train, teacher_model=teacher)
            t0 = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - t0
            metrics, _ = measure(trainer.accelerator.unwrap_model(trainer.student))
            metrics["seconds_per_step"] = train_seconds / max(1, steps)
            per_seed.setdefault(method, []).append(metrics)
            curves.setdefault(method, []).append(_curve(metrics))
            print(
                f"seed {seed} {method:32s} accuracy {metrics['accuracy']:.3f} "
                f"pass@16 {metrics['pass@16']:.3f} ({train_seconds:.0f}s)"
            )

    summary = summarise(per_seed)
    table = markdown_table(
        summary, [*METRICS, "seconds_per_step"], headers={**HEADERS, "seconds_per_step": "s/step"}
    )
    plot_path = plot_pass_at_k(
        {m: summarise_curves(c) for m, c in curves.items()},
        output_dir / "pass_at_k.png",
        title=f"graph path-finding, {steps} steps per method, {seeds} seeds",
    )
    elapsed = time.perf_counter() - started
    results = {
        "steps_per_method": steps,
        "seeds": seeds,
        "eval_prompts": EVAL_PROMPTS,
        "summary": {m: {k: list(v) for k, v in s.items()} for m, s in summary.items()},
        "per_seed": per_seed,
        "seconds": elapsed,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    print(
        f"\nresults: {output_dir / 'results.json'}, plot: {plot_path}, total {elapsed / 60:.1f} min"
    )
    return results


def _curve(metrics: dict[str, float]) -> dict[int, float]:
    return {int(k[5:]): v for k, v in metrics.items() if k.startswith("pass@")}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
