"""`opdistill demo --suite self-distill`: what on-policy self-distillation costs in diversity.

On the graph task (several correct paths per prompt):
1. a *base student* learns, by SFT from the default demo's initial student, to answer plain
   prompts and to use a hint: half of its training prompts carry a correct path in the
   self-distillation template;
2. copies of the base student train for the same number of steps with self-distillation from
   its own frozen copy reading a reference solution, a sampled correct demonstration, or a
   demonstration drawn uniformly over the distinct correct ones found — sampled from the current
   student, or from the initial one (the diversity-preserving options); with RL from the verifier
   (GRPO); and with on-policy GKD from the demo's teacher;
3. every model is evaluated with 64 samples per prompt in distribution and out of it: the OOD
   prompts are the eval graphs with the path the base student gives most often blocked (its last
   edge redirected to a dead end), so a model that has collapsed onto its usual answer fails
   there and one that keeps several solutions does not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opdistill import Config, Trainer, model_teacher
from opdistill.eval import EvalMetrics, evaluate_with_config, plot_pass_at_k, summarise_curves
from opdistill.experiments.demo import (
    GRAPH,
    DemoSettings,
    merge_options,
    prepare,
    report_results,
    run_config,
    slug,
    task_data,
)
from opdistill.tasks import Example, GraphTask

# Words of the demo tokenizer's vocabulary (it is trained on graph prompts and paths only).
TEMPLATE = "{prompt} path : {context}"
SEMANTIC_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class SelfDistillSettings:
    """Sizes of the suite; `quick` shrinks everything for smoke tests."""

    base_steps: int = 300
    hint_fraction: float = 0.5
    method_steps: int = 150
    eval_samples: int = 64
    demo_attempts: int = 4

    @classmethod
    def quick(cls) -> SelfDistillSettings:
        return cls(base_steps=2, method_steps=2, eval_samples=4, demo_attempts=2)


def _self_distill(**options: Any) -> dict[str, Any]:
    return {
        "model": {"teacher": None},
        "loss": {"kind": "reverse_kl"},
        "train": {"student_data_fraction": 1.0},
        "self_distill": {"enabled": True, "template": TEMPLATE, "weights": "frozen", **options},
    }


def methods(settings: SelfDistillSettings) -> dict[str, dict[str, Any]]:
    demo = {"context": "demonstration", "demo_attempts": settings.demo_attempts}
    return {
        "self-distill, reference": _self_distill(context="reference"),
        "self-distill, sampled demo": _self_distill(**demo, demo_selection="probability"),
        "self-distill, uniform distinct demo": _self_distill(**demo, demo_selection="uniform"),
        "self-distill, uniform demo from initial": _self_distill(
            **{**demo, "demo_attempts": 2 * settings.demo_attempts},
            demo_selection="uniform",
            demo_model="initial",
        ),
        "RL (GRPO, verifier)": {
            "loss": {"kind": "nll"},
            "train": {"student_data_fraction": 1.0},
            "reward": {"distill_weight": 0.0, "group_size": 4},
        },
        "GKD on-policy from teacher (RKL)": {
            "loss": {"kind": "reverse_kl"},
            "train": {"student_data_fraction": 1.0},
        },
    }


METRICS = [
    "accuracy",
    "pass@1",
    "pass@8",
    "pass@64",
    "distinct_correct",
    "self_bleu",
    "semantic_diversity",
    "ood pass@1",
    "ood pass@64",
    "ood distinct_correct",
]
HEADERS = {
    "distinct_correct": "distinct correct",
    "self_bleu": "self-BLEU",
    "semantic_diversity": "semantic div.",
    "ood distinct_correct": "ood distinct correct",
}


def hinted(examples: Sequence[Example], fraction: float) -> list[Example]:
    """Every 1/fraction-th example gets its reference in the prompt (the base's hint skill)."""
    every = max(1, round(1 / fraction)) if fraction > 0 else 0
    return [
        dataclasses.replace(e, prompt=TEMPLATE.format(prompt=e.prompt, context=e.reference))
        if every and i % every == 0
        else e
        for i, e in enumerate(examples)
    ]


def prepare_base(
    root: Path, demo: DemoSettings, settings: SelfDistillSettings, output_dir: Path
) -> Path:
    """The base student: SFT from the initial student on plain and hinted prompts (cached)."""
    path = root / "self_distill_base"
    stamp = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    if (path / "COMPLETE").exists() and (path / "COMPLETE").read_text() == stamp:
        return path
    shutil.rmtree(path, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(root / "student_init")
    instance, train, _ = task_data(demo, GRAPH)
    sft = {"loss": {"kind": "nll"}, "train": {"student_data_fraction": 0.0, "progress": True}}
    run_dir = output_dir / "base_run"
    config = run_config(demo, GRAPH, run_dir, settings.base_steps, 0, demo.teacher_lr, sft)
    print(f"graph: training the base student ({settings.base_steps} steps, hints on half)")
    Trainer(config, model, tokenizer, instance, hinted(train, settings.hint_fraction)).train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.rmtree(run_dir, ignore_errors=True)
    (path / "COMPLETE").write_text(stamp)
    return path


def out_of_distribution(
    task: GraphTask, examples: Sequence[Example], samples: Sequence[Sequence[str]]
) -> list[Example]:
    """Each eval graph with its most frequent correct sampled path blocked (`block_path`).

    Where no sample was correct, the reference path is blocked instead.
    """
    shifted = []
    for example, texts in zip(examples, samples, strict=True):
        correct = Counter(
            task.solution_key(example, t) for t in texts if task.is_correct(example, t)
        )
        common = min(correct, key=lambda k: (-correct[k], k)) if correct else example.reference
        new = task.block_path(example, common)
        if new is not None:
            shifted.append(new)
    return shifted


def _evaluate(
    model: PreTrainedModel, tokenizer, task, examples, config: Config, prefix: str = ""
) -> EvalMetrics:
    eval_config = config.eval
    if prefix:  # out of distribution: pass@k and distinct solutions only
        eval_config = dataclasses.replace(eval_config, self_bleu=False, semantic_model=None)
    metrics = evaluate_with_config(model, tokenizer, task, examples, eval_config, None, seed=0)
    if prefix:
        return EvalMetrics({f"{prefix}{k}": v for k, v in metrics.items()})
    return metrics


def run_self_distill_suite(
    output_dir: Path,
    cache_dir: Path,
    seeds: int = 3,
    steps: int | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the suite; print the table and write `results.json` and the pass@k plots."""
    started = time.perf_counter()
    demo = DemoSettings.quick() if quick else DemoSettings()
    settings = SelfDistillSettings.quick() if quick else SelfDistillSettings()
    steps = steps or settings.method_steps
    root = prepare(cache_dir, demo, GRAPH, quick)
    output_dir.mkdir(parents=True, exist_ok=True)
    base_path = prepare_base(root, demo, settings, output_dir)

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    instance, train, evals = task_data(demo, GRAPH)
    eval_options = {
        "eval": {
            "num_samples": settings.eval_samples,
            "ks": [1],
            "full_curve": True,
            "semantic_model": SEMANTIC_MODEL,
        }
    }
    reference = run_config(demo, GRAPH, output_dir, 1, 0, 1.0, eval_options)

    per_seed: dict[str, list[dict[str, float]]] = {}
    base_metrics = _evaluate(base, tokenizer, instance, evals, reference)
    ood = out_of_distribution(instance, evals, base_metrics.samples)
    print(f"graph: {len(ood)} out-of-distribution prompts (the base's usual path blocked)")
    for name, model, metrics in (
        ("teacher", teacher, None),
        ("base student", base, base_metrics),
    ):
        metrics = (
            metrics
            if metrics is not None
            else _evaluate(model, tokenizer, instance, evals, reference)
        )
        per_seed[name] = [
            {**metrics, **_evaluate(model, tokenizer, instance, ood, reference, "ood ")}
        ]

    scorer = model_teacher(teacher, len(tokenizer))
    runs = [(seed, method) for seed in range(seeds) for method in methods(settings)]
    progress = tqdm(runs, desc="self-distill runs", dynamic_ncols=True)
    for seed, method in progress:
        progress.set_postfix_str(f"seed {seed}, {method}")
        run_dir = output_dir / "runs" / f"{slug(method)}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        options = merge_options(methods(settings)[method], eval_options)
        config = run_config(demo, GRAPH, run_dir, steps, seed, demo.method_lr, options)
        self_distilling = config.self_distill.enabled
        trainer = Trainer(
            config,
            copy.deepcopy(base),
            tokenizer,
            instance,
            train,
            evals,
            teacher_model=None if self_distilling else teacher,
            teacher=None if self_distilling else scorer,
        )
        metrics = trainer.train()
        student = trainer.accelerator.unwrap_model(trainer.student)
        metrics.update(_evaluate(student, tokenizer, instance, ood, config, "ood "))
        metrics["seconds_per_step"] = trainer.train_seconds / max(1, steps)
        per_seed.setdefault(method, []).append(dict(metrics))
        progress.write(
            f"seed {seed}  {method:36s} pass@1 {metrics['pass@1']:.3f}  "
            f"pass@64 {metrics.get(f'pass@{settings.eval_samples}', float('nan')):.3f}  "
            f"ood pass@1 {metrics['ood pass@1']:.3f}  ({trainer.train_seconds:.0f}s)"
        )
    progress.close()

    plots = []
    for prefix, label in (("", "in distribution"), ("ood ", "out of distribution")):
        curves = {
            m: summarise_curves([_curve(r, prefix) for r in runs]) for m, runs in per_seed.items()
        }
        name = "pass_at_k.png" if not prefix else "pass_at_k_ood.png"
        plots.append(
            plot_pass_at_k(
                curves,
                output_dir / name,
                title=f"graph, {label}: {steps} steps per method, {seeds} seeds",
                dashed=("teacher", "base student"),
            )
        )
    shown = [m.replace("@64", f"@{settings.eval_samples}") for m in METRICS]
    header = {"suite": "self-distill", "steps_per_method": steps, "seeds": seeds}
    header |= {"settings": dataclasses.asdict(settings), "ood_prompts": len(ood)}
    return report_results(
        output_dir, header, per_seed, list(dict.fromkeys(shown)), HEADERS, plots, started
    )


def _curve(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    head = f"{prefix}pass@"
    return {int(k[len(head) :]): v for k, v in metrics.items() if k.startswith(head)}
