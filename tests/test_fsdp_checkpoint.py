"""FSDP2 checkpoints (2 CPU processes over gloo): sharded through accelerate, killed, resumed."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opdistill.checkpoint import ACCELERATE_DIR, COMPLETE, MODEL_DIR, Checkpoints
from opdistill.errors import OpdistillError
from opdistill.models.loading import load_model
from opdistill.unpickling import check_loadable
from test_distributed import data_file, train_records, write_config  # noqa: F401 (fixture)
from test_fsdp import LAUNCH, ROOT, launch

STEPS = 8
SAVE_EVERY = 2


def launch_env(tmp_path):
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_config(tmp_path, saved_pair, data_file, name):  # noqa: F811
    """On-policy GKD (JSD, λ = 1) with a checkpoint every SAVE_EVERY steps."""
    return write_config(
        tmp_path / f"{name}.yaml",
        saved_pair,
        data_file,
        tmp_path / name,
        "jsd",
        steps=STEPS,
        save_every=SAVE_EVERY,
        keep_checkpoints=0,
        student_data_fraction=1.0,
    )


def descendants(pid):
    """The processes started by `pid`, and theirs (the launcher's workers: own sessions)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            found += [child, *descendants(child)]
    return found


def kill_after_first_checkpoint(tmp_path, config, checkpoints):
    """Start the 2-process run and SIGKILL every process once the first checkpoint is complete."""
    process = subprocess.Popen(
        [*LAUNCH, "-m", "opdistill.cli", "train", str(config)],
        env=launch_env(tmp_path),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = checkpoints / f"step-{SAVE_EVERY:08d}" / COMPLETE
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    finished = process.poll() is not None
    workers = descendants(process.pid)
    for pid in [*workers, process.pid]:  # workers first: they would outlive the launcher
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.01)  # reaped once the launcher is gone
    assert not finished, "the run ended before its first checkpoint was complete"
    assert len(workers) >= 2


@pytest.mark.slow
def test_fsdp2_checkpoints_are_sharded_and_resume_after_sigkill(tmp_path, saved_pair, data_file):  # noqa: F811
    straight = run_config(tmp_path, saved_pair, data_file, "straight")
    result = launch(tmp_path, "-m", "opdistill.cli", "train", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = run_config(tmp_path, saved_pair, data_file, "killed")
    checkpoints = tmp_path / "killed" / "checkpoints"
    kill_after_first_checkpoint(tmp_path, killed, checkpoints)
    assert not (tmp_path / "killed" / "final").exists()
    complete = Checkpoints(checkpoints).complete()
    assert complete and len(complete) < STEPS // SAVE_EVERY  # killed before the last one

    # The layout: accelerate's sharded state (one DCP file per process) beside our plain state.
    first = complete[0]
    sharded = first / ACCELERATE_DIR
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (sharded / part).iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    assert (sharded / "random_states_0.pkl").exists() and (sharded / "random_states_1.pkl").exists()
    assert not (first / MODEL_DIR).exists()
    marker = json.loads((first / COMPLETE).read_text())
    assert f"{ACCELERATE_DIR}/pytorch_model_fsdp_0/__1_0.distcp" in marker["sha256"]
    assert f"{ACCELERATE_DIR}/optimizer_0/.metadata" in marker["sha256"]
    saved = json.loads((first / "trainer_state.json").read_text())
    assert saved["launch"] == {"distributed_type": "FSDP", "num_processes": 2}
    assert "optimizer" not in saved and "scheduler" not in saved  # accelerate holds them
    check_loadable(sharded)  # nothing in it needs code to unpickle

    # An unsharded (single-process) resume of a sharded checkpoint is refused in one line.
    student = load_model(str(saved_pair / "student"), "float32")
    with pytest.raises(OpdistillError, match="sharded state of 2 FSDP processes"):
        Checkpoints(checkpoints).restore_latest(student, {})

    # A newer checkpoint with a flipped byte in one process's shard is skipped with a warning.
    newest = complete[-1]
    flipped = checkpoints / f"step-{int(newest.name[5:]) + 1:08d}"
    shutil.copytree(newest, flipped)
    shard = flipped / ACCELERATE_DIR / "pytorch_model_fsdp_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))

    result = launch(tmp_path, "-m", "opdistill.cli", "train", str(killed), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{flipped.name} is unreadable (ChecksumMismatch" in result.stderr
    resumed_from = json.loads((tmp_path / "killed" / "resumes.jsonl").read_text())["step"]
    assert resumed_from == int(newest.name[5:])  # the newest checkpoint the killed run wrote
    assert [r["step"] for r in train_records(tmp_path / "killed")] == list(range(1, STEPS + 1))
    expected = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    initial = load_file(saved_pair / "student" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert any(not torch.equal(expected[k], initial[k]) for k in initial)
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name  # bitwise

    # final/ is a full, unsharded model that one process loads.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "final")
    for name, tensor in model.state_dict().items():
        if name in resumed:
            assert torch.equal(tensor, resumed[name]), name
