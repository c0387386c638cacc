"""Held-out evaluation on a task: greedy accuracy, pass@k, diversity, distance to the teacher."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import batch_logits
from opdistill.checkpoint import forked_rng
from opdistill.config import EvalConfig
from opdistill.eval import diversity
from opdistill.eval.golden import golden_metrics
from opdistill.eval.metrics import (
    avg_at_k,
    distinct_correct,
    distinct_n,
    mean_distinct_correct,
    pass_at_k_curve,
)
from opdistill.losses import masked_token_sum, token_divergence
from opdistill.rollout import HFGenerateRollout, RolloutBackend, decode_responses
from opdistill.tasks.base import Example, Task
from opdistill.teachers.base import Teacher


def curve_ks(num_samples: int) -> list[int]:
    """Powers of two up to `num_samples`, plus `num_samples` itself."""
    ks = [2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples]
    return ks if ks[-1] == num_samples else [*ks, num_samples]


class EvalMetrics(dict[str, float]):
    """The {metric: value} dict `evaluate` returns, plus what it was computed from.

    per_prompt: metric → one value per prompt, in the order of the examples, for the metrics
        defined per prompt: `num_correct`, `distinct_correct`, `self_bleu`,
        `semantic_diversity` (each present when the metric of that name is).
    samples: the `num_samples` decoded responses of each prompt.
    greedy_correct: whether each prompt's greedy response is correct (tasks with a verifier).
    These are plain attributes: copying the dict (`dict(m)`, `{**m}`) drops them.
    """

    def __init__(
        self,
        metrics: dict[str, float] | None = None,
        per_prompt: dict[str, list[float]] | None = None,
        samples: list[list[str]] | None = None,
    ) -> None:
        super().__init__(metrics or {})
        self.per_prompt: dict[str, list[float]] = per_prompt or {}
        self.samples: list[list[str]] = samples or []
        self.greedy_correct: list[bool] = []


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
    full_curve: bool = False,
    self_bleu: bool = True,
    semantic_model: str | None = None,
    semantic_device: str = "cpu",
    rollout: RolloutBackend | None = None,
    golden: bool = False,
) -> EvalMetrics:
    """Evaluate `model` on `examples`.

    Returns an `EvalMetrics` dict with `accuracy` (greedy), `pass@k` for `ks` and for every
    power of two up to `num_samples` (every k in 1..num_samples with `full_curve`; unbiased
    estimator), `avg@n` (mean sample accuracy), `distinct_correct` (mean number of distinct
    correct solutions among the n samples of a prompt), `distinct_2` (distinct bigrams over all
    samples), `self_bleu` (mean self-BLEU of a prompt's samples in [0, 1]; lower is more
    diverse), `semantic_diversity` (mean pairwise cosine distance of the sentence embeddings of a
    prompt's samples, with `semantic_model`, see `diversity.load_embedding_model`) and, with a
    teacher, `teacher_rkl`: the mean token reverse KL(student‖teacher) on the sampled responses.
    With `golden`, also `golden_kl` and `golden_mass`, the distance to the task's true
    distribution of answers (`opdistill.eval.golden`; tasks with `has_golden` only).
    Tasks without a verifier get only `distinct_2`, `self_bleu`, `semantic_diversity` and
    `teacher_rkl`. `self_bleu` and `semantic_diversity` need `num_samples` ≥ 2;
    `semantic_diversity` is left out, with a warning, when its model cannot be loaded.
    Per-prompt values are in `.per_prompt`, the sampled responses in `.samples`.
    Sampling uses its own seeded RNG and leaves the global RNG state of the CPU and of every
    CUDA device untouched. `rollout`: what samples (default: transformers `generate` on
    `model`), e.g. a vLLM engine holding `model`'s weights.
    """
    rollout = rollout or HFGenerateRollout(model, tokenizer, record_logprobs=False)
    vocab_size = len(tokenizer)
    result = EvalMetrics()
    with forked_rng():  # the CPU and every CUDA device: training's random streams go on untouched
        torch.manual_seed(seed)
        if task.has_verifier:
            greedy_correct = []
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = rollout.generate(chunk, max_new_tokens, greedy=True)
                texts = decode_responses(tokenizer, batch)
                greedy_correct += [task.is_correct(e, t) for e, t in zip(chunk, texts, strict=True)]
            result["accuracy"] = sum(greedy_correct) / max(1, len(greedy_correct))
            result.greedy_correct = greedy_correct

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
    samples = [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(examples))]
    result.samples = samples
    if golden and examples:
        result.update(golden_metrics(model, tokenizer, task, examples, temperature, batch_size))
    if teacher is not None:
        result["teacher_rkl"] = rkl_sum / max(1, rkl_tokens)
    result["distinct_2"] = distinct_n(texts, 2)
    if examples and num_samples >= 2:
        if self_bleu:
            per_prompt = [diversity.self_bleu(group) for group in samples]
            result.per_prompt["self_bleu"] = per_prompt
            result["self_bleu"] = fmean(per_prompt)
        encoder = diversity.try_load_embedding_model(semantic_model, semantic_device)
        if encoder is not None:
            per_prompt = diversity.semantic_diversity_per_prompt(samples, encoder)
            result.per_prompt["semantic_diversity"] = per_prompt
            result["semantic_diversity"] = fmean(per_prompt)
    if not task.has_verifier:
        return result

    flags = [
        [task.is_correct(e, t) for t in group] for e, group in zip(examples, samples, strict=True)
    ]
    keys = [
        [task.solution_key(e, t) for t, ok in zip(group, ok_flags, strict=True) if ok]
        for e, group, ok_flags in zip(examples, samples, flags, strict=True)
    ]
    counts = [sum(f) for f in flags]
    all_ks = range(1, num_samples + 1) if full_curve else curve_ks(num_samples)
    for k, value in pass_at_k_curve(counts, num_samples, sorted({*ks, *all_ks})).items():
        result[f"pass@{k}"] = value
    result[f"avg@{num_samples}"] = avg_at_k(flags)
    result["distinct_correct"] = mean_distinct_correct(keys)
    result.per_prompt["num_correct"] = counts
    result.per_prompt["distinct_correct"] = [distinct_correct(k) for k in keys]
    return result


def evaluate_with_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    config: EvalConfig,
    teacher: Teacher | None = None,
    seed: int = 0,
    rollout: RolloutBackend | None = None,
) -> EvalMetrics:
    """`evaluate` with the settings of an `eval:` config section (first `num_prompts` examples);
    `rollout` samples (the `eval.backend: vllm` engine), default transformers `generate`."""
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
        full_curve=config.full_curve,
        self_bleu=config.self_bleu,
        semantic_model=config.semantic_model,
        semantic_device=config.semantic_device,
        rollout=rollout,
        golden=config.golden,
    )
