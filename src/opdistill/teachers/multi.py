"""Several teachers in one run: each example routed to one by a field of its `meta`, or scored
by a weighted mixture of their distributions.

Routing: a row whose `meta[field]` (default "teacher": the JSONL `teacher` column, or the
`teacher` of its `data.mix` part) names a teacher is scored by that teacher alone. A row without
the field is scored by the mixture p(y) = Σ_i w_i p_i(y) of `weights` (normalised to sum 1); its
log-probabilities log Σ_i w_i softmax(z_i / τ) serve as its logits. For full logits the mixture is
taken at τ = 1 (the loss then tempers it); top-k and token answers mix the tempered distributions.

Per-teacher statistics of the last `metrics()` call window: the loss and the divergence
(token reverse KL(student‖teacher) for full logits, the sampled estimate log q(y) − log p(y)
otherwise) over each teacher's tokens, and its share of the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from opdistill.batch import Batch
from opdistill.errors import OpdistillError
from opdistill.losses import token_divergence, token_logprobs
from opdistill.tasks.base import Example
from opdistill.teachers.base import Answer, Teacher, TopKLogprobs, topk_from_logits

MIXTURE = "mixture"  # the route of rows without a teacher field


def select_rows(batch: Batch, rows: Sequence[int]) -> Batch:
    """The sub-batch of `rows` (prompt padding kept: positions follow the attention mask)."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.prompt_ids.device)
    logprobs = batch.sampler_logprobs
    return Batch(
        batch.prompt_ids[index],
        batch.prompt_mask[index],
        batch.response_ids[index],
        batch.response_mask[index],
        [batch.examples[i] for i in rows],
        None if logprobs is None else logprobs[index],
    )


class RoutedTeacher(Teacher):
    """Named teachers; see the module docstring for routing, mixing and metrics."""

    def __init__(
        self,
        teachers: Mapping[str, Teacher],
        weights: Mapping[str, float] | None = None,
        field: str = "teacher",
    ):
        if not teachers:
            raise OpdistillError("model.teachers: needs at least one teacher")
        self.teachers = dict(teachers)
        total = sum((weights or {}).values())
        self.weights = {name: w / total for name, w in (weights or {}).items() if w > 0}
        self.field = field
        self._last: tuple[list[str], Tensor | TopKLogprobs] | None = None
        self._sums: dict[str, list[float]] = {}

    @property
    def answers(self) -> frozenset[Answer]:  # type: ignore[override]
        common = frozenset.intersection(*(t.answers for t in self.teachers.values()))
        if self.weights:  # mixtures of top-k answers are not defined; of token log-probs they are
            mixed = frozenset.intersection(*(self.teachers[n].answers for n in self.weights))
            common &= mixed if "logits" in mixed else frozenset({"token_logprobs"})
        return common

    @property
    def reports_distance(self) -> bool:  # type: ignore[override]
        return all(t.reports_distance and "logits" in t.answers for t in self.teachers.values())

    @property
    def name(self) -> str:
        return f"the teachers {', '.join(self.teachers)}"

    @property
    def context_window(self) -> int | None:
        windows = [t.context_window for t in self.teachers.values() if t.context_window]
        return min(windows) if windows else None

    # ------------------------------------------------------------------------------ routing
    def routes(self, examples: Sequence[Example]) -> list[str]:
        """The teacher name of every example, or `MIXTURE` for one without the field."""
        out = []
        for example in examples:
            name = example.meta.get(self.field)
            if name is None:
                if not self.weights:
                    raise OpdistillError(
                        f"example {example.prompt[:40]!r} ({example.meta.get('source', 'task')}) "
                        f"has no {self.field!r} field and model.teacher_weights is empty: name "
                        f"its teacher ({', '.join(self.teachers)}) or give mixture weights"
                    )
                out.append(MIXTURE)
            elif name not in self.teachers:
                raise OpdistillError(
                    f"example {example.prompt[:40]!r} ({example.meta.get('source', 'task')}) "
                    f"names teacher {name!r}, not one of model.teachers "
                    f"({', '.join(self.teachers)})"
                )
            else:
                out.append(str(name))
        return out

    def _answer(
        self,
        batch: Batch,
        ask: Callable[[Teacher, Batch], Tensor | TopKLogprobs],
        mixture: Callable[[Batch], Tensor | TopKLogprobs],
    ) -> Any:
        """Ask each teacher for its rows (the `mixture` for rows without a teacher) and scatter
        the answers back into one for the whole batch."""
        routes = self.routes(batch.examples)
        result: Any = None
        for route in dict.fromkeys(routes):
            rows = [i for i, r in enumerate(routes) if r == route]
            sub = select_rows(batch, rows)
            answer = mixture(sub) if route == MIXTURE else ask(self.teachers[route], sub)
            result = _scatter(result, answer, rows, len(routes), batch.response_ids.device)
        self._last = (routes, result)
        return result

    def _mix(self, logprobs: list[Tensor]) -> Tensor:
        """log Σ_i w_i p_i from each weighted teacher's log-probs."""
        stacked = torch.stack([lp.float().to(logprobs[0].device) for lp in logprobs])
        log_w = torch.tensor([math.log(w) for w in self.weights.values()], device=stacked.device)
        return torch.logsumexp(stacked + log_w.view((-1,) + (1,) * (stacked.dim() - 1)), dim=0)

    def _mixed_logprobs(self, sub: Batch, temperature: float) -> Tensor:
        teachers = [self.teachers[name] for name in self.weights]
        return self._mix(
            [torch.log_softmax(t.logits(sub).float() / temperature, -1) for t in teachers]
        )

    def logits(self, batch: Batch) -> Tensor:
        return self._answer(
            batch, lambda t, sub: t.logits(sub).float(), lambda sub: self._mixed_logprobs(sub, 1.0)
        )

    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs:
        def mixture(sub: Batch) -> TopKLogprobs:
            logprobs = self._mixed_logprobs(sub, temperature)
            return topk_from_logits(logprobs, sub.response_ids.to(logprobs.device), k)

        return self._answer(batch, lambda t, sub: t.topk(sub, k, temperature), mixture)

    def token_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        def mixture(sub: Batch) -> Tensor:
            teachers = [self.teachers[name] for name in self.weights]
            return self._mix([t.token_logprobs(sub, temperature) for t in teachers])

        return self._answer(
            batch, lambda t, sub: t.token_logprobs(sub, temperature).float(), mixture
        )

    # ----------------------------------------------------------------------------- metrics
    def observe(self, batch: Batch, per_token: Tensor, student_logits: Tensor) -> None:
        """Accumulate each teacher's loss and divergence over its rows of the last answer."""
        if self._last is None:
            return
        routes, answer = self._last
        self._last = None
        mask = batch.response_mask.to(per_token.device).float()
        with torch.no_grad():
            if isinstance(answer, Tensor) and answer.dim() == 3:
                divergence = token_divergence(student_logits.detach(), answer, "reverse_kl")
            else:
                teacher_lp = answer.token_logprobs if isinstance(answer, TopKLogprobs) else answer
                student_lp = token_logprobs(student_logits.detach(), batch.response_ids)
                divergence = student_lp - teacher_lp.to(student_lp.device)
            loss_rows = (per_token.detach().float() * mask).sum(-1)
            divergence_rows = (divergence.float().to(mask.device) * mask).sum(-1)
            token_rows = mask.sum(-1)
        for row, route in enumerate(routes):
            sums = self._sums.setdefault(route, [0.0, 0.0, 0.0])
            sums[0] += float(loss_rows[row])
            sums[1] += float(divergence_rows[row])
            sums[2] += float(token_rows[row])

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        total = sum(s[2] for s in self._sums.values())
        for route, (loss, divergence, tokens) in sorted(self._sums.items()):
            if tokens:
                out[f"teacher/{route}/loss"] = loss / tokens
                out[f"teacher/{route}/divergence"] = divergence / tokens
                out[f"teacher/{route}/token_share"] = tokens / total
        self._sums = {}
        return out

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {name: t.state_dict() for name, t in self.teachers.items() if t.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, sub in state.items():
            self.teachers[name].load_state_dict(sub)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {
            f"{name}.{key}": net
            for name, t in self.teachers.items()
            for key, net in t.networks().items()
        }

    def after_optimizer_step(self, student: Any) -> None:
        for teacher in self.teachers.values():
            teacher.after_optimizer_step(student)


def _scatter(
    result: Any, answer: Tensor | TopKLogprobs, rows: list[int], size: int, device: torch.device
) -> Any:
    """Write `answer` (for `rows`) into `result` (for all `size` rows), allocated on first use."""
    index = torch.tensor(rows, dtype=torch.long, device=device)
    if isinstance(answer, TopKLogprobs):
        if result is None:
            width, k = answer.indices.shape[1:]
            result = TopKLogprobs(
                torch.zeros(size, width, k, dtype=torch.long, device=device),
                torch.zeros(size, width, k, dtype=torch.float32, device=device),
                torch.zeros(size, width, dtype=torch.float32, device=device),
            )
        result.indices[index] = answer.indices.to(device)
        result.logprobs[index] = answer.logprobs.float().to(device)
        result.token_logprobs[index] = answer.token_logprobs.float().to(device)
        return result
    if result is None:
        result = torch.zeros((size, *answer.shape[1:]), dtype=torch.float32, device=device)
    result[index] = answer.float().to(device)
    return result


def accuracy_by_teacher(
    examples: Sequence[Example], correct: Sequence[bool] | None, field: str = "teacher"
) -> dict[str, float]:
    """Greedy accuracy over each teacher's examples (`accuracy/NAME`); {} without routing."""
    if not correct:
        return {}
    groups: dict[str, list[bool]] = {}
    for example, ok in zip(examples, correct, strict=True):
        name = example.meta.get(field)
        if name is not None:
            groups.setdefault(str(name), []).append(bool(ok))
    return {f"accuracy/{name}": sum(v) / len(v) for name, v in sorted(groups.items())}
