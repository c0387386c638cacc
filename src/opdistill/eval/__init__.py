"""Evaluation: pass@k and diversity metrics, golden metrics and the teacher-hacking monitor,
pass@k and learning-curve plots, and seed-aggregated reports."""

from __future__ import annotations

from opdistill.eval.curves import X_LABELS, learning_curves, read_records
from opdistill.eval.diagnostics import (
    Sample,
    continue_greedily,
    divergence_report,
    length_report,
    prefix_recovery,
    sample_responses,
)
from opdistill.eval.diversity import (
    load_embedding_model,
    mean_self_bleu,
    mean_semantic_diversity,
    pairwise_cosine_distance,
    self_bleu,
    semantic_diversity_per_prompt,
)
from opdistill.eval.evaluate import EvalMetrics, curve_ks, evaluate, evaluate_with_config
from opdistill.eval.golden import golden_metrics, kl_to_golden, response_logprobs
from opdistill.eval.metrics import (
    avg_at_k,
    distinct_correct,
    distinct_n,
    mean_distinct_correct,
    pass_at_k,
    pass_at_k_curve,
)
from opdistill.eval.monitor import EvalRecords, TeacherHackingMonitor, is_teacher_hacking
from opdistill.eval.plots import plot_learning_curves, plot_pass_at_k
from opdistill.eval.report import markdown_table, summarise, summarise_curves

__all__ = [
    "X_LABELS",
    "EvalMetrics",
    "EvalRecords",
    "Sample",
    "TeacherHackingMonitor",
    "avg_at_k",
    "continue_greedily",
    "curve_ks",
    "distinct_correct",
    "distinct_n",
    "divergence_report",
    "evaluate",
    "evaluate_with_config",
    "golden_metrics",
    "is_teacher_hacking",
    "kl_to_golden",
    "learning_curves",
    "length_report",
    "load_embedding_model",
    "markdown_table",
    "mean_distinct_correct",
    "mean_self_bleu",
    "mean_semantic_diversity",
    "pairwise_cosine_distance",
    "pass_at_k",
    "pass_at_k_curve",
    "plot_learning_curves",
    "plot_pass_at_k",
    "prefix_recovery",
    "read_records",
    "response_logprobs",
    "sample_responses",
    "self_bleu",
    "semantic_diversity_per_prompt",
    "summarise",
    "summarise_curves",
]
