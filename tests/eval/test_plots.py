"""Tests for opdistill.eval.plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from opdistill.eval import plot_pass_at_k

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_pass_at_k_writes_readable_png(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    curves = {
        "sft": {1: (0.30, 0.02), 2: (0.42, 0.03), 4: (0.55, 0.03), 8: (0.66, 0.04)},
        "gkd": {1: (0.40, 0.01), 2: (0.50, 0.02), 4: (0.58, 0.02), 8: (0.64, 0.05)},
        "teacher": {1: 0.6, 2: 0.7, 4: 0.78, 8: 0.84},  # mean only: no band
    }
    out = plot_pass_at_k(curves, tmp_path / "sub" / "pass_at_k.png", title="graph task")
    assert out == tmp_path / "sub" / "pass_at_k.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1024
    image = mpimg.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_pass_at_k_single_k(tmp_path: Path) -> None:
    out = plot_pass_at_k({"a": {1: (0.5, 0.1)}}, tmp_path / "one.png", title="t")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_pass_at_k_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_pass_at_k({}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError):
        plot_pass_at_k({"a": {}}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError):
        plot_pass_at_k({"a": {0: (0.1, 0.0)}}, tmp_path / "x.png", title="t")


def test_plot_draws_reference_methods_dashed(tmp_path):
    curves = {"teacher": {1: 0.9, 2: 1.0}, "student": {1: (0.4, 0.1), 2: (0.6, 0.1)}}
    path = plot_pass_at_k(curves, tmp_path / "p.png", dashed=("teacher",))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_curves_plot_with_power_of_two_ticks(tmp_path):
    curve = {k: (1 - 0.5**k, 0.01) for k in range(1, 65)}
    path = plot_pass_at_k(
        {"a": curve, "b": {k: v * 0.9 for k, (v, _) in curve.items()}}, tmp_path / "full.png"
    )
    assert path.stat().st_size > 1000
