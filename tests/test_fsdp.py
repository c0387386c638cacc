"""FSDP2 over gloo on CPU: sharded on-policy GKD matches one process; generation stays in step."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from opdistill.cli import main
from opdistill.distributed import shard_on_cpu as _shard_on_cpu
from opdistill.errors import OpdistillError
from test_distributed import data_file, train_records, write_config  # noqa: F401 (fixture)

ROOT = Path(__file__).parents[1]
FSDP2_CPU = ROOT / "examples" / "accelerate" / "fsdp2_cpu.yaml"
LAUNCH = [
    *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CPU)),
    *("--main_process_port", "0"),
]


def launch(tmp_path, *command):
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [*LAUNCH, *command], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_fsdp_version_1_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    accelerator = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    with pytest.raises(OpdistillError, match="fsdp_version: 1 on CPU"):
        _shard_on_cpu(accelerator)


def test_other_launches_are_left_to_accelerate(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    _shard_on_cpu(SimpleNamespace(state=state))
    assert state.distributed_type == DistributedType.MULTI_GPU
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    _shard_on_cpu(SimpleNamespace(state=state))
    assert state.distributed_type == DistributedType.MULTI_CPU


@pytest.mark.slow
def test_fsdp2_on_policy_gkd_matches_one_process(tmp_path, saved_pair, data_file):  # noqa: F811
    """JSD on student rollouts (λ = 1), 2 FSDP2 processes × batch 2 against 1 process × batch 4.

    A sampling temperature of 1e-3 makes the rollouts the same whatever the process split.
    """
    sharded = tmp_path / "fsdp"
    config = write_config(
        tmp_path / "run.yaml",
        saved_pair,
        data_file,
        sharded,
        "jsd",
        steps=3,
        temperature=1e-3,
        student_data_fraction=1.0,
    )
    result = launch(tmp_path, "-m", "opdistill.cli", "train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    records_two = train_records(sharded)
    assert [r["step"] for r in records_two] == [1, 2, 3]

    one = tmp_path / "one"
    overrides = ["train.batch_size=4", f"train.output_dir={one}"]
    assert main(["train", str(config), *(f"--set={o}" for o in overrides)]) == 0
    for a, b in zip(records_two, train_records(one), strict=True):
        assert a["on_policy_fraction"] == b["on_policy_fraction"] == 1.0
        assert a["tokens_per_step"] == b["tokens_per_step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-7)
    weights_two = load_file(sharded / "final" / "model.safetensors")  # gathered, full shapes
    weights_one = load_file(one / "final" / "model.safetensors")
    initial = load_file(saved_pair / "student" / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    assert any(not torch.equal(weights_two[k], initial[k]) for k in initial)
    for name, tensor in weights_two.items():
        torch.testing.assert_close(tensor, weights_one[name], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fsdp2_generation_does_not_deadlock_at_unequal_lengths(tmp_path, saved_pair):
    """Rank 0's responses end at the first token, rank 1's run to the limit: rank 0 keeps
    running forward passes (synced generation) until rank 1 is done."""
    result = launch(
        tmp_path, str(ROOT / "tests" / "fsdp_generation.py"), str(saved_pair / "student")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank="))
    assert len(lines) == 2
    fields = [dict(item.split("=", 1) for item in line.split(" ")) for line in lines]
    for rank in fields:
        assert rank["type"] == "FSDP" and rank["synced"] == "True"
        assert rank["sharded"] == "True"  # parameters are DTensor shards
    assert fields[0]["lengths"] == "1,1"
    assert fields[1]["lengths"] == "6,6"
    assert fields[0]["forwards"] == fields[1]["forwards"]  # the same number of forward passes
    assert int(fields[1]["forwards"]) >= 6
