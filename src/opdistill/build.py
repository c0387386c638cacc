"""From a config to a ready `Trainer`: tokenizer, models, teacher and data, every input checked
before any compute."""

from __future__ import annotations

import sys

from opdistill.batch import check_completions
from opdistill.config import Config
from opdistill.eval.monitor import check_golden
from opdistill.models.loading import check_vocabulary, load_model, load_tokenizer
from opdistill.models.lora import add_lora
from opdistill.prompts import context_window, fit_split
from opdistill.tasks import make_mixture, make_task
from opdistill.teachers import cross_tokenizer_teacher, open_teacher
from opdistill.trainer import Trainer


def build_trainer(config: Config) -> Trainer:
    """Load tokenizer, models and task data named by `config` and return a ready `Trainer`."""
    mc, dc = config.model, config.data
    # cheap checks first, before loading weights
    task = make_mixture(dc.mix) if dc.mix else make_task(dc.task, **dc.task_args)
    check_golden(config.eval, task)
    tokenizer = load_tokenizer(mc.tokenizer or mc.student)
    teacher = open_teacher(config, tokenizer)  # served or cached: no teacher weights here
    student = load_model(mc.student, mc.dtype)
    check_vocabulary(student, tokenizer, "model.student")
    if mc.lora.r > 0:
        student = add_lora(student, mc.lora)
    teacher_model = None
    if mc.teacher and teacher is None:
        teacher_tokenizer = load_tokenizer(mc.teacher) if mc.tokenizer is None else tokenizer
        teacher = cross_tokenizer_teacher(config, teacher_tokenizer, tokenizer)  # None: same
    if mc.teacher and teacher is None:
        teacher_model = load_model(mc.teacher, mc.dtype)
        check_vocabulary(teacher_model, tokenizer, "model.teacher")
    window = context_window(student, teacher_model)
    if teacher is not None and teacher.context_window:  # prompts fitted as the teacher's were
        window = min(window or teacher.context_window, teacher.context_window)
    fits = {
        split: fit_split(
            dc,
            tokenizer,
            window,
            task.examples(split, size, seed=dc.seed) if size or split == "train" else [],
            split,
            max_new_tokens,
        )
        for split, size, max_new_tokens in (
            ("train", dc.train_size, config.train.max_new_tokens),
            ("eval", dc.eval_size, config.eval.max_new_tokens),
        )
    }
    if config.train.student_data_fraction < 1 and config.train.off_policy_source == "dataset":
        check_completions(fits["train"].examples)  # every row an off-policy batch may draw
    for split, fit in fits.items():
        if fit.too_long:
            print(f"opdistill: {fit.summary(split)}", file=sys.stderr)
    data_report = {
        f"{split}_{name}": float(value)
        for split, fit in fits.items()
        for name, value in (("prompts", fit.total), ("long_prompts", fit.too_long))
    }
    return Trainer(
        config,
        student,
        tokenizer,
        task,
        fits["train"].examples,
        fits["eval"].examples,
        teacher_model=teacher_model,
        teacher=teacher,
        data_report=data_report,
    )
