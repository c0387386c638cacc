"""Diagnostics of on-policy distillation: can the teacher still solve a problem from the
student's own partial solutions, and do the student's responses end within the token budget?

`prefix_recovery`: the student samples responses; each is cut after a fraction f of its tokens
and a continuer (the teacher) completes it greedily within what is left of the budget. Its
accuracy from the student's prefixes says whether the teacher's targets on the student's samples
still lead to a correct answer; f = 0 is the continuer's own greedy accuracy. The accuracies are
also reported separately over the samples the student got right and those it got wrong.

`divergence_report`: at which token samples that are not golden answers leave them.

`length_report`: how often samples hit `max_new_tokens` without an EOS, their lengths against
the reference completions', and how such truncated responses are judged by the verifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import Batch, chat_prompt, completion_ids, encode_text, left_pad
from opdistill.checkpoint import forked_rng
from opdistill.rollout import HFGenerateRollout
from opdistill.rollout.base import pure_generation_config, sampling_generation_config
from opdistill.tasks.base import Example, Task


@dataclass
class Sample:
    """One sampled response: its tokens (without EOS), whether it ended with EOS, its text and
    the verifier's verdict."""

    example: Example
    ids: list[int]
    ended: bool
    text: str
    correct: bool


def _split_responses(batch: Batch, eos_id: int) -> list[tuple[list[int], bool]]:
    out = []
    for ids, mask in zip(batch.response_ids.tolist(), batch.response_mask.tolist(), strict=True):
        kept = [i for i, m in zip(ids, mask, strict=True) if m]
        ended = bool(kept) and kept[-1] == eos_id
        out.append((kept[:-1] if ended else kept, ended))
    return out


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
    greedy: bool = False,
) -> list[Sample]:
    """`num_samples` responses per example at `temperature` (or the greedy one, `greedy`),
    judged by the task's verifier."""
    rollout = HFGenerateRollout(model, tokenizer, record_logprobs=False)
    repeated = [e for e in examples for _ in range(num_samples)]
    samples = []
    with forked_rng():
        torch.manual_seed(seed)
        for start in range(0, len(repeated), batch_size):
            chunk = repeated[start : start + batch_size]
            batch = rollout.generate(chunk, max_new_tokens, temperature, greedy=greedy)
            for example, (ids, ended) in zip(
                chunk, _split_responses(batch, tokenizer.eos_token_id), strict=True
            ):
                text = _decode(tokenizer, ids)
                samples.append(Sample(example, ids, ended, text, task.is_correct(example, text)))
    return samples


@torch.no_grad()
def continue_greedily(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefixes: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    batch_size: int = 128,
) -> list[list[int]]:
    """The greedy continuation (without EOS) of each prompt's response `prefixes[i]`, at most
    `max_new_tokens[i]` tokens long (0 returns no tokens)."""
    device = next(model.parameters()).device
    padded = range(len(tokenizer), model.get_output_embeddings().weight.shape[0])
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in examples]
    todo = [i for i, n in enumerate(max_new_tokens) if n > 0]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        inputs = [[*chat_prompt(tokenizer, examples[i].prompt), *prefixes[i]] for i in rows]
        ids, mask = left_pad(inputs, tokenizer.pad_token_id)
        budget = max(max_new_tokens[i] for i in rows)
        config = sampling_generation_config(
            budget,
            greedy=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=padded,
        )
        with pure_generation_config(model, config):
            sequences = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
            )
        for i, row in zip(rows, sequences[:, ids.shape[1] :].tolist(), strict=True):
            row = row[: max_new_tokens[i]]
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out[i] = row
    model.train(was_training)
    return out


def prefix_recovery(
    samples: Sequence[Sample],
    continuer: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    max_new_tokens: int = 32,
    batch_size: int = 128,
) -> dict[str, float]:
    """The continuer's accuracy from the first ⌊f·length⌋ tokens of each sample, per fraction f.

    Returns `recovery@f` (over all samples), `recovery_right@f` and `recovery_wrong@f` (over the
    samples the student got right / wrong; absent when there are none) and `sample_accuracy`.
    """
    result = {"sample_accuracy": sum(s.correct for s in samples) / max(1, len(samples))}
    examples = [s.example for s in samples]
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"prefix fractions must lie in [0, 1], got {f}")
        cuts = [math.floor(f * len(s.ids)) for s in samples]
        prefixes = [s.ids[:cut] for s, cut in zip(samples, cuts, strict=True)]
        budgets = [max_new_tokens - cut for cut in cuts]
        rest = continue_greedily(continuer, tokenizer, examples, prefixes, budgets, batch_size)
        verdicts = [
            task.is_correct(s.example, _decode(tokenizer, [*p, *r]))
            for s, p, r in zip(samples, prefixes, rest, strict=True)
        ]
        result[f"recovery@{f:g}"] = sum(verdicts) / max(1, len(verdicts))
        for name, keep in (("right", True), ("wrong", False)):
            chosen = [v for v, s in zip(verdicts, samples, strict=True) if s.correct is keep]
            if chosen:
                result[f"recovery_{name}@{f:g}"] = sum(chosen) / len(chosen)
    return result


def divergence_report(
    samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, task: Task
) -> dict[str, float]:
    """Where samples that are not golden answers leave the golden answers (`Task.has_golden`).

    For each such sample, the first token index at which it differs from every golden answer
    (the longest common token prefix with any of them). Returns `off_golden_fraction`,
    `first_divergence` (mean index), `first_divergence_relative` (mean index / golden length)
    and `first_divergence@I` (the share of those samples that leave at token I).
    """
    indices, relative = [], []
    for sample in samples:
        goldens = [encode_text(tokenizer, y) for y in task.golden_distribution(sample.example)]
        if any(sample.ids == g for g in goldens):
            continue
        best, size = 0, 1
        for golden in goldens:
            common = 0
            while common < min(len(golden), len(sample.ids)):
                if golden[common] != sample.ids[common]:
                    break
                common += 1
            if common >= best:
                best, size = common, max(1, len(golden))
        indices.append(best)
        relative.append(best / size)
    report = {"off_golden_fraction": len(indices) / max(1, len(samples))}
    if indices:
        report["first_divergence"] = sum(indices) / len(indices)
        report["first_divergence_relative"] = sum(relative) / len(relative)
        for index in sorted(set(indices)):
            report[f"first_divergence@{index}"] = indices.count(index) / len(indices)
    return report


def length_report(
    samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> dict[str, float]:
    """Lengths of the samples (tokens without EOS) against the references', and truncation.

    `truncated_fraction`: samples that used the whole budget without an EOS;
    `truncated_correct`: of those, the fraction the verifier accepts (absent when none);
    `reference_length`: mean length of the examples' completions (when they have one).
    """
    lengths = [len(s.ids) for s in samples]
    truncated = [s for s in samples if not s.ended and len(s.ids) >= max_new_tokens]
    report = {
        "mean_length": sum(lengths) / max(1, len(lengths)),
        "max_length": float(max(lengths, default=0)),
        "truncated_fraction": len(truncated) / max(1, len(samples)),
        "unfinished_fraction": sum(not s.ended for s in samples) / max(1, len(samples)),
    }
    if truncated:
        report["truncated_correct"] = sum(s.correct for s in truncated) / len(truncated)
    references = [s.example.completion for s in samples if s.example.completion is not None]
    if references:
        sizes = [len(completion_ids(tokenizer, c)) - 1 for c in references]
        report["reference_length"] = sum(sizes) / len(sizes)
    return report
