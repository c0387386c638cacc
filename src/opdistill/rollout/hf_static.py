"""A lean transformers decode loop: static KV cache, optional `torch.compile`, no [B, V] scores.

`StaticRollout` is what `rollout.backend: hf_static` selects. It calls the model's forward
directly instead of `generate`, so nothing of the model's `generation_config` applies (pure
ancestral sampling at the given temperature, padded vocabulary columns excluded), and per token it
does only what sampling needs: one forward of the last position into a preallocated
`transformers.StaticCache`, a softmax, one multinomial draw, and the drawn token's log-prob
(z_y/T − logsumexp(z/T)), kept as a [B] vector instead of the [B, V] score `generate` returns.
The loop checks for "every row ended" once per `check_every` tokens (a host sync on GPUs).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from opdistill.batch import Batch
from opdistill.rollout.base import PromptCache, all_finished, finish_batch, synced_generation
from opdistill.tasks.base import Example


class StaticRollout:
    """Pure ancestral sampling from `model` with a static KV cache.

    compile: wrap the decode step in `torch.compile` (the cache's fixed shapes let it compile
        once per batch shape; worth it for long generations, the first call pays the compile).
    check_every: tokens between the "all rows ended" checks (1 on CPU, where they are free).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        record_logprobs: bool = True,
        compile: bool = False,
        check_every: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.record_logprobs = record_logprobs
        self.prompts = PromptCache(tokenizer)
        self.compile = compile
        self.check_every = check_every
        self._forward = None
        # transformers renamed `past_key_values` to `cache` (5.2x); both are supported.
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def _decode_forward(self):
        if self._forward is None:
            forward = self.model.forward
            self._forward = torch.compile(forward, dynamic=False) if self.compile else forward
        return self._forward

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Sample responses; `generator` (on the model's device) makes the draws reproducible
        independently of the global RNG (the pipelined loop seeds one per step)."""
        tokenizer, vocab = self.tokenizer, len(self.tokenizer)
        model = self.model
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = self.prompts.batch(examples)
        rows, prompt_len = prompt_ids.shape
        was_training = model.training
        model.eval()
        total = prompt_len + max_new_tokens
        cache = StaticCache(config=model.config, max_cache_len=total)
        mask = torch.ones(rows, total, dtype=torch.long, device=device)
        mask[:, :prompt_len] = prompt_mask.to(device)
        positions = (mask[:, :prompt_len].cumsum(dim=1) - 1).clamp(min=0)
        masks = DecodeMasks(mask, model.config, next(model.parameters()).dtype)
        tokens = torch.full((rows, max_new_tokens), tokenizer.pad_token_id, device=device)
        logprobs = torch.zeros(rows, max_new_tokens, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        check_every = self.check_every or (1 if device.type == "cpu" else 8)
        synced = synced_generation()
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        out = model(  # prefill: the whole prompt, logits of the last position only
            input_ids=prompt_ids.to(device),
            attention_mask=masks.prefill(prompt_len),
            position_ids=positions,
            cache_position=torch.arange(prompt_len, device=device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        forward = self._decode_forward()
        position = positions[:, -1:]
        steps = 0
        for t in range(max_new_tokens):
            logits = out.logits[:, -1, :vocab].float()
            if greedy:
                chosen = logits.argmax(dim=-1)
                scaled = logits
            else:
                scaled = logits / temperature
                probs = torch.softmax(scaled, dim=-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            chosen = chosen.masked_fill(finished, pad)
            tokens[:, t] = chosen
            if self.record_logprobs:
                picked = scaled.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
                logprobs[:, t] = picked - torch.logsumexp(scaled, dim=-1)
            finished |= chosen == eos
            steps = t + 1
            if t + 1 == max_new_tokens:
                break
            if steps % check_every == 0 and all_finished(finished, synced):
                break
            position = position + 1
            cursor = prompt_len + t
            out = forward(
                input_ids=chosen.unsqueeze(-1),
                attention_mask=masks.decode(cursor),
                position_ids=position,
                cache_position=torch.tensor([cursor], device=device),
                use_cache=True,
                **{self._cache_arg: cache},
            )
        model.train(was_training)
        batch = finish_batch(
            prompt_ids,
            prompt_mask,
            tokens[:, :steps].cpu(),
            logprobs[:, :steps].cpu(),
            eos,
            pad,
            examples,
        )
        if not self.record_logprobs:
            batch.sampler_logprobs = None
        return batch


class DecodeMasks:
    """Ready 4D attention masks over the static cache, so that transformers builds none per token.

    For SDPA and eager attention the mask of query position q over the cache's keys k is
    `k <= q` and k a real (not padding) token, plus q itself (a padding query then attends to
    itself instead of to nothing, which would give NaN states). Other attention implementations
    get the 2D mask and build their own.
    """

    def __init__(self, mask: Tensor, config: object, dtype: torch.dtype):
        self.mask, self.dtype = mask, dtype
        self.kind = getattr(config, "_attn_implementation", None)
        self.keys = mask.bool()[:, None, None, :]  # [B, 1, 1, total]
        self.key_positions = torch.arange(mask.shape[1], device=mask.device)

    def _ready(self, allowed: Tensor) -> Tensor:
        if self.kind == "sdpa":
            return allowed
        zeros = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(self.dtype).min)

    def prefill(self, length: int) -> Tensor:
        if self.kind not in ("sdpa", "eager"):
            return self.mask[:, :length]
        queries = self.key_positions[:length, None]
        causal = self.key_positions[None, :] <= queries  # [length, total]
        itself = self.key_positions[None, :] == queries
        return self._ready((self.keys & causal) | itself)

    def decode(self, cursor: int) -> Tensor:
        if self.kind not in ("sdpa", "eager"):
            return self.mask
        allowed = self.keys & (self.key_positions <= cursor)
        return self._ready(allowed)
