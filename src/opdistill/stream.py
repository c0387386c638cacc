"""The training examples as an endless seeded stream, whose position is part of checkpoints."""

from __future__ import annotations

import random
from collections.abc import Sequence

from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example


class ExampleStream:
    """Endless seeded shuffles of the training examples; `take(n)` returns the next n."""

    def __init__(self, examples: Sequence[Example], seed: int):
        if not examples:
            raise OpdistillError("the training set is empty")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        taken = []
        while len(taken) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            taken.append(self.examples[self._order[self.position]])
            self.position += 1
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
