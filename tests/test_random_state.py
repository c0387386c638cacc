"""Random state: every process seeded apart, every device's generators saved, restored and left
alone by evaluation."""

import random

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed

from opdistill import checkpoint
from opdistill.checkpoint import RandomState, forked_rng
from opdistill.eval.evaluate import evaluate
from opdistill.models.loading import tiny_llama


class FakeCuda:
    """One CUDA device's generator state, as torch.cuda's RNG functions see it (CPU runs)."""

    def __init__(self, monkeypatch):
        self.state = torch.tensor([7], dtype=torch.uint8)
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: 1)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.state.clone())
        monkeypatch.setattr(cuda, "set_rng_state", lambda state, device="cuda": self._set(state))
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.state.clone()])
        monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: self._set(states[0]))
        monkeypatch.setattr(cuda, "manual_seed_all", lambda seed: self._set(torch.tensor([seed])))
        monkeypatch.setattr(cuda, "manual_seed", lambda seed: self._set(torch.tensor([seed])))

    def _set(self, state):
        self.state = state.to(torch.uint8).clone()


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_each_process_is_seeded_apart_and_one_process_as_before():
    set_seed(5)
    single = draws()
    RandomState.seed(5, 0)
    assert draws() == single
    RandomState.seed(5, 1)
    other = draws()
    assert all(a != b for a, b in zip(single, other, strict=True))


def test_the_state_is_plain_data_and_round_trips(tmp_path):
    coin, generator = random.Random(3), torch.Generator().manual_seed(4)
    state = RandomState({"coin": coin, "token_generator": generator})
    saved = state.state_dict()
    torch.save(saved, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # ints, lists, tensors only
    expected = draws(), coin.random(), torch.rand(2, generator=generator).tolist()
    state.load_state_dict(loaded)
    assert (draws(), coin.random(), torch.rand(2, generator=generator).tolist()) == expected


def test_every_cuda_generator_is_saved_and_restored(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    state = RandomState()
    saved = state.state_dict()
    assert [s.tolist() for s in saved["processes"][0]["cuda"]] == [[7]]
    cuda.state = torch.tensor([9], dtype=torch.uint8)
    state.load_state_dict(saved)
    assert cuda.state.tolist() == [7]


def test_each_process_restores_its_own_state(monkeypatch):
    RandomState.seed(0, 1)
    other = RandomState(process_index=1, num_processes=2).local_state()
    expected_other = torch.rand(3).tolist()
    RandomState.seed(0, 0)
    main = RandomState(process_index=0, num_processes=2)
    monkeypatch.setattr(checkpoint, "gather_object", lambda states: [*states, other])
    main.gather()  # on every process before the main process saves
    saved = main.state_dict()
    assert len(saved["processes"]) == 2
    torch.manual_seed(123)
    RandomState(process_index=1, num_processes=2).load_state_dict(saved)
    assert torch.rand(3).tolist() == expected_other
    with pytest.warns(UserWarning, match="random state of 2 processes and this run has 1"):
        RandomState().load_state_dict(saved)


def test_forked_rng_restores_the_cuda_generators(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    with forked_rng():
        torch.manual_seed(42)
        assert cuda.state.tolist() == [42]
    assert cuda.state.tolist() == [7]


def test_evaluation_leaves_every_devices_generator_alone(monkeypatch, tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    examples = graph_task.examples("eval", 2)
    cuda = FakeCuda(monkeypatch)
    cpu = torch.get_rng_state()
    evaluate(model, tokenizer, graph_task, examples, num_samples=2, ks=(1,), max_new_tokens=3)
    assert cuda.state.tolist() == [7]
    assert torch.equal(torch.get_rng_state(), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_on_a_gpu_leaves_its_generator_alone(tokenizer, graph_task):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2).cuda()
    before = torch.cuda.get_rng_state_all()
    evaluate(model, tokenizer, graph_task, graph_task.examples("eval", 2), 2, (1,), 1.0, 3)
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
