"""Checkpoints hold no pickle, refuse one that needs unpickling, and check their checksums."""

import json
import os
import random

import numpy as np
import pytest
import torch

from opdistill.checkpoint import (
    COMPLETE,
    PICKLED_STATE_FILE,
    STATE_FILE,
    STATE_TENSORS,
    Checkpoints,
    RandomState,
    check_same_launch,
    checksums,
    from_plain,
    to_plain,
)
from opdistill.errors import OpdistillError
from opdistill.models.loading import tiny_llama


class RunsACommand:
    """What an attacker adds to a checkpoint: unpickling it runs code."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


class Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)


def test_plain_state_round_trip():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),  # integer keys, tuples (betas), tensors
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "nested": {"__odd": [1, (2.5, None)], "x": float("inf")},
    }
    tensors = {}
    plain = to_plain(state, tensors)
    restored = from_plain(json.loads(json.dumps(plain)), tensors)
    assert restored["python"] == state["python"]
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(
        restored["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )
    np.random.set_state(restored["numpy"])  # a valid NumPy state again
    assert restored["nested"] == state["nested"]
    with pytest.raises(TypeError, match="cannot be stored"):
        to_plain({"obj": object()}, {})


def test_checkpoint_holds_no_pickle_and_records_checksums(tmp_path, model, tokenizer):
    path = Checkpoints(tmp_path).save(1, model, tokenizer, {"rng": RandomState(), "n": Counter(3)})
    assert (path / STATE_FILE).exists() and (path / STATE_TENSORS).exists()
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.bin"))
    marker = json.loads((path / COMPLETE).read_text())
    assert marker["step"] == 1 and marker["sha256"] == checksums(path)
    counter = Counter()
    assert Checkpoints(tmp_path).restore_latest(model, {"n": counter})[1] == 1
    assert counter.value == 3


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path, model, tokenizer):
    path = Checkpoints(tmp_path).save(1, model, tokenizer, {"n": Counter(1)})
    proof = tmp_path / "code-ran"
    (path / STATE_FILE).unlink()
    torch.save({"step": 1, "n": {"value": RunsACommand(proof)}}, path / PICKLED_STATE_FILE)
    marker = {"step": 1, "sha256": checksums(path)}  # whoever edits the run can fix checksums
    (path / COMPLETE).write_text(json.dumps(marker))
    with pytest.raises(OpdistillError, match="refusing to load it") as error:
        Checkpoints(tmp_path).restore_latest(model, {"n": Counter()})
    assert "\n" not in str(error.value)
    assert not proof.exists()


def test_old_pickled_state_of_plain_data_still_loads(tmp_path, model, tokenizer):
    path = Checkpoints(tmp_path).save(2, model, tokenizer, {"n": Counter(5)})
    (path / STATE_FILE).unlink()
    torch.save({"step": 2, "n": {"value": 5}}, path / PICKLED_STATE_FILE)
    (path / COMPLETE).write_text("2")  # the old marker: a bare step
    counter = Counter()
    assert Checkpoints(tmp_path).restore_latest(model, {"n": counter})[1] == 2
    assert counter.value == 5


def test_a_bit_flip_in_a_tensor_file_falls_back_with_a_warning(tmp_path, model, tokenizer):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, model, tokenizer, {"n": Counter(1)})
    newest = checkpoints.save(2, model, tokenizer, {"n": Counter(2)})
    weights = newest / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # still a valid safetensors file, one weight differs
    weights.write_bytes(bytes(data))
    counter = Counter()
    with pytest.warns(UserWarning, match="differs from its checksum"):
        path, step = checkpoints.restore_latest(model, {"n": counter})
    assert path.name == "step-00000001"
    assert step == 1 and counter.value == 1


def test_another_architecture_is_a_one_line_error(tmp_path, model, tokenizer):
    Checkpoints(tmp_path).save(1, model, tokenizer, {})
    wider = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    with pytest.raises(OpdistillError, match="does not match the student model") as error:
        Checkpoints(tmp_path).restore_latest(wider, {})
    assert "\n" not in str(error.value)


def test_a_sharded_checkpoint_resumes_only_in_the_launch_that_wrote_it(tmp_path):
    fsdp2 = {"distributed_type": "FSDP", "num_processes": 2}
    check_same_launch(tmp_path, fsdp2, dict(fsdp2))
    check_same_launch(tmp_path, None, None)
    with pytest.raises(OpdistillError, match="2 FSDP processes and this launch needs the sharded "):
        check_same_launch(tmp_path, fsdp2, {**fsdp2, "num_processes": 4})
    with pytest.raises(OpdistillError, match=r"holds unsharded state .* needs the sharded state"):
        check_same_launch(tmp_path, None, fsdp2)
