"""A replay buffer of student samples (DistiLLM's adaptive off-policy schedule)."""

from __future__ import annotations

import random
from typing import Any

import torch

from opdistill.batch import Batch, example_fields, left_pad, right_pad
from opdistill.tasks.base import Example


class ReplayBuffer:
    """Keeps up to `capacity` sampled sequences, oldest evicted first, and replays random ones."""

    def __init__(self, capacity: int, pad_id: int, seed: int = 0):
        self.capacity = capacity
        self.pad_id = pad_id
        self.rng = random.Random(seed)
        self.rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, batch: Batch) -> None:
        """Store every sequence of `batch` (prompt, response and the sampler's log-probs)."""
        for row in range(batch.response_ids.shape[0]):
            prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
            keep = batch.response_mask[row].bool()
            logprobs = batch.sampler_logprobs
            self.rows.append(
                {
                    "example": batch.examples[row],
                    "prompt": prompt.tolist(),
                    "response": batch.response_ids[row][keep].tolist(),
                    "logprobs": None if logprobs is None else logprobs[row][keep].tolist(),
                }
            )
        del self.rows[: max(0, len(self.rows) - self.capacity)]

    def sample(self, n: int) -> Batch:
        """`n` stored sequences drawn uniformly without replacement, as a batch."""
        rows = self.rng.sample(self.rows, min(n, len(self.rows)))
        prompt_ids, prompt_mask = left_pad([r["prompt"] for r in rows], self.pad_id)
        response_ids, response_mask = right_pad([r["response"] for r in rows], self.pad_id)
        logprobs = None
        if all(r["logprobs"] is not None for r in rows):
            logprobs = torch.zeros(response_ids.shape)
            for i, r in enumerate(rows):
                logprobs[i, : len(r["logprobs"])] = torch.tensor(r["logprobs"])
        examples = [r["example"] for r in rows]
        return Batch(prompt_ids, prompt_mask, response_ids, response_mask, examples, logprobs)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: each row's example as a mapping of its fields."""
        rows = [{**row, "example": example_fields(row["example"])} for row in self.rows]
        return {"rows": rows, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [{**row, "example": Example(**row["example"])} for row in state["rows"]]
        self.rng.setstate(state["rng"])
