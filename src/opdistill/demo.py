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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdistill.config import Config, DataConfig, EvalConfig, LossConfig, ModelConfig, TrainConfig
from opdistill.eval import markdown_table, plot_pass_at_k, summarise, summarise_curves
from opdistill.eval.evaluate import evaluate
from opdistill.models import count_parameters, tiny_llama
from opdistill.tasks import make_task
from opdistill.teacher import ModelTeacher
from opdistill.tokenizer import build_word_tokenizer
from opdistill.trainer import Trainer

DEMO_VERSION = "2"
TASK = {"task": "graph", "task_args": {"num_nodes": 10, "path_length": 2, "num_distractors": 2}}
MAX_NEW_TOKENS = 12


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
    method_lr: float = 5e-4

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


def _fingerprint(settings: DemoSettings) -> str:
    spec = json.dumps([DEMO_VERSION, TASK, dataclasses.asdict(settings)], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def _config(
    settings: DemoSettings, output_dir: Path, steps: int, seed: int, lr: float, **sections: dict
) -> Config:
    config = Config(
        model=ModelConfig(student="(in memory)", teacher="(in memory)"),
        data=DataConfig(**TASK, train_size=settings.train_size, eval_size=settings.eval_prompts),
        loss=LossConfig(),
        train=TrainConfig(
            steps=steps,
            batch_size=settings.batch_size,
            lr=lr,
            warmup_steps=steps // 10,
            seed=seed,
            max_new_tokens=MAX_NEW_TOKENS,
            log_every=25,
            output_dir=str(output_dir),
            progress=False,
        ),
        eval=EvalConfig(
            num_prompts=settings.eval_prompts,
            num_samples=settings.eval_samples,
            ks=[k for k in (1, 4, 16) if k <= settings.eval_samples],
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=400,
        ),
    )
    for section, values in sections.items():
        setattr(config, section, dataclasses.replace(getattr(config, section), **values))
    return config


def _task_data(settings: DemoSettings):
    task = make_task(TASK["task"], **TASK["task_args"])
    return (
        task,
        task.examples("train", settings.train_size, seed=0),
        task.examples("eval", settings.eval_prompts, seed=0),
    )


def prepare(cache_dir: Path, settings: DemoSettings, name: str = "demo") -> Path:
    """Tokenizer, teacher and initial student, trained once and cached under `cache_dir/name`."""
    root = cache_dir / name
    done = root / "COMPLETE"
    if done.exists() and done.read_text().strip() == _fingerprint(settings):
        print(f"using the cached teacher and initial student in {root}")
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    task, train, evals = _task_data(settings)
    tokenizer = build_word_tokenizer(e.prompt + " " + e.completion for e in train + evals)
    tokenizer.save_pretrained(root / "tokenizer")
    for role, (hidden, layers, heads), steps in (
        ("teacher", settings.teacher_size, settings.teacher_steps),
        ("student_init", settings.student_size, settings.student_init_steps),
    ):
        started = time.perf_counter()
        model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads)
        config = _config(
            settings,
            root / f"{role}_run",
            steps,
            seed=0,
            lr=settings.teacher_lr,
            loss={"kind": "nll"},
            train={"student_data_fraction": 0.0, "progress": True},
        )
        print(
            f"training the {role.replace('_', ' ')} by SFT: "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {steps} steps"
        )
        Trainer(config, model, tokenizer, task, train).train()
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        shutil.rmtree(root / f"{role}_run", ignore_errors=True)
        print(f"  done in {time.perf_counter() - started:.0f}s")
    done.write_text(_fingerprint(settings) + "\n")
    return root


def run_demo(
    output_dir: Path,
    cache_dir: Path | None = None,
    seeds: int = 3,
    steps: int | None = None,
    prepare_only: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the whole demo; return what it writes to `results.json`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    settings = DemoSettings.quick() if quick else DemoSettings()
    root = prepare(
        cache_dir or default_cache_dir(), settings, name="demo-quick" if quick else "demo"
    )
    if prepare_only:
        return {}
    steps = steps or settings.method_steps
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    student_init = AutoModelForCausalLM.from_pretrained(root / "student_init")
    task, train, evals = _task_data(settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    scorer = ModelTeacher(teacher, len(tokenizer))
    ec = _config(settings, output_dir, 1, 0, 1.0).eval

    def measure(model: torch.nn.Module) -> dict[str, float]:
        return evaluate(
            model,
            tokenizer,
            task,
            evals,
            num_samples=ec.num_samples,
            ks=ec.ks,
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=ec.batch_size,
            teacher=scorer,
        )

    per_seed: dict[str, list[dict[str, float]]] = {}
    for name, model in (("teacher", teacher), ("initial student", student_init)):
        per_seed[name] = [measure(model)]
    print(
        f"teacher {count_parameters(teacher) / 1e6:.2f}M parameters, greedy accuracy "
        f"{per_seed['teacher'][0]['accuracy']:.2f}; initial student "
        f"{count_parameters(student_init) / 1e6:.2f}M, "
        f"{per_seed['initial student'][0]['accuracy']:.2f}"
    )

    runs = [(seed, method) for seed in range(seeds) for method in METHODS]
    progress = tqdm(runs, desc="demo runs", dynamic_ncols=True)
    for seed, method in progress:
        progress.set_postfix_str(f"seed {seed}, {method}")
        run_dir = output_dir / "runs" / f"{_slug(method)}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = _config(
            settings, run_dir, steps, seed, settings.method_lr, **copy.deepcopy(METHODS[method])
        )
        trainer = Trainer(
            config,
            copy.deepcopy(student_init),
            tokenizer,
            task,
            train,
            teacher_model=teacher,
            teacher=scorer,
        )
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        metrics = measure(trainer.accelerator.unwrap_model(trainer.student))
        metrics["seconds_per_step"] = seconds / max(1, steps)
        per_seed.setdefault(method, []).append(metrics)
        progress.write(
            f"seed {seed}  {method:30s} accuracy {metrics['accuracy']:.3f}  "
            f"pass@1 {metrics['pass@1']:.3f}  ({seconds:.0f}s)"
        )
    progress.close()

    summary = summarise(per_seed)
    metrics_shown = [
        m for m in [*METRICS, "seconds_per_step"] if any(m in s for s in summary.values())
    ]
    table = markdown_table(
        summary, metrics_shown, headers={**HEADERS, "seconds_per_step": "s/step"}
    )
    curves = {m: summarise_curves([_curve(r) for r in runs_]) for m, runs_ in per_seed.items()}
    plot_path = plot_pass_at_k(
        curves,
        output_dir / "pass_at_k.png",
        title=f"graph path-finding: {steps} steps per method, {seeds} seeds",
        dashed=("teacher", "initial student"),
    )
    elapsed = time.perf_counter() - started
    results = {
        "steps_per_method": steps,
        "seeds": seeds,
        "settings": dataclasses.asdict(settings),
        "summary": {m: {k: list(v) for k, v in s.items()} for m, s in summary.items()},
        "per_seed": per_seed,
        "seconds": elapsed,
        "table": table,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    print(
        f"\nresults: {output_dir / 'results.json'}   plot: {plot_path}   "
        f"total {elapsed / 60:.1f} min"
    )
    return results


def _curve(metrics: dict[str, float]) -> dict[int, float]:
    return {int(k[5:]): v for k, v in metrics.items() if k.startswith("pass@")}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
