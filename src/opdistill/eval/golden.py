"""Golden metrics: how far the student is from the task's true distribution of correct answers.

Distillation optimises a proxy, the divergence to the teacher. When a task knows the
distribution its correct answers should follow (`Task.golden_distribution`: uniform over every
valid path of the graph task, the one worked solution of the arithmetic tasks), the student can
be compared with it exactly, by scoring each golden answer with the student (teacher forcing):

    golden_kl   = mean over prompts of KL(g ‖ p) = Σ_y g(y) · (log g(y) − log p(y | x))
    golden_mass = mean over prompts of Σ_{y ∈ supp g} p(y | x)

where p(y | x) is the student's probability of the whole response y (its tokens and the EOS) at
the sampling temperature. `golden_kl` is finite even when the student also puts mass on wrong
answers; `golden_mass` is the student's exact expected sample accuracy when the golden support
is every correct answer (graph task). See `opdistill.eval.monitor` for the teacher-hacking flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import batch_logits, dataset_batch
from opdistill.errors import OpdistillError
from opdistill.losses.logprobs import gather_tokens, log_softmax_at
from opdistill.tasks.base import Example, Task


def kl_to_golden(golden: Mapping[str, float], logprobs: Mapping[str, float]) -> float:
    """KL(g ‖ p) = Σ_y g(y) (log g(y) − log p(y)) over the support of `golden`.

    `golden` maps answer → probability (summing to 1); `logprobs` maps each of those answers to
    the model's log-probability. Answers with g(y) = 0 contribute nothing.
    """
    total = sum(golden.values())
    if not golden or not math.isclose(total, 1.0, rel_tol=1e-6):
        raise ValueError(f"a golden distribution must sum to 1, got {total}")
    return sum(g * (math.log(g) - logprobs[y]) for y, g in golden.items() if g > 0)


@torch.no_grad()
def response_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    temperature: float = 1.0,
    batch_size: int = 128,
) -> list[float]:
    """log p(response | prompt) of each (prompt, response) pair: the sum over the response's
    tokens and its EOS of the model's log-probabilities at `temperature`."""
    device = next(model.parameters()).device
    vocab_size = len(tokenizer)
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = [Example(prompt=p, completion=r) for p, r in pairs[start : start + batch_size]]
        batch = dataset_batch(tokenizer, chunk).to(device)
        logits = batch_logits(model, batch, vocab_size)
        token = gather_tokens(log_softmax_at(logits, temperature), batch.response_ids)
        out += (token * batch.response_mask).sum(dim=1).tolist()
    model.train(was_training)
    return out


def golden_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    temperature: float = 1.0,
    batch_size: int = 128,
) -> dict[str, float]:
    """`golden_kl` and `golden_mass` (see the module docstring) of `model` on `examples`."""
    if not task.has_golden:
        raise OpdistillError(
            f"eval.golden: task {task.name!r} defines no golden distribution (tasks that do: "
            "graph, arithmetic, chain); set eval.golden: false"
        )
    goldens = [task.golden_distribution(e) for e in examples]
    pairs = [(e.prompt, y) for e, g in zip(examples, goldens, strict=True) for y in g]
    flat = iter(response_logprobs(model, tokenizer, pairs, temperature, batch_size))
    kls, masses = [], []
    for golden in goldens:
        logprobs = {y: next(flat) for y in golden}
        kls.append(kl_to_golden(golden, logprobs))
        masses.append(sum(math.exp(lp) for lp in logprobs.values()))
    n = max(1, len(examples))
    return {"golden_kl": sum(kls) / n, "golden_mass": sum(masses) / n}
