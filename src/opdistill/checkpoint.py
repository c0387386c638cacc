"""Training state on disk: written atomically, the newest N kept, torn or unreadable ones skipped.

A checkpoint `step-NNNNNNNN/` holds

    model/              the student (`save_pretrained`; a LoRA student: its adapters) + tokenizer
    trainer_state.pt    {name: state_dict()} of every stateful object (optimizer, schedules,
                        data position, RNGs, ...)
    NAME.safetensors    the weights of each extra network (a frozen or EMA teacher copy, ...)
    COMPLETE            written last; a directory without it is torn and never read

It is written as `step-NNNNNNNN.tmp`, flushed to disk, marked complete and renamed into place.
This module knows nothing of the trainer: it takes a directory, the student, and named objects
with `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.errors import OpdistillError
from opdistill.files import fsync_tree
from opdistill.models.lora import is_lora, load_adapter_weights, weights_file

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomState:
    """The global RNGs (Python, NumPy, torch) and named private generators, as one state."""

    def __init__(self, **generators: random.Random | torch.Generator):
        self.generators = generators

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "generators": {
                name: g.getstate() if isinstance(g, random.Random) else g.get_state()
                for name, g in self.generators.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        for name, generator in self.generators.items():
            saved = state["generators"][name]
            if isinstance(generator, random.Random):
                generator.setstate(saved)
            else:
                generator.set_state(saved)


class Checkpoints:
    """The checkpoints under `directory`, of which the newest `keep` are kept (0: all)."""

    def __init__(self, directory: str | Path, keep: int = 0):
        self.directory = Path(directory)
        self.keep = keep

    def save(
        self,
        step: int,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        state: Mapping[str, Stateful],
        networks: Mapping[str, torch.nn.Module] | None = None,
    ) -> Path:
        """Write the checkpoint of `step` (call on one process only)."""
        final = self.directory / f"step-{step:08d}"
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging / MODEL_DIR)
        tokenizer.save_pretrained(staging / MODEL_DIR)
        torch.save(
            {"step": step, **{name: obj.state_dict() for name, obj in state.items()}},
            staging / STATE_FILE,
        )
        for name, network in (networks or {}).items():
            save_model(network, str(staging / f"{name}.safetensors"))
        fsync_tree(staging)  # contents on disk before the marker makes them visible
        (staging / COMPLETE).write_text(str(step))
        fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        fsync_tree(self.directory, recursive=False)
        for old in self.complete()[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        """Checkpoints whose writing finished, oldest first (a torn one has no marker)."""
        return sorted(
            p for p in self.directory.glob("step-*") if p.is_dir() and (p / COMPLETE).exists()
        )

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def restore_latest(
        self,
        model: PreTrainedModel,
        state: Mapping[str, Stateful],
        networks: Mapping[str, torch.nn.Module] | None = None,
    ) -> tuple[Path, int] | None:
        """Restore the newest readable checkpoint into the given objects; None when there is none.

        A checkpoint whose files cannot be read (truncated, corrupted) is skipped with a warning
        in favour of the one before it. Returns the checkpoint and its step.
        """
        networks = networks or {}
        for path in reversed(self.complete()):
            try:
                weights = load_file(str(path / MODEL_DIR / weights_file(model)))
                saved = torch.load(path / STATE_FILE, weights_only=False)
                copies = {name: load_file(str(path / f"{name}.safetensors")) for name in networks}
            except Exception as error:  # any unreadable file: fall back to an older checkpoint
                warnings.warn(
                    f"checkpoint {path} is unreadable ({type(error).__name__}: "
                    f"{str(error)[:80]}); trying the one before it",
                    stacklevel=2,
                )
                continue
            if is_lora(model):
                load_adapter_weights(model, weights, path)
            else:
                load_weights(model, weights, path)
            for name, network in networks.items():
                load_weights(network, copies[name], path)
            for name, obj in state.items():
                obj.load_state_dict(saved[name])
            return path, int(saved["step"])
        return None


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's weights; either side of a pair of tied weights may be absent."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied_pairs = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(tied_pairs) | set(tied_pairs.values()) if isinstance(tied_pairs, dict) else set()
    real_missing = [k for k in missing if k not in tied]
    if unexpected or (real_missing and "lm_head.weight" not in real_missing):
        raise OpdistillError(f"checkpoint {path} does not match the student model")
