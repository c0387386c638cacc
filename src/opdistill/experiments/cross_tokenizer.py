"""`opdistill demo --suite cross-tokenizer`: a character-level teacher into a word-level student.

1. the graph task, a word-level tokenizer (the student's) and a character-level one;
2. a word-level teacher and a character-level teacher trained by SFT to comparable accuracy, and
   a small word-level initial student (all cached);
3. copies of the initial student trained on-policy for the same number of steps, over several
   seeds: from the word-level teacher with exact token losses (sampled-token, reverse KL), and
   from the character-level teacher with span alignment (sampled-token) and with ULD; SFT as the
   off-policy reference;
4. one markdown table of held-out greedy accuracy and pass@k, `results.json`.
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

from opdistill import Config, Trainer, config_from_dict, make_task
from opdistill.eval import evaluate_with_config
from opdistill.experiments.demo import (
    cached,
    mark_cached,
    merge_options,
    report_results,
    settings_fingerprint,
    slug,
)
from opdistill.models import (
    build_char_tokenizer,
    build_word_tokenizer,
    count_parameters,
    tiny_llama,
)
from opdistill.teachers import Teacher, aligned_teacher, model_teacher

VERSION = "3"
TASK = {"task": "graph", "task_args": {"num_nodes": 8, "path_length": 2, "num_distractors": 1}}
METRICS = ["accuracy", "pass@1", "pass@4"]


@dataclass(frozen=True)
class CrossTokenizerSettings:
    """Sizes of the suite; `quick` shrinks everything for smoke tests (numbers not meaningful)."""

    teacher_size: tuple[int, int, int] = (96, 2, 4)  # hidden size, layers, heads
    student_size: tuple[int, int, int] = (64, 2, 4)
    train_size: int = 6000
    eval_prompts: int = 60
    eval_samples: int = 4
    teacher_steps: int = 300
    student_init_steps: int = 300
    method_steps: int = 50
    batch_size: int = 16  # on-policy steps
    sft_batch_size: int = 32  # training the teachers and the initial student
    teacher_lr: float = 2e-3
    method_lr: float = 1e-3
    max_new_tokens: int = 8  # words; the character-level teacher needs 2 per word
    char_max_new_tokens: int = 16

    @classmethod
    def quick(cls) -> CrossTokenizerSettings:
        return cls(
            teacher_size=(16, 1, 2),
            student_size=(16, 1, 2),
            train_size=200,
            eval_prompts=4,
            eval_samples=4,
            teacher_steps=2,
            student_init_steps=1,
            method_steps=2,
            batch_size=4,
            sft_batch_size=4,
        )


# method → (teacher: None (SFT), "word" or "char"; config options)
METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "SFT": (None, {"loss": {"kind": "nll"}, "train": {"student_data_fraction": 0.0}}),
    "same tokenizer: sampled-token": ("word", {"loss": {"kind": "sampled_token"}}),
    "same tokenizer: reverse KL": ("word", {"loss": {"kind": "reverse_kl"}}),
    "char teacher: span alignment, sampled-token": (
        "char",
        {"loss": {"kind": "sampled_token", "cross_tokenizer": "span"}},
    ),
    "char teacher: ULD": ("char", {"loss": {"kind": "reverse_kl", "cross_tokenizer": "uld"}}),
}


def run_config(
    settings: CrossTokenizerSettings,
    output_dir: Path,
    steps: int,
    seed: int,
    lr: float,
    method: dict[str, Any] | None = None,
    max_new_tokens: int | None = None,
) -> Config:
    """A validated config on the graph task (models are passed in memory)."""
    new_tokens = max_new_tokens or settings.max_new_tokens
    values = {
        "model": {"student": "(in memory)", "teacher": "(in memory)"},
        "data": {**TASK, "train_size": settings.train_size, "eval_size": settings.eval_prompts},
        "train": {
            "steps": steps,
            "batch_size": settings.batch_size,
            "lr": lr,
            "warmup_steps": steps // 10,
            "seed": seed,
            "student_data_fraction": 1.0,
            "max_new_tokens": new_tokens,
            "log_every": 25,
            "output_dir": str(output_dir),
            "progress": False,
        },
        "eval": {
            "num_prompts": settings.eval_prompts,
            "num_samples": settings.eval_samples,
            "ks": [k for k in (1, 4) if k <= settings.eval_samples],
            "max_new_tokens": new_tokens,
            "batch_size": 400,
            "self_bleu": False,
        },
    }
    return config_from_dict(merge_options(values, method or {}))


def prepare(cache_dir: Path, settings: CrossTokenizerSettings, quick: bool = False) -> Path:
    """Both tokenizers, both teachers and the initial student, trained once and cached."""
    root = cache_dir / ("cross-tokenizer-quick" if quick else "cross-tokenizer")
    fingerprint = settings_fingerprint(VERSION, TASK, settings)
    if cached(root, fingerprint, "teachers and initial student"):
        return root
    task = make_task(TASK["task"], **TASK["task_args"])
    train = task.examples("train", settings.train_size)
    texts = [e.prompt + " " + e.completion for e in train + task.examples("eval", 100)]
    tokenizers = {"word": build_word_tokenizer(texts), "char": build_char_tokenizer(texts)}
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(root / f"{name}_tokenizer")
    roles = [
        ("word_teacher", "word", settings.teacher_size, settings.teacher_steps),
        ("char_teacher", "char", settings.teacher_size, settings.teacher_steps),
        ("student_init", "word", settings.student_size, settings.student_init_steps),
    ]
    for role, vocab, (hidden, layers, heads), steps in roles:
        started = time.perf_counter()
        tokenizer = tokenizers[vocab]
        model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads)
        sft = {
            "loss": {"kind": "nll"},
            "train": {"student_data_fraction": 0.0, "batch_size": settings.sft_batch_size},
        }
        config = run_config(settings, root / f"{role}_run", steps, 0, settings.teacher_lr, sft)
        print(f"training {role} by SFT: {count_parameters(model) / 1e6:.2f}M parameters")
        Trainer(config, model, tokenizer, task, train).train()
        model.save_pretrained(root / role)
        shutil.rmtree(root / f"{role}_run", ignore_errors=True)
        print(f"  done in {time.perf_counter() - started:.0f}s")
    mark_cached(root, fingerprint)
    return root


def run_cross_tokenizer_suite(
    output_dir: Path, cache_dir: Path, seeds: int = 3, steps: int | None = None, quick: bool = False
) -> dict[str, Any]:
    """Run the suite; return what it writes to `results.json`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    settings = CrossTokenizerSettings.quick() if quick else CrossTokenizerSettings()
    root = prepare(cache_dir, settings, quick)
    steps = steps or settings.method_steps
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizers = {
        v: AutoTokenizer.from_pretrained(root / f"{v}_tokenizer") for v in ("word", "char")
    }
    nets = {v: AutoModelForCausalLM.from_pretrained(root / f"{v}_teacher") for v in tokenizers}
    student_init = AutoModelForCausalLM.from_pretrained(root / "student_init")
    task = make_task(TASK["task"], **TASK["task_args"])
    train = task.examples("train", settings.train_size)
    evals = task.examples("eval", settings.eval_prompts)
    probe = run_config(settings, output_dir, 1, 0, 1.0)

    per_seed: dict[str, list[dict[str, float]]] = {}
    for vocab, net in nets.items():
        window = settings.char_max_new_tokens if vocab == "char" else settings.max_new_tokens
        ec = dataclasses.replace(probe.eval, max_new_tokens=window)
        result = evaluate_with_config(net, tokenizers[vocab], task, evals, ec)
        per_seed[f"{vocab}-level teacher"] = [dict(result)]
    per_seed["initial student"] = [
        dict(evaluate_with_config(student_init, tokenizers["word"], task, evals, probe.eval))
    ]

    runs = [(seed, method) for seed in range(seeds) for method in METHODS]
    progress = tqdm(runs, desc="cross-tokenizer runs", dynamic_ncols=True)
    for seed, method in progress:
        progress.set_postfix_str(f"seed {seed}, {method}")
        vocab, options = METHODS[method]
        run_dir = output_dir / "runs" / f"{slug(method)}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = run_config(settings, run_dir, steps, seed, settings.method_lr, options)
        teacher: Teacher | None = None
        if vocab == "word":
            teacher = model_teacher(nets["word"], len(tokenizers["word"]))
        elif vocab == "char":
            method_name = config.loss.cross_tokenizer
            teacher = aligned_teacher(
                nets["char"], tokenizers["char"], tokenizers["word"], method_name
            )
        student = copy.deepcopy(student_init)
        trainer = Trainer(config, student, tokenizers["word"], task, train, evals, teacher=teacher)
        metrics = dict(trainer.train())
        metrics["seconds_per_step"] = trainer.train_seconds / max(1, steps)
        per_seed.setdefault(method, []).append(metrics)
        progress.write(f"seed {seed}  {method:46s} accuracy {metrics['accuracy']:.2f}")
    progress.close()
    header = {"suite": "cross-tokenizer", "steps_per_method": steps, "seeds": seeds}
    header["settings"] = dataclasses.asdict(settings)
    return report_results(output_dir, header, per_seed, METRICS, {}, [], started)
