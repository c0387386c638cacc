"""Smoke run of the step-memory benchmark at tiny sizes (its numbers mean nothing there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_step_memory_benchmark_runs_and_checks_the_losses(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("psutil")
    output = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        *(sys.executable, str(ROOT / "benchmarks" / "step_memory.py"), "--quick"),
        *("--steps", "1", "--threads", "1", "--json", str(output)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(output.read_text())
    assert result["loss_agreement"]["ok"] and result["same_prompts"]
    for tool in ("opdistill", "opdistill-full-logits", "trl"):
        assert result[tool]["step_peak_mib"] > 0
        assert len(result[tool]["step_peaks_mib"]) == 2  # warm-up and the measured step
        assert result[tool]["method"]
    assert result["opdistill"]["peak_ratio"] is not None
    phases = result["opdistill"]["phase_peaks_mib"][-1]  # the measured step's, per phase
    assert {"generation", "teacher", "forward_backward", "forward_backward#2"} <= set(phases)
    assert max(phases.values()) <= result["opdistill"]["step_peak_mib"]


@pytest.mark.slow
def test_step_benchmark_pipelined_rollouts_still_check_the_losses(tmp_path):
    """vs_trl_step with --rollout hf_static --max-staleness 1: the same prompts reach both
    tools and the losses on the fixed batch agree."""
    pytest.importorskip("trl")
    output = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        *(sys.executable, str(ROOT / "benchmarks" / "vs_trl_step.py"), "--quick"),
        *("--rollout", "hf_static", "--max-staleness", "1", "--threads", "1"),
        *("--json", str(output)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(output.read_text())
    assert result["loss_agreement"]["ok"] and result["same_prompts"]
    assert "rollout.backend=hf_static, train.max_staleness=1" in result["opdistill"]["settings"]
