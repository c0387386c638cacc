"""accelerate's and torch distributed checkpoint's pickles are read without running code first."""

import pickle
import random
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from opdistill.errors import OpdistillError
from opdistill.unpickling import check_loadable, read_dcp_index
from test_checkpoint import RunsACommand


def save_dcp(directory, extra=None):
    """A one-process torch distributed checkpoint shaped like accelerate's optimizer state."""
    state = {
        "optimizer": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["w"], "fused": None}],
            **(extra or {}),
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: saved as a single process
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory))
    return directory


def test_a_plain_save_state_directory_is_loadable(tmp_path):
    save_dcp(tmp_path / "optimizer_0")
    rng = {
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    torch.save(rng, tmp_path / "random_states_0.pkl")  # as accelerate writes them
    torch.save({"last_epoch": 3, "lr_lambdas": [None]}, tmp_path / "scheduler.bin")
    check_loadable(tmp_path)
    index = read_dcp_index(tmp_path / "optimizer_0")
    assert "optimizer.state.w.exp_avg" in index.state_dict_metadata


def test_a_value_that_runs_code_is_refused_before_loading(tmp_path):
    proof = tmp_path / "code-ran"
    save_dcp(tmp_path / "optimizer_0", {"planted": RunsACommand(proof)})
    with pytest.raises(OpdistillError, match="planted as a Python object"):
        check_loadable(tmp_path)
    assert not proof.exists()


def test_an_index_that_runs_code_is_refused(tmp_path):
    proof = tmp_path / "code-ran"
    directory = save_dcp(tmp_path / "pytorch_model_fsdp_0")
    (directory / ".metadata").write_bytes(pickle.dumps(RunsACommand(proof)))
    with pytest.raises(OpdistillError, match=r"\.metadata holds Python objects"):
        check_loadable(tmp_path)
    assert not proof.exists()


def test_a_torch_save_file_that_runs_code_is_refused(tmp_path):
    proof = tmp_path / "code-ran"
    torch.save({"x": RunsACommand(proof)}, tmp_path / "random_states_1.pkl")
    with pytest.raises(OpdistillError, match=r"random_states_1\.pkl holds Python objects"):
        check_loadable(tmp_path)
    assert not proof.exists()


def test_deepspeed_optimizer_state_is_loadable_and_nothing_more(tmp_path):
    """DeepSpeed's ZeRO files hold its loss scaler and stage enum: allowed, nothing else is."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients}
    shards = tmp_path / "pytorch_model"
    shards.mkdir()
    optimizer_file = shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": state}, optimizer_file)
    check_loadable(tmp_path)
    proof = tmp_path / "code-ran"
    torch.save({"x": RunsACommand(proof)}, shards / "mp_rank_00_model_states.pt")
    with pytest.raises(OpdistillError, match=r"model_states\.pt holds Python objects"):
        check_loadable(tmp_path)
    assert not proof.exists()
