"""Path finding in a small random directed graph: several correct answers per prompt.

After the controlled task of "On-Policy Self-Distillation with Sampled Demonstrations Reduces
Output Diversity": the prompt lists the edges of a directed graph, a start and a goal; any simple
path from start to goal along listed edges is correct. Each instance has between `min_paths` and
`max_paths` planted paths of `path_length` hops (plus any path the distractor edges happen to
create), so the diversity of a model's correct answers can be measured.

Text format (nodes are single capital letters, one token each)::

    prompt:     "path from A to G . edges: A>C C>G A>D D>K B>G ."
    completion: "A C G"
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from opdistill.errors import OpdistillError
from opdistill.tasks.base import Example, Task, check_int, generate_split

LETTERS = string.ascii_uppercase
MAX_SOLUTIONS = 1000  # instances with more simple start->goal paths are redrawn

Edge = tuple[str, str]


def simple_paths(edges: list[Edge], start: str, goal: str, limit: int) -> list[list[str]] | None:
    """All simple paths from `start` to `goal`, or None if there are more than `limit`."""
    succ: dict[str, list[str]] = {}
    for u, v in edges:
        succ.setdefault(u, []).append(v)
    found: list[list[str]] = []

    def walk(path: list[str], on_path: set[str]) -> Iterator[list[str]]:
        for nxt in succ.get(path[-1], ()):
            if nxt == goal:
                yield [*path, nxt]
            elif nxt not in on_path:
                on_path.add(nxt)
                yield from walk([*path, nxt], on_path)
                on_path.discard(nxt)

    for p in walk([start], {start}):
        found.append(p)
        if len(found) > limit:
            return None
    return found


def _reachable(edges: set[Edge], source: str, reverse: bool = False) -> set[str]:
    """Nodes reachable from `source` (or that reach it when `reverse`)."""
    adj: dict[str, list[str]] = {}
    for u, v in edges:
        a, b = (v, u) if reverse else (u, v)
        adj.setdefault(a, []).append(b)
    seen, stack = {source}, [source]
    while stack:
        for nxt in adj.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def parse_path(response: str) -> list[str] | None:
    """The node letters of a response like "A C G", or None if it contains anything else."""
    tokens = response.split()
    if not tokens or any(len(t) != 1 or t not in LETTERS for t in tokens):
        return None
    return tokens


@dataclass
class GraphTask(Task):
    """Find a path from start to goal in a random directed graph with several solutions.

    num_nodes: the graph's nodes are the first `num_nodes` capital letters (2..26); a letter with
        no edge simply doesn't appear.
    path_length: hops of each planted start->goal path.
    min_paths, max_paths: number of planted paths (through distinct intermediate nodes).
    num_distractors: extra edges (dead ends out of start, dead ends into goal, random edges).
    """

    name: ClassVar[str] = "graph"

    num_nodes: int = 12
    path_length: int = 2
    min_paths: int = 2
    max_paths: int = 4
    num_distractors: int = 4

    def __post_init__(self) -> None:
        check_int("num_nodes", self.num_nodes, 2, len(LETTERS))
        check_int("path_length", self.path_length, 1)
        check_int("min_paths", self.min_paths, 1)
        check_int("max_paths", self.max_paths, self.min_paths)
        check_int("num_distractors", self.num_distractors, 0)
        if self.path_length == 1 and self.max_paths > 1:
            raise OpdistillError(
                "max_paths: with path_length 1 there is only one path (the direct edge); "
                "set max_paths to 1 or path_length to 2 or more"
            )
        needed = 2 + self.max_paths * (self.path_length - 1)
        if needed > self.num_nodes:
            raise OpdistillError(
                f"num_nodes: {self.max_paths} paths of {self.path_length} hops need at least "
                f"{needed} nodes, got {self.num_nodes}"
            )

    # -- generation --------------------------------------------------------------------------

    def _make(self, rng: random.Random) -> Example | None:
        nodes = list(LETTERS[: self.num_nodes])  # a fixed alphabet: the first num_nodes letters
        rng.shuffle(nodes)
        start, goal = nodes[0], nodes[1]
        pool = nodes[2:]
        rng.shuffle(pool)
        k = rng.randint(self.min_paths, self.max_paths)
        hops = self.path_length - 1
        planted = [[start, *pool[i * hops : (i + 1) * hops], goal] for i in range(k)]
        free = pool[k * hops :]
        edges: set[Edge] = {(p[i], p[i + 1]) for p in planted for i in range(len(p) - 1)}
        order = sorted(edges)  # set iteration order is not deterministic across processes
        offset = rng.randrange(3)  # distractor kinds take turns, starting at a random one
        for i in range(self.num_distractors):
            edge = self._distractor(rng, (offset + i) % 3, nodes, free, edges)
            if edge is not None:
                edges.add(edge)
                order.append(edge)
        rng.shuffle(order)
        paths = simple_paths(order, start, goal, MAX_SOLUTIONS)
        if paths is None:
            return None
        solutions = sorted(" ".join(p) for p in paths)
        answer = " ".join(rng.choice(planted))
        # The question comes first, so that a causal model reads every edge knowing start and goal.
        edge_list = " ".join(f"{u}>{v}" for u, v in order)
        prompt = f"path from {start} to {goal} . edges: {edge_list} ."
        meta = {"edges": order, "start": start, "goal": goal, "solutions": solutions}
        return Example(prompt=prompt, completion=answer, reference=answer, meta=meta)

    def _distractor(
        self, rng: random.Random, kind: int, nodes: list[str], free: list[str], edges: set[Edge]
    ) -> Edge | None:
        """One new edge: 0 = start -> dead end, 1 = unreachable node -> goal, 2 = random."""
        start, goal = nodes[0], nodes[1]
        if kind == 0:
            reach_goal = _reachable(edges, goal, reverse=True)
            cands = [(start, x) for x in free if x not in reach_goal]
        elif kind == 1:
            from_start = _reachable(edges, start)
            cands = [(x, goal) for x in free if x not in from_start]
        else:
            cands = []
        cands = [e for e in cands if e not in edges]
        if not cands:  # random edge; never into start, out of goal, or start -> goal directly
            cands = [
                (u, v)
                for u in nodes
                for v in nodes
                if u != v and v != start and u != goal and (u, v) != (start, goal)
            ]
            cands = [e for e in cands if e not in edges]
        return rng.choice(cands) if cands else None

    def block_path(self, example: Example, path: str) -> Example | None:
        """The same graph with the last edge of `path` redirected to a dead end.

        `path` (and any other solution through that edge) stops being correct, no new solution
        appears, and the number of edges stays the same (small models notice a missing edge
        more than a moved one). Used to build out-of-distribution prompts whose usual answer is
        unavailable. Returns None when no redirection keeps at least one solution.
        """
        nodes = path.split()
        blocked = (nodes[-2], nodes[-1])
        order = [tuple(e) for e in example.meta["edges"]]
        start, goal = example.meta["start"], example.meta["goal"]
        expected = [s for s in example.meta["solutions"] if f"{blocked[0]} {blocked[1]}" not in s]
        if blocked not in order or not expected:
            return None
        candidates = [n for n in LETTERS[: self.num_nodes] if n not in (start, goal, blocked[0])]
        random.Random(example.prompt).shuffle(candidates)
        for target in candidates:
            if (blocked[0], target) in order:
                continue
            edges = [(blocked[0], target) if e == blocked else e for e in order]
            paths = simple_paths(edges, start, goal, MAX_SOLUTIONS) or []
            solutions = sorted(" ".join(p) for p in paths)
            if solutions == expected:
                edge_list = " ".join(f"{u}>{v}" for u, v in edges)
                return Example(
                    prompt=f"path from {start} to {goal} . edges: {edge_list} .",
                    completion=solutions[0],
                    reference=solutions[0],
                    meta={**example.meta, "edges": edges, "solutions": solutions},
                )
        return None

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct graphs of `split`; eval prompts are a fixed hash-partition of prompts."""
        return generate_split(self.name, self._make, split, n, seed)

    # -- verification ------------------------------------------------------------------------

    def is_correct(self, example: Example, response: str) -> bool:
        """A simple path from start to goal along edges of the graph, written as "A C G"."""
        path = parse_path(response)
        meta = example.meta
        if path is None or len(path) < 2 or path[0] != meta["start"] or path[-1] != meta["goal"]:
            return False
        if len(set(path)) != len(path):
            return False
        edges = {tuple(e) for e in meta["edges"]}
        return all((path[i], path[i + 1]) in edges for i in range(len(path) - 1))

    def solution_key(self, example: Example, response: str) -> str:
        """Canonical "A C G" form of the path (whitespace-normalised text if not a path)."""
        return " ".join(response.split())

    @property
    def has_golden(self) -> bool:
        return True

    def golden_distribution(self, example: Example) -> dict[str, float]:
        """Uniform over every simple start→goal path of the graph (`meta["solutions"]`): no valid
        path is preferred, so a student that drops some of them moves away from it."""
        solutions = example.meta["solutions"]
        return {path: 1.0 / len(solutions) for path in solutions}
