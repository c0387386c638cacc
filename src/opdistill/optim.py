"""The optimizer and its schedule, and naming what went non-finite in a step."""

from __future__ import annotations

import math
import warnings

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from opdistill.config import TrainConfig
from opdistill.errors import OpdistillError


def make_optimizer(
    train: TrainConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters (LoRA: the adapters only) and its cosine schedule
    with warmup, counted in optimizer steps. Fused: one kernel per parameter, without the foreach
    implementation's temporaries the size of all parameters."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train.lr,
        weight_decay=train.weight_decay,
        fused=True,
    )
    scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=max(1, train.steps),
        scheduler_specific_kwargs={"min_lr_rate": train.min_lr_ratio},
    )
    return optimizer, scheduler


def nonfinite_culprit(model: torch.nn.Module, loss: float) -> str:
    """Name what went non-finite: the loss, or the first parameter with a bad gradient."""
    if not math.isfinite(loss):
        return "the loss"
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return f"the gradient of {name}"
    return "the gradient norm"


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: TrainConfig,
    loss: float,
    step: int,
) -> tuple[float, bool]:
    """Clip the gradients and step the optimizer and the schedule, never from a non-finite loss
    or gradient: such a step stops the run (`train.on_nonfinite: stop`, naming the tensor) or is
    skipped with a warning. Returns the gradient norm and whether the weights were updated."""
    max_norm = train.max_grad_norm if train.max_grad_norm > 0 else math.inf
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    stepped = math.isfinite(loss) and math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
        scheduler.step()  # a skipped step does not advance the schedule either
    else:
        culprit = nonfinite_culprit(model, loss)
        optimizer.zero_grad(set_to_none=True)
        if train.on_nonfinite == "stop":
            raise OpdistillError(
                f"step {step}: {culprit} is not finite (loss {loss}, gradient norm {grad_norm}); "
                "stopping before the weights are updated (train.on_nonfinite: skip skips such "
                "steps instead)"
            )
        warnings.warn(f"step {step}: {culprit} is not finite; step skipped", stacklevel=3)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped
