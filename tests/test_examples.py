"""The Python example scripts run, and do what they say."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_loop_lowers_the_divergence(capsys):
    history = _load("plain_pytorch_loop").main(["--steps", "12", "--batch-size", "4"])
    assert len(history) == 12
    assert sum(history[-3:]) / 3 < history[0]
    assert "JSD(β=0.5) per token" in capsys.readouterr().out
