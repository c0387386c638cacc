"""LoRA students through peft: add adapters, save and restore them, merge, or switch them off.

With `self_distill.weights: base` the self-distillation teacher is the student's base model with
its adapters disabled, so no copy of the network is kept.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from torch import Tensor
from transformers import PreTrainedModel

from opdistill.config import LoraConfig
from opdistill.errors import OpdistillError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"


def add_lora(model: PreTrainedModel, config: LoraConfig) -> PeftModel:
    """`model` with trainable LoRA adapters; the base weights are frozen."""
    try:
        return get_peft_model(
            model,
            PeftLoraConfig(
                r=config.r,
                lora_alpha=config.alpha,
                lora_dropout=config.dropout,
                target_modules=config.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as error:  # e.g. target modules that the model does not have
        raise OpdistillError(f"model.lora: {' '.join(str(error).split())[:200]}") from None


def is_lora(model: Any) -> bool:
    return isinstance(model, PeftModel)


def weights_file(model: Any) -> str:
    """The file `save_pretrained` writes the trainable weights to."""
    return ADAPTER_WEIGHTS if is_lora(model) else FULL_WEIGHTS


def load_adapter_weights(model: PeftModel, weights: dict[str, Tensor], where: Path) -> None:
    """Restore adapter weights saved by `save_pretrained`."""
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError:  # size mismatch: other adapters or another base model
        raise OpdistillError(
            f"checkpoint {where} does not match the student's LoRA adapters"
        ) from None
    if result.unexpected_keys:
        raise OpdistillError(f"checkpoint {where} does not match the student's LoRA adapters")


def adapters_disabled(model: Any):
    """A context in which a LoRA model computes with its base weights (no-op otherwise)."""
    return model.disable_adapter() if is_lora(model) else nullcontext()


def save_merged(model: PeftModel, path: Path) -> None:
    """The student with its adapters merged into the base weights, as a plain causal LM."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)


def base_state_dict(model: PeftModel, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The base model's weights under their own (transformers) names: the adapters left out,
    `…q_proj.base_layer.weight` → `…q_proj.weight`. `state`: a snapshot of `model.state_dict()`."""
    state = model.state_dict() if state is None else state
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix).replace(".base_layer.", "."): tensor
        for name, tensor in state.items()
        if "lora_" not in name
    }


def save_adapter(model: PeftModel, directory: Path, state: dict[str, Tensor] | None = None) -> Path:
    """The adapter as `save_pretrained` writes it (adapter_config.json + safetensors), from
    `model`'s current weights or from `state`, a snapshot of `model.state_dict()`."""
    if state is None:
        model.save_pretrained(directory)
        return directory
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(model, state_dict=state)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, directory / ADAPTER_WEIGHTS)
    model.peft_config[model.active_adapter].save_pretrained(directory)
    return directory
