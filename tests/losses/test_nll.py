import math

import torch

from opdistill.losses import token_nll


def test_token_nll_matches_hand_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    values = token_nll(logits, targets)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            assert math.isclose(values[b, t].item(), log_z - row[targets[b, t]], rel_tol=1e-5)


def test_token_nll_temperature_and_cross_entropy_agree():
    torch.manual_seed(1)
    logits = torch.randn(4, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (4,))
    expected = torch.nn.functional.cross_entropy(logits / 2.0, targets, reduction="none")
    assert torch.allclose(token_nll(logits, targets, temperature=2.0), expected)


def test_token_nll_tolerates_out_of_range_pad_ids():
    logits = torch.randn(1, 2, 4)
    values = token_nll(logits, torch.tensor([[1, 99]]))
    assert torch.isfinite(values).all()
