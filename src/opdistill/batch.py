"""Token batches: left-padded prompts, right-padded responses, and the logits that score them."""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.tasks.base import Example

if TYPE_CHECKING:
    from opdistill.losses.projected import ProjectedLogits


@dataclass
class Batch:
    """Prompts and responses of one micro-batch.

    prompt_ids/prompt_mask: [B, P], left-padded (generation appends on the right).
    response_ids/response_mask: [B, R], right-padded; the mask covers every generated token up to
    and including the first EOS and nothing after it.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    examples: Sequence[Example] = field(default_factory=list)
    sampler_logprobs: Tensor | None = None  # [B, R] log-prob of each token under its sampler

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, and each example as a mapping of its fields), for checkpoints."""
        return {
            "prompt_ids": self.prompt_ids.cpu(),
            "prompt_mask": self.prompt_mask.cpu(),
            "response_ids": self.response_ids.cpu(),
            "response_mask": self.response_mask.cpu(),
            "examples": [example_fields(e) for e in self.examples],
            "sampler_logprobs": None
            if self.sampler_logprobs is None
            else self.sampler_logprobs.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Batch:
        return cls(
            state["prompt_ids"],
            state["prompt_mask"],
            state["response_ids"],
            state["response_mask"],
            [Example(**fields) for fields in state["examples"]],
            state["sampler_logprobs"],
        )

    def to(self, device: torch.device | str) -> Batch:
        logprobs = self.sampler_logprobs
        return Batch(
            self.prompt_ids.to(device),
            self.prompt_mask.to(device),
            self.response_ids.to(device),
            self.response_mask.to(device),
            self.examples,
            None if logprobs is None else logprobs.to(device),
        )


_SLOT = "\ue000user-text\ue001"  # private-use characters: in no template, no user text


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of user text, in which `<|assistant|>` and the like stay text: user data can
    never produce a control token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def example_fields(example: Example) -> dict[str, Any]:
    """An example as a mapping of its fields (plain data)."""
    fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
    return {**fields, "meta": dict(fields["meta"])}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a user turn formatted with the tokenizer's chat template, ready to generate.

    The template's own markup is encoded with its special tokens, the user's text without.
    """
    markup = _template_markup(tokenizer)
    if markup is None:  # a template that rewrites its content: encode it whole
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return [*markup[0], *encode_text(tokenizer, prompt), *markup[1]]


_MARKUP: dict[int, tuple[Any, Any, tuple[list[int], list[int]] | None]] = {}


def _template_markup(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]] | None:
    """The ids of the chat template before and after the user's text (None: no clean split)."""
    template = tokenizer.chat_template
    cached = _MARKUP.get(id(tokenizer))
    if cached is not None and cached[0]() is tokenizer and cached[1] is template:
        return cached[2]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SLOT}], add_generation_prompt=True, tokenize=False
    )
    markup = None
    if text.count(_SLOT) == 1:
        before, after = text.split(_SLOT)
        ids = tokenizer([before, after], add_special_tokens=False).input_ids
        markup = (ids[0], ids[1])
    if len(_MARKUP) > 64:
        _MARKUP.clear()
    with contextlib.suppress(TypeError):  # a tokenizer without weak references: no cache
        _MARKUP[id(tokenizer)] = (weakref.ref(tokenizer), template, markup)
    return markup


def completion_ids(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of an assistant response (user text: no special tokens), terminated by EOS."""
    return [*encode_text(tokenizer, completion), tokenizer.eos_token_id]


def check_completions(examples: Sequence[Example]) -> None:
    """Refuse examples without a reference completion, naming the first (FILE:LINE for data)."""
    for index, example in enumerate(examples):
        if example.completion is None:
            where = example.meta.get("source") if example.meta else None
            from opdistill.errors import OpdistillError

            raise OpdistillError(
                f"{where or f'train example {index}'}: no 'completion', which off-policy "
                f"dataset batches need (prompt {example.prompt[:40]!r}); add one or set "
                "train.student_data_fraction=1"
            )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack sequences, padding on the left; return ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack sequences, padding on the right; return ids and mask."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


def response_mask_after_eos(response_ids: Tensor, eos_id: int) -> Tensor:
    """1 on every token up to and including the first EOS of each row, 0 after it."""
    is_eos = response_ids == eos_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


def sequence_logits(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    vocab_size: int | None,
) -> Tensor:
    """Logits [B, R, vocab_size] that predict each response token.

    Positions follow the attention mask, as in generation, so left padding changes nothing; only
    response positions are projected to the vocabulary, and columns past `vocab_size` (embedding
    padding beyond the tokenizer) are dropped.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    num_response = response_ids.shape[1]
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=num_response + 1,
        use_cache=False,
    )
    return output.logits[:, :-1, :vocab_size]  # vocab_size None: every column


def batch_logits(model: PreTrainedModel, batch: Batch, vocab_size: int | None) -> Tensor:
    """`sequence_logits` for a `Batch`."""
    return sequence_logits(
        model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.response_ids,
        batch.response_mask,
        vocab_size,
    )


def dataset_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> Batch:
    """A batch whose responses are the examples' reference completions (after their
    `response_prefix`, whose tokens are in the response but out of its mask)."""
    check_completions(examples)
    prompt_ids, prompt_mask = left_pad(
        [chat_prompt(tokenizer, e.prompt) for e in examples], tokenizer.pad_token_id
    )
    prefixes = [encode_text(tokenizer, e.response_prefix or "") for e in examples]
    responses = [
        [*prefix, *completion_ids(tokenizer, e.completion)]
        for prefix, e in zip(prefixes, examples, strict=True)
    ]
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    for row, prefix in enumerate(prefixes):
        response_mask[row, : len(prefix)] = 0
    return Batch(prompt_ids, prompt_mask, response_ids, response_mask, list(examples))


# Attributes of model configs that transform the projected logits (softcapping, scaling): with
# any of them set, logits are not hidden @ Wᵀ + b and cannot be formed in chunks from hidden states.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def projectable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection of `model` (a causal LM, possibly LoRA-wrapped) when its logits are
    exactly `hidden @ Wᵀ + b`; None when they are not (a transformed or adapted head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if type(head) is not torch.nn.Linear or config is None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


class _HiddenStates(torch.nn.Module):
    """Stands in for the output projection during a forward pass: returns its input."""

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden


def batch_projected(
    model: torch.nn.Module, base: torch.nn.Module, batch: Batch, vocab_size: int
) -> ProjectedLogits:
    """The logits that predict each response token as hidden states [B, R, H] and `base`'s output
    projection (`ProjectedLogits`), computed by `model` (`base` itself, or a wrapper around it
    such as DDP or peft) with the projection bypassed, so no [B, R, V] tensor is formed."""
    from opdistill.losses.projected import ProjectedLogits

    target = base.get_base_model() if hasattr(base, "get_base_model") else base
    head = projectable_head(base)
    if head is None:
        raise ValueError("the model's logits are not a plain linear projection")
    target.set_output_embeddings(_HiddenStates())
    try:
        hidden = batch_logits(model, batch, vocab_size=None)
    finally:
        target.set_output_embeddings(head)
    return ProjectedLogits(hidden, head.weight, head.bias, vocab_size)
