"""Learning curves from run directories: a metric of the evaluation records against the step or
the seconds, averaged over the seeds of each method.

Runs are grouped by directory name without its "-seed<N>" suffix (the demo's layout:
`runs/graph/sft-seed0`, `runs/graph/sft-seed1`, ... form the group "sft"). At each step the
group's curve is the mean ± std (ddof=0) over the seeds that evaluated at that step; its x is
the step, or the mean of the seeds' seconds there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean, pstdev

from opdistill.errors import OpdistillError

X_AXES = {"step": "step", "seconds": "train_seconds", "wall_seconds": "wall_seconds"}
X_LABELS = {
    "step": "optimizer step",
    "seconds": "training seconds (optimizer steps only)",
    "wall_seconds": "wall-clock seconds (with evaluations)",
}
_SEED_SUFFIX = re.compile(r"-seed\d+$")

Curve = list[tuple[float, float, float]]  # (x, mean, std) in step order


def read_records(run_dir: Path, split: str = "eval") -> list[dict]:
    """The records of `split` in `run_dir/metrics.jsonl`, in file order (torn lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise OpdistillError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("split") == split:
            records.append(record)
    return records


def group_name(run_dir: Path) -> str:
    """The method a run belongs to: its directory name without a "-seed<N>" suffix."""
    return _SEED_SUFFIX.sub("", Path(run_dir).resolve().name)


def run_curve(run_dir: Path, metric: str, x: str = "step", split: str = "eval") -> dict:
    """{step: (x value, metric value)} of one run (the last record of a step wins)."""
    if x not in X_AXES:
        raise OpdistillError(f"--x {x!r}: must be one of {', '.join(X_AXES)}")
    records = read_records(run_dir, split)
    if not records:
        raise OpdistillError(f"{run_dir}: metrics.jsonl has no {split!r} records")
    points = {}
    for record in records:
        if metric in record and X_AXES[x] in record:
            points[int(record["step"])] = (float(record[X_AXES[x]]), float(record[metric]))
    if not points:
        names = sorted({k for r in records for k in r} - {"step", "split"})
        missing = X_AXES[x] if any(metric in r for r in records) else metric
        raise OpdistillError(
            f"{run_dir}: no {split!r} record has {missing!r} (recorded: {', '.join(names)})"
        )
    return points


def learning_curves(
    run_dirs: Sequence[Path], metric: str, x: str = "step", split: str = "eval", group: bool = True
) -> dict[str, Curve]:
    """Method (or run name, without `group`) → its curve, in the order the runs are given."""
    runs: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        name = group_name(run_dir) if group else Path(run_dir).resolve().name
        runs.setdefault(name, []).append(run_curve(Path(run_dir), metric, x, split))
    curves = {}
    for name, seeds in runs.items():
        steps = sorted({step for seed in seeds for step in seed})
        curve = []
        for step in steps:
            points = [seed[step] for seed in seeds if step in seed]
            ys = [y for _, y in points]
            spread = pstdev(ys) if len(ys) > 1 else 0.0
            curve.append((fmean(xv for xv, _ in points), fmean(ys), spread))
        curves[name] = curve
    return curves
