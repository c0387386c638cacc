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
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opdistill import Config, Trainer, model_teacher
from opdistill.errors import OpdistillError
from opdistill.eval import EvalMetrics, evaluate_with_config, plot_pass_at_k, summarise_curves
from opdistill.experiments.demo import (
    GRAPH,
    DemoSettings,
    merge_options,
    prepare,
    report_results,
    run_config,
    settings_fingerprint,
    slug,
    task_data,
)
from opdistill.files import write_atomic
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


@dataclass(frozen=True)
class FrontierPoint:
    """One remedy at one strength: its configuration, drawn as one point of its line."""

    family: str
    strength: float
    options: dict[str, Any]


def remedies(settings: SelfDistillSettings) -> dict[str, FrontierPoint]:
    """The frontier suite: each diversity-preserving remedy at several strengths, beside the
    published method (SDSD), RL with the verifier and GKD from the teacher
    (docs/self-distillation.md derives each remedy from the tilt)."""
    sampled = {"context": "demonstration", "demo_attempts": settings.demo_attempts}
    balanced = {
        "context": "demonstration",
        "demo_attempts": 2 * settings.demo_attempts,
        "demo_selection": "uniform",
        "demo_model": "initial",
    }
    reference_methods = methods(settings)
    points = {
        "SDSD (sampled demo)": FrontierPoint("SDSD", 1.0, _self_distill(**sampled)),
        "RL (GRPO, verifier)": FrontierPoint(
            "RL (GRPO)", 0.0, reference_methods["RL (GRPO, verifier)"]
        ),
        "GKD from teacher (RKL)": FrontierPoint(
            "GKD from teacher", 0.0, reference_methods["GKD on-policy from teacher (RKL)"]
        ),
    }
    for alpha in (0.5,):
        points[f"tempered tilt α={alpha}, sampled demo"] = FrontierPoint(
            "tempered tilt (sampled demo)", alpha, _self_distill(**sampled, context_strength=alpha)
        )
    for weight in (0.3, 0.4, 0.5, 1.0):
        points[f"FKL anchor w={weight}, sampled demo"] = FrontierPoint(
            "FKL anchor to base (sampled demo)",
            weight,
            _self_distill(**sampled, anchor_weight=weight),
        )
    for decay in (0.9,):
        points[f"EMA demos d={decay}, uniform"] = FrontierPoint(
            "balanced demos from an EMA copy",
            decay,
            _self_distill(**{**balanced, "demo_model": "ema"}, demo_ema_decay=decay),
        )
    for alpha in (1.0, 2.0):
        points[f"balanced demos α={alpha}"] = FrontierPoint(
            "balanced demos (initial, uniform), tilt α",
            alpha,
            _self_distill(**balanced, context_strength=alpha),
        )
    return points


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
    frontier: bool = False,
    only: Sequence[str] = (),
    reuse: bool = False,
) -> dict[str, Any]:
    """Run the suite (the trade-off, or with `frontier` the remedies at several strengths);
    print the table and write `results.json` and the plots. `only` keeps the methods whose
    names contain one of its strings. With `reuse`, runs already finished in `output_dir` with
    the same settings are kept, and processes started alike on one `output_dir` share the rest
    (each run is claimed by one of them); the table holds the runs finished so far."""
    started = time.perf_counter()
    demo = DemoSettings.quick() if quick else DemoSettings()
    settings = SelfDistillSettings.quick() if quick else SelfDistillSettings()
    steps = steps or settings.method_steps
    points = remedies(settings) if frontier else None
    chosen = {n: p.options for n, p in points.items()} if points else methods(settings)
    if only:
        names = list(chosen)
        chosen = {n: o for n, o in chosen.items() if any(part in n for part in only)}
        if not chosen:
            raise OpdistillError(
                f"--only {' '.join(only)}: no method matches (methods: {'; '.join(names)})"
            )
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
    runs = [(seed, method) for seed in range(seeds) for method in chosen]
    progress = tqdm(runs, desc="self-distill runs", dynamic_ncols=True)
    for seed, method in progress:
        progress.set_postfix_str(f"seed {seed}, {method}")
        run_dir = output_dir / "runs" / f"{slug(method)}-seed{seed}"
        options = merge_options(chosen[method], eval_options)
        stamp = settings_fingerprint(settings, demo, steps, seed, options)
        if reuse and _finished(run_dir, stamp) is not None:
            continue
        if reuse and not _claim(run_dir):
            continue  # another process of the same suite is running it
        shutil.rmtree(run_dir, ignore_errors=True)
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
        finished = dict(metrics)
        write_atomic(run_dir / RUN_RESULT, json.dumps({"stamp": stamp, "metrics": finished}) + "\n")
        _claim_file(run_dir).unlink(missing_ok=True)
        progress.write(
            f"seed {seed}  {method:40s} pass@1 {metrics['pass@1']:.3f}  "
            f"pass@64 {metrics.get(f'pass@{settings.eval_samples}', float('nan')):.3f}  "
            f"ood pass@64 "
            f"{metrics.get(f'ood pass@{settings.eval_samples}', float('nan')):.3f}  "
            f"({trainer.train_seconds:.0f}s)"
        )
    progress.close()
    for seed, method in runs:  # in a fixed order, whichever process ran them
        stamp = settings_fingerprint(
            settings, demo, steps, seed, merge_options(chosen[method], eval_options)
        )
        finished = _finished(output_dir / "runs" / f"{slug(method)}-seed{seed}", stamp)
        if finished is not None:
            per_seed.setdefault(method, []).append(finished)

    title = f"graph: {steps} steps per method, {seeds} seeds"
    if points:
        at = f"pass@{settings.eval_samples}"
        plots = [
            plot_frontier(
                per_seed,
                {n: p for n, p in points.items() if n in chosen},
                at,
                output_dir / "frontier.png",
                title,
            )
        ]
    else:
        plots = []
        for prefix, label in (("", "in distribution"), ("ood ", "out of distribution")):
            curves = {
                m: summarise_curves([_curve(r, prefix) for r in runs])
                for m, runs in per_seed.items()
            }
            name = "pass_at_k.png" if not prefix else "pass_at_k_ood.png"
            plots.append(
                plot_pass_at_k(
                    curves,
                    output_dir / name,
                    title=f"{title.replace('graph', f'graph, {label}')}",
                    dashed=("teacher", "base student"),
                )
            )
    shown = [m.replace("@64", f"@{settings.eval_samples}") for m in METRICS]
    header = {
        "suite": "self-distill-frontier" if frontier else "self-distill",
        "steps_per_method": steps,
        "seeds": seeds,
    }
    header |= {"settings": dataclasses.asdict(settings), "ood_prompts": len(ood)}
    return report_results(
        output_dir, header, per_seed, list(dict.fromkeys(shown)), HEADERS, plots, started
    )


RUN_RESULT = "result.json"


def _finished(run_dir: Path, stamp: str) -> dict[str, float] | None:
    """The metrics of a run finished with these settings, or None."""
    try:
        result = json.loads((run_dir / RUN_RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result["metrics"] if result.get("stamp") == stamp else None


def _claim_file(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.claim"


def _claim(run_dir: Path) -> bool:
    """Take the run for this process, unless a live process holds its claim."""
    claim = _claim_file(run_dir)
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            with claim.open("x") as handle:
                handle.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                holder = int(claim.read_text() or 0)
                os.kill(holder, 0)
                return False  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                claim.unlink(missing_ok=True)  # its process is gone: take it over
            except PermissionError:
                return False
    return False


def plot_frontier(
    per_seed: dict[str, list[dict[str, float]]],
    points: dict[str, FrontierPoint],
    at: str,
    path: Path,
    title: str,
) -> Path:
    """pass@1 against `at` (pass@64) in distribution and out of it, mean ± std over seeds; the
    points of one remedy are joined in order of strength. The teacher and base are reference
    marks; the goal region is shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2))
    FigureCanvasAgg(fig)
    panels = [(fig.add_subplot(1, 2, 1), at, 0.99), (fig.add_subplot(1, 2, 2), f"ood {at}", 0.95)]
    families: dict[str, list[tuple[float, str]]] = {}
    for name, point in points.items():
        families.setdefault(point.family, []).append((point.strength, name))
    for ax, y_metric, goal in panels:
        ax.fill_between([0.65, 1.0], goal, 1.005, color="tab:green", alpha=0.12, label="goal")
        for family, members in families.items():
            xs, ys, xe, ye, strengths = [], [], [], [], []
            for strength, name in sorted(members):
                rows = per_seed.get(name, [])
                if not rows:
                    continue
                x = [r["pass@1"] for r in rows]
                y = [r[y_metric] for r in rows]
                xs.append(statistics.fmean(x))
                ys.append(statistics.fmean(y))
                xe.append(statistics.pstdev(x))
                ye.append(statistics.pstdev(y))
                strengths.append(strength)
            if xs:
                ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=family)
            if len(xs) > 1:  # the strength beside each point of a remedy
                for x, y, strength in zip(xs, ys, strengths, strict=True):
                    ax.annotate(
                        f"{strength:g}",
                        (x, y),
                        xytext=(4, -10),
                        fontsize=7,
                        textcoords="offset points",
                    )
        for name, marker in (("teacher", "*"), ("base student", "s")):
            if name in per_seed:
                row = per_seed[name][0]
                ax.plot(row["pass@1"], row[y_metric], marker, color="black", ms=10, label=name)
        ax.set_xlabel("pass@1")
        ax.set_ylabel(y_metric)
        ax.grid(alpha=0.3)
    panels[0][0].set_title(f"{title}: in distribution")
    panels[1][0].set_title("out of distribution (usual path blocked)")
    panels[1][0].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _curve(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    head = f"{prefix}pass@"
    return {int(k[len(head) :]): v for k, v in metrics.items() if k.startswith(head)}
