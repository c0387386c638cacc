"""Prompts that do not fit the context window: reject, truncate or drop them before any compute.

A prompt fits when its chat-templated token count plus the response budget (`max_new_tokens`)
is at most the model's context window (or `data.max_prompt_tokens` when that is set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from opdistill.batch import chat_prompt
from opdistill.config import DataConfig
from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example

_WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_window(*models: PreTrainedModel | PretrainedConfig | None) -> int | None:
    """The smallest context window (in tokens) among `models` (or their configs); None when none
    declares one."""
    windows = []
    for model in models:
        if model is None:
            continue
        config = model if isinstance(model, PretrainedConfig) else model.config
        for key in _WINDOW_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                windows.append(value)
                break
    return min(windows) if windows else None


def prompt_token_limit(
    max_prompt_tokens: int, window: int | None, max_new_tokens: int
) -> tuple[int | None, str]:
    """The largest allowed chat-templated prompt length, and where that limit comes from."""
    limits = []
    if max_prompt_tokens > 0:
        limits.append((max_prompt_tokens, "data.max_prompt_tokens"))
    if window is not None:
        budget = window - max_new_tokens
        if budget < 1:
            raise OpdistillError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context window of {window} tokens"
            )
        limits.append((budget, f"context window {window} − max_new_tokens {max_new_tokens}"))
    if not limits:
        return None, "no limit"
    return min(limits)


@dataclass
class PromptFit:
    """What `fit_prompts` did to one split."""

    examples: list[Example]
    total: int
    too_long: int
    action: str
    limit: int | None

    def summary(self, split: str) -> str:
        if not self.too_long:
            return f"{split}: all {self.total} prompts fit in {self.limit} tokens"
        return (
            f"{split}: {self.too_long} of {self.total} prompts exceed {self.limit} tokens; "
            f"{'truncated' if self.action == 'truncate' else 'dropped'}"
        )


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[int]:
    """Token counts of the examples' prompts with the chat template (as `chat_prompt` builds)."""
    return [len(chat_prompt(tokenizer, e.prompt)) for e in examples]


def _describe(example: Example, index: int, split: str) -> str:
    source = example.meta.get("source") if example.meta else None
    return str(source) if source else f"{split} prompt {index} ({example.prompt[:40]!r}…)"


def _truncate(
    tokenizer: PreTrainedTokenizerBase, example: Example, limit: int, side: str
) -> Example | None:
    """The example with its prompt cut to fit `limit` templated tokens, or None if impossible.

    The cut falls on a token boundary of the original text (fast tokenizers' offsets), so the
    kept part is verbatim.
    """
    prompt = example.prompt
    encoding = tokenizer(
        prompt, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True
    )
    offsets = encoding["offset_mapping"]
    overhead = len(chat_prompt(tokenizer, ""))
    keep = min(len(offsets), limit - overhead)
    while keep > 0:
        if side == "left":
            text = prompt[offsets[len(offsets) - keep][0] :]
        else:
            text = prompt[: offsets[keep - 1][1]]
        text = text.strip()
        if text and len(chat_prompt(tokenizer, text)) <= limit:
            return dataclasses.replace(example, prompt=text)
        keep -= max(1, keep // 16)  # merges across the cut can add tokens: shrink and retry
    return None


def fit_prompts(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None,
    action: str,
    side: str = "left",
    split: str = "train",
    limit_source: str = "",
) -> PromptFit:
    """Apply `action` ("reject" | "truncate" | "drop") to prompts longer than `limit` tokens.

    "reject" raises an OpdistillError naming the first long prompt (file:line for user data);
    "truncate" cuts the user message (from the left by default, keeping the end nearest the
    answer) so that the templated prompt fits; "drop" leaves such examples out.
    """
    if limit is None or not examples:
        return PromptFit(list(examples), len(examples), 0, action, limit)
    kept: list[Example] = []
    too_long = 0
    lengths = prompt_lengths(tokenizer, examples)
    for index, (example, length) in enumerate(zip(examples, lengths, strict=True)):
        if length <= limit:
            kept.append(example)
            continue
        too_long += 1
        where = _describe(example, index, split)
        if action == "reject":
            raise OpdistillError(
                f"{where}: the prompt is {length} tokens with the chat template, over the limit "
                f"of {limit} ({limit_source or 'max prompt tokens'}); set data.long_prompts to "
                "truncate or drop, or raise data.max_prompt_tokens / lower max_new_tokens"
            )
        if action == "truncate":
            shortened = _truncate(tokenizer, example, limit, side)
            if shortened is None:
                raise OpdistillError(
                    f"{where}: the chat template alone does not fit in {limit} tokens"
                )
            kept.append(shortened)
    if not kept:
        raise OpdistillError(f"{split}: every prompt is longer than {limit} tokens")
    return PromptFit(kept, len(examples), too_long, action, limit)


def fit_split(
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    window: int | None,
    examples: Sequence[Example],
    split: str,
    max_new_tokens: int,
) -> PromptFit:
    """`fit_prompts` with the limit and policy of the `data` config section."""
    limit, source = prompt_token_limit(data.max_prompt_tokens, window, max_new_tokens)
    return fit_prompts(
        examples, tokenizer, limit, data.long_prompts, data.truncation_side, split, source
    )
