"""Aggregate metrics over seeds and print them as a markdown table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import fmean, pstdev

Summary = dict[str, dict[str, tuple[float, float]]]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # Population std (ddof=0): a single seed gives std 0.0.
    return fmean(values), (pstdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: Mapping[str, Sequence[Mapping[str, float]]]) -> Summary:
    """Method → metric → (mean, std) over seeds, std with ddof=0 (0.0 for one seed).

    `per_seed[method]` holds one {metric: value} dict per seed. A metric missing from some
    seeds is averaged over the seeds that report it. Metric order is first appearance.
    """
    summary: Summary = {}
    for method, runs in per_seed.items():
        if len(runs) == 0:
            raise ValueError(f"no seeds for method {method!r}")
        names: dict[str, None] = {}
        for run in runs:
            names.update(dict.fromkeys(run))
        summary[method] = {
            name: _mean_std([float(run[name]) for run in runs if name in run]) for name in names
        }
    return summary


def summarise_curves(per_seed: Sequence[Mapping[int, float]]) -> dict[int, tuple[float, float]]:
    """k → (mean, std) over seeds of pass@k curves; the input for `plot_pass_at_k`."""
    if len(per_seed) == 0:
        raise ValueError("summarise_curves needs at least one seed")
    ks = sorted({k for curve in per_seed for k in curve})
    return {k: _mean_std([float(c[k]) for c in per_seed if k in c]) for k in ks}


def markdown_table(
    summary: Mapping[str, Mapping[str, tuple[float, float]]],
    metrics: Sequence[str],
    headers: Mapping[str, str] | None = None,
    digits: int = 3,
) -> str:
    """A markdown table with one row per method (insertion order) and "mean ± std" cells.

    `headers` optionally renames metric columns (and "method" for the first column);
    a metric a method lacks is shown as "–".
    """
    headers = headers or {}
    head = [headers.get("method", "method")] + [headers.get(m, m) for m in metrics]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|",
    ]
    for method, values in summary.items():
        cells = [method]
        for name in metrics:
            if name in values:
                mean, std = values[name]
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
