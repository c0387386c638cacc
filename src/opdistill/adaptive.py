"""DistiLLM's adaptive off-policy schedule: the validation loss that drives φ."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import batch_logits, dataset_batch
from opdistill.config import Config
from opdistill.errors import OpdistillError
from opdistill.losses import DIVERGENCE_KINDS, masked_token_sum, token_divergence, token_nll
from opdistill.tasks.base import Example
from opdistill.teachers import Teacher


@torch.no_grad()
def validation_loss(
    config: Config,
    student: PreTrainedModel,
    teacher: Teacher | None,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    device: torch.device,
) -> float:
    """The distillation divergence on held-out reference completions (token mean), at the
    trained objective's `loss.temperature`.

    Objectives that are not a token divergence (vOPD, MiniLLM, ...) are measured with reverse KL;
    `nll` with NLL.
    """
    kind = config.loss.kind
    kind = kind if kind in (*DIVERGENCE_KINDS, "nll") else "reverse_kl"
    held_out = [e for e in examples[: config.eval.num_prompts] if e.completion is not None]
    if not held_out:
        raise OpdistillError("train.adaptive_source needs eval examples with a completion")
    total, count = 0.0, 0
    size = config.eval.batch_size
    for start in range(0, len(held_out), size):
        batch = dataset_batch(tokenizer, held_out[start : start + size]).to(device)
        logits = batch_logits(student, batch, len(tokenizer))
        if kind == "nll":
            values = token_nll(logits, batch.response_ids, temperature=config.loss.temperature)
        else:
            values = token_divergence(
                logits,
                teacher.logits(batch),
                kind,
                beta=config.loss.beta,
                alpha=config.loss.alpha,
                temperature=config.loss.temperature,
            )
        total += float(masked_token_sum(values, batch.response_mask))
        count += batch.num_tokens
    return total / max(1, count)
