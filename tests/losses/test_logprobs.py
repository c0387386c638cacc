"""The shared log-softmax at a temperature, its temperature check and the token gather, and the
one copy of each that the losses and teachers use."""

import inspect
import math
from pathlib import Path

import pytest
import torch

import opdistill
from opdistill import losses
from opdistill.errors import OpdistillError
from opdistill.losses import TaidSchedule, check_temperature, gather_tokens, log_softmax_at
from opdistill.teachers.context import DemonstrationContext

SOURCE = Path(opdistill.__file__).parent


def test_log_softmax_at_a_temperature_in_at_least_fp32():
    logits = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.bfloat16)
    got = log_softmax_at(logits, 2.0)
    assert got.dtype == torch.float32
    row = [x / 2.0 for x in (1.0, 2.0, 4.0)]
    norm = math.log(sum(math.exp(x) for x in row))
    assert got[0].tolist() == pytest.approx([x - norm for x in row], abs=1e-6)
    assert log_softmax_at(logits.double()).dtype == torch.float64
    assert log_softmax_at(logits.double(), dtype=torch.float32).dtype == torch.float32


def test_gather_clamps_padding_ids():
    values = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]])
    ids = torch.tensor([[2, 99]])  # 99: a padding id past the vocabulary
    assert gather_tokens(values, ids)[0].tolist() == pytest.approx([0.3, 0.6])


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_every_loss_rejects_a_bad_temperature_with_one_message(temperature):
    logits, ids = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    mask = torch.ones(1, 2)
    calls = [
        lambda: check_temperature(temperature),
        lambda: losses.token_divergence(logits, logits, "forward_kl", temperature=temperature),
        lambda: losses.token_logprobs(logits, ids, temperature=temperature),
        lambda: losses.token_nll(logits, ids, temperature=temperature),
        lambda: losses.taid_loss(logits, logits, 0.5, temperature=temperature),
        lambda: losses.minillm_loss(logits, logits, ids, mask, temperature=temperature),
    ]
    for call in calls:
        with pytest.raises(OpdistillError, match="loss temperature must be a finite number > 0"):
            call()


def test_one_copy_of_each_helper():
    """The upcast log-softmax at τ, the temperature check and clamp-and-gather live only in
    `losses.logprobs`; the dead helpers are gone."""
    helpers = SOURCE / "losses" / "logprobs.py"
    for path in SOURCE.rglob("*.py"):
        if path == helpers:
            continue
        text = path.read_text(encoding="utf-8")
        assert "loss temperature must be" not in text, path
        assert "/ temperature, dim=-1)" not in text, path
        assert ".clamp(0, " not in text, path
    assert not hasattr(losses, "divergence_from_logprobs")
    assert not hasattr(TaidSchedule, "momentum")
    assert not hasattr(DemonstrationContext, "found_fraction")
    assert "total_weight" not in inspect.signature(losses.weighted_token_mean).parameters
