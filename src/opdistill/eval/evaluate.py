"""Held-out evaluation on a task: greedy accuracy, pass@k, diversity, distance to the teacher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import batch_logits
from opdistill.config import EvalConfig
from opdistill.eval.metrics import avg_at_k, distinct_n, mean_distinct_correct, pass_at_k_curve
from opdistill.losses import masked_token_sum, token_divergence
from opdistill.rollout import HFGenerateRollout, decode_responses
from opdistill.tasks.base import Example, Task
from opdistill.teacher import Teacher


def curve_ks(num_samples: int) -> list[int]:
    """Powers of two up to `num_samples`, plus `num_samples` itself."""
    ks = [2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples]
    return ks if ks[-1] == num_samples else [*ks, num_samples]


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    num_samples: int = 16,
    ks: Sequence[int] = (1, 4, 16),
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 128,
    teacher: Teacher | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate `model` on `examples`.

    Returns `accuracy` (greedy), `pass@k` for `ks` and for every power of two up to `num_samples`
    (unbiased estimator), `avg@n` (mean sample accuracy), `distinct_correct` (mean number of
    distinct correct solutions among the n samples of a prompt), `distinct_2` (lexical diversity),
    and, with a teacher, `teacher_rkl`: the mean token reverse KL(student‖teacher) on the sampled
    responses.
    Sampling uses its own seeded RNG and leaves the global RNG state untouched.
    """
    rollout = HFGenerateRollout(model, tokenizer, record_logprobs=False)
    vocab_size = len(tokenizer)
    metrics: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task.has_verifier:
            greedy_correct = []
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = rollout.generate(chunk, max_new_tokens, greedy=True)
                texts = decode_responses(tokenizer, batch)
                greedy_correct += [task.is_correct(e, t) for e, t in zip(chunk, texts, strict=True)]
            metrics["accuracy"] = sum(greedy_correct) / max(1, len(greedy_correct))

        repeated = [e for e in examples for _ in range(num_samples)]
        texts: list[str] = []
        rkl_sum, rkl_tokens = 0.0, 0
        for start in range(0, len(repeated), batch_size):
            batch = rollout.generate(
                repeated[start : start + batch_size], max_new_tokens, temperature
            )
            texts += decode_responses(tokenizer, batch)
            if teacher is not None:
                device = next(model.parameters()).device
                student_logits = batch_logits(model, batch.to(device), vocab_size)
                rkl = token_divergence(student_logits, teacher.logits(batch), "reverse_kl")
                mask = batch.response_mask.to(rkl.device)
                rkl_sum += float(masked_token_sum(rkl, mask))
                rkl_tokens += int(mask.sum())
    if teacher is not None:
        metrics["teacher_rkl"] = rkl_sum / max(1, rkl_tokens)
    metrics["distinct_2"] = distinct_n(texts, 2)
    if not task.has_verifier:
        return metrics

    flags = [
        [task.is_correct(e, t) for t in texts[i * num_samples : (i + 1) * num_samples]]
        for i, e in enumerate(examples)
    ]
    keys = [
        [
            task.solution_key(e, t)
            for t, ok in zip(texts[i * num_samples : (i + 1) * num_samples], flags[i], strict=True)
            if ok
        ]
        for i, e in enumerate(examples)
    ]
    counts = [sum(f) for f in flags]
    all_ks = sorted(set(ks) | set(curve_ks(num_samples)))
    for k, value in pass_at_k_curve(counts, num_samples, all_ks).items():
        metrics[f"pass@{k}"] = value
    metrics[f"avg@{num_samples}"] = avg_at_k(flags)
    metrics["distinct_correct"] = mean_distinct_correct(keys)
    return metrics


def evaluate_with_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    config: EvalConfig,
    teacher: Teacher | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """`evaluate` with the settings of an `eval:` config section (first `num_prompts` examples)."""
    return evaluate(
        model,
        tokenizer,
        task,
        examples[: config.num_prompts],
        num_samples=config.num_samples,
        ks=config.ks,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        teacher=teacher,
        seed=seed,
    )
