"""Measured experiments, each runnable from the CLI and written against the public API.

- `demo`: the embedded default (`opdistill demo`) and the objectives suite (`--suite objectives`);
- `self_distill`: self-distillation's diversity cost (`opdistill demo --suite self-distill`);
- `diagnose`: why on-policy objectives lose accuracy on a demo task (`opdistill experiment
  diagnose`);
- `teacher_hacking`: distillation from an imperfect teacher, watched by the golden metrics
  (`opdistill experiment teacher-hacking`);
- `smollm2`: distillation with a real pretrained model (`opdistill experiment smollm2`).
"""

from __future__ import annotations

import importlib

# name → (module whose `main(argv) -> int` runs it, one-line summary)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "diagnose": (
        "opdistill.experiments.diagnose",
        "learning curves, golden metrics, teacher recovery from student prefixes and truncation "
        "for the demo's methods",
    ),
    "teacher-hacking": (
        "opdistill.experiments.teacher_hacking",
        "distillation from a teacher trained on a skewed subset of paths, with the golden "
        "metrics and the teacher-hacking flag",
    ),
    "smollm2": (
        "opdistill.experiments.smollm2",
        "SFT, supervised KD, on-policy GKD and self-distillation of SmolLM2-135M",
    ),
}


def run_experiment(name: str, argv: list[str]) -> int:
    """Run experiment `name` with its command-line options `argv`; return its exit code."""
    module, _ = EXPERIMENTS[name]
    return importlib.import_module(module).main(list(argv))
