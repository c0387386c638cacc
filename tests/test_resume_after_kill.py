"""A training process killed with SIGKILL resumes to the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def train_command(config, *extra):
    return [sys.executable, "-m", "opdistill.cli", "train", str(config), *extra]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, saved_pair):
    def write_config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"""
model: {{student: {saved_pair / "student"}, teacher: {saved_pair / "teacher"}}}
data: {{task: graph, task_args: {{num_nodes: 8, max_paths: 3}}, train_size: 200, eval_size: 0}}
loss: {{kind: jsd, beta: 0.9}}
train: {{steps: 60, batch_size: 4, student_data_fraction: 0.5, max_new_tokens: 5, lr: 1.0e-3,
         save_every: 10, keep_checkpoints: 0, output_dir: {tmp_path / name}, progress: false}}
""")
        return path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    straight = write_config("straight")
    subprocess.run(train_command(straight), check=True, env=env, capture_output=True)

    killed = write_config("killed")
    process = subprocess.Popen(
        train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = tmp_path / "killed" / "checkpoints" / "step-00000010" / "COMPLETE"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()

    subprocess.run(train_command(killed, "--resume"), check=True, env=env, capture_output=True)
    expected = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
