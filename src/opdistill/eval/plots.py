"""pass@k curves and learning curves as PNGs (matplotlib, Agg canvas; no global pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

PassAtKCurves = Mapping[str, Mapping[int, tuple[float, float] | float]]


def _mean_std(value: tuple[float, float] | float) -> tuple[float, float | None]:
    if isinstance(value, tuple | list):
        mean, std = value
        return float(mean), float(std)
    return float(value), None


def plot_pass_at_k(
    curves: PassAtKCurves,
    path: str | Path,
    title: str = "pass@k",
    dpi: int = 120,
    dashed: Sequence[str] = (),
) -> Path:
    """Plot one pass@k line per method on a log2 k axis and save it as a PNG at `path`.

    `curves` maps method → k → (mean, std); a ±std band is shaded around each line.
    A bare float instead of (mean, std) plots the mean without a band. Methods named in `dashed`
    (reference rows such as the teacher) are drawn with dashed lines.
    Parent folders are created. Returns the path written.
    """
    if not curves:
        raise ValueError("plot_pass_at_k needs at least one curve")
    # Imported here so that `import opdistill.eval` does not pay for matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    crowded = len(curves) > 6  # legend beside the axes, and a palette of 20 colours
    fig = Figure(figsize=(9.5 if crowded else 6.0, 4.5 if crowded else 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if crowded:
        from matplotlib import colormaps

        ax.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
    all_ks: set[int] = set()
    for method, curve in curves.items():
        ks = sorted(curve)
        if not ks:
            raise ValueError(f"curve for {method!r} is empty")
        if ks[0] < 1:
            raise ValueError(f"curve for {method!r} has k < 1: {ks[0]}")
        all_ks.update(ks)
        points = [_mean_std(curve[k]) for k in ks]
        means = [m for m, _ in points]
        style = "--" if method in dashed else "-"
        dense = len(ks) > 12  # a full 1..n curve: markers at powers of two only
        marked = [i for i, k in enumerate(ks) if not dense or k & (k - 1) == 0 or k == ks[-1]]
        (line,) = ax.plot(
            ks, means, style, marker="o", markersize=3, markevery=marked, label=method
        )
        stds = [s for _, s in points if s is not None]
        if len(stds) == len(points):
            lo = [max(0.0, m - s) for m, s in zip(means, stds, strict=True)]
            hi = [min(1.0, m + s) for m, s in zip(means, stds, strict=True)]
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    ticks = sorted(all_ks)
    if len(ticks) > 12:  # label powers of two (and the largest k), not every k
        ticks = sorted({k for k in ticks if k & (k - 1) == 0} | {ticks[0], ticks[-1]})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{round(x):d}"))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 1:
        ax.set_xlim(ticks[0] / math.sqrt(2), ticks[-1] * math.sqrt(2))
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if crowded:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    fig.clear()
    return out


def plot_learning_curves(
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    path: str | Path,
    metric: str,
    x_label: str = "step",
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """One line per method of (x, mean, std) points with a ±std band; saved as a PNG at `path`
    (parent folders created). Returns the path written."""
    if not curves or any(not points for points in curves.values()):
        raise ValueError("plot_learning_curves needs at least one non-empty curve")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    crowded = len(curves) > 6
    fig = Figure(figsize=(9.5 if crowded else 6.0, 4.5 if crowded else 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if crowded:
        from matplotlib import colormaps

        ax.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
    for method, points in curves.items():
        xs, means, stds = zip(*points, strict=True)
        (line,) = ax.plot(xs, means, "-", marker="o", markersize=3, label=method)
        if any(stds):
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} during training")
    ax.grid(True, alpha=0.3)
    if crowded:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    fig.clear()
    return out
