"""An offline teacher read from disk: the top-k log-probs of the training completions.

`opdistill cache-teacher` (`opdistill.teachers.cache_writer`) scores every training example's
reference completion once and writes Parquet shards plus a `manifest.json`; `CachedTeacher` reads
them back and answers `topk` for dataset batches, so supervised KD (λ = 0) trains without the
teacher in memory.

Each row of a shard is one example: `key` (a hash of its prompt and response token ids),
`num_tokens`, and per response token the teacher's `k` most probable ids (`indices`, int32, most
probable first), their log-probabilities (`logprobs`, float32, at the cache's temperature,
normalised over the whole vocabulary) and the log-probability of the response token itself
(`token_logprobs`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from opdistill.batch import Batch
from opdistill.errors import OpdistillError
from opdistill.teachers.base import Teacher, TopKLogprobs

FORMAT = "opdistill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
COMPRESSION = "zstd"
# Settings that fix a cache's content: resuming with any other value is refused.
SETTINGS = (
    "format",
    "version",
    "k",
    "temperature",
    "vocab_size",
    "teacher",
    "dtype",
    "tokenizer_fingerprint",
    "num_examples",
    "examples_fingerprint",
    "examples_per_shard",
    "context_window",
)


def example_key(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """A hash of one example's prompt and response token ids (the cache's row key)."""
    digest = hashlib.sha256()
    for ids in (prompt_ids, response_ids):
        array = np.asarray(ids, dtype=np.int64)
        digest.update(np.int64(len(array)).tobytes())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def batch_keys(batch: Batch) -> list[str]:
    """`example_key` of every row of a batch (padding removed)."""
    prompt_ids, prompt_mask = batch.prompt_ids.cpu(), batch.prompt_mask.cpu().bool()
    response_ids, response_mask = batch.response_ids.cpu(), batch.response_mask.cpu().bool()
    return [
        example_key(prompt_ids[row][prompt_mask[row]], response_ids[row][response_mask[row]])
        for row in range(len(prompt_ids))
    ]


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise OpdistillError(f"teacher cache {path}: cannot read {MANIFEST} ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OpdistillError(f"{path / MANIFEST} is not a teacher cache manifest")
    if manifest.get("version") != VERSION:
        raise OpdistillError(
            f"teacher cache {path} has format version {manifest.get('version')}; this opdistill "
            f"reads version {VERSION}: rebuild it with opdistill cache-teacher"
        )
    return manifest


class CachedTeacher(Teacher):
    """A teacher read from a `write_teacher_cache` directory: top-k answers for dataset batches.

    Only batches of the cached examples' reference completions can be scored (supervised KD);
    `topk` takes the first `k` of the cached top-k at the cache's temperature.
    """

    def __init__(self, path: str | Path, vocab_size: int, tokenizer_fingerprint: str | None = None):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise OpdistillError(
                f"model.teacher_cache {str(self.path)!r} holds no {MANIFEST}; write it with "
                "opdistill cache-teacher"
            )
        manifest = read_manifest(self.path)
        if not manifest.get("complete"):
            raise OpdistillError(
                f"teacher cache {self.path} is incomplete ({len(manifest.get('shards', {}))} of "
                f"{manifest.get('num_shards')} shards); run opdistill cache-teacher again to "
                "finish it"
            )
        if manifest["vocab_size"] != vocab_size:
            raise OpdistillError(
                f"teacher cache {self.path} was built for a vocabulary of "
                f"{manifest['vocab_size']} tokens, not {vocab_size}"
            )
        if tokenizer_fingerprint is not None and (
            manifest["tokenizer_fingerprint"] != tokenizer_fingerprint
        ):
            raise OpdistillError(
                f"teacher cache {self.path} was built with another tokenizer (its vocabulary or "
                "special tokens differ from this run's)"
            )
        self.manifest = manifest
        self.k: int = manifest["k"]
        self.temperature: float = manifest["temperature"]
        self.vocab_size = vocab_size
        self._load(sorted(manifest["shards"]))

    def _load(self, names: list[str]) -> None:
        keys, counts, indices, logprobs, token_logprobs = [], [], [], [], []
        for name in names:
            try:
                table = pq.read_table(self.path / name)
            except (OSError, pa.ArrowException) as error:
                raise OpdistillError(
                    f"teacher cache {self.path}: cannot read {name} ({error})"
                ) from None
            count = table.column("num_tokens").to_numpy().astype(np.int64)
            keys.extend(table.column("key").to_pylist())
            counts.append(count)
            indices.append(_flat(table, "indices", 2).reshape(-1, self.k))
            logprobs.append(_flat(table, "logprobs", 2).reshape(-1, self.k))
            token_logprobs.append(_flat(table, "token_logprobs", 1))
            if not len(indices[-1]) == len(logprobs[-1]) == len(token_logprobs[-1]) == count.sum():
                raise OpdistillError(f"teacher cache {self.path}: {name} is inconsistent")
        self.num_tokens = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.num_tokens)])
        self.indices = torch.from_numpy(np.concatenate(indices))  # int32; widened per batch
        self.logprobs = torch.from_numpy(np.concatenate(logprobs))
        self.token_logprobs = torch.from_numpy(np.concatenate(token_logprobs))
        self.rows: dict[str, int] = {}
        for row, key in enumerate(keys):
            self.rows.setdefault(key, row)

    answers = frozenset({"topk"})
    reports_distance = False  # it knows only the dataset's completions

    @property
    def name(self) -> str:
        return f"the teacher cache {self.path}"

    @property
    def context_window(self) -> int | None:
        """The context window the cached prompts were fitted to."""
        return self.manifest.get("context_window")

    def logits(self, batch: Batch) -> Tensor:
        raise OpdistillError(
            f"the teacher cache {self.path} holds top-k log-probs only, not logits: set "
            f"loss.teacher_top_k (at most {self.k})"
        )

    def topk(self, batch: Batch, k: int, temperature: float = 1.0) -> TopKLogprobs:
        """The cached top-k of every row, right-padded to the batch's response width."""
        if k > self.k:
            raise OpdistillError(
                f"loss.teacher_top_k={k} exceeds the k={self.k} of the teacher cache {self.path}; "
                f"lower it or rebuild the cache with --top-k {k}"
            )
        if not math.isclose(temperature, self.temperature, rel_tol=1e-9):
            raise OpdistillError(
                f"the teacher cache {self.path} holds log-probs at temperature {self.temperature}, "
                f"not {temperature}: set loss.temperature={self.temperature} or rebuild the "
                f"cache with --temperature {temperature}"
            )
        size, width = batch.response_ids.shape
        # Padding positions get a uniform answer (finite, never read through the mask).
        result = TopKLogprobs.uniform(size, width, k, self.vocab_size)
        lengths = batch.response_mask.sum(1).tolist()
        for row, (key, length) in enumerate(zip(batch_keys(batch), lengths, strict=True)):
            index = self.rows.get(key)
            if index is None:
                what = (
                    f"the example with prompt {batch.examples[row].prompt[:40]!r}"
                    if row < len(batch.examples)
                    else f"batch row {row}"
                )
                raise OpdistillError(
                    f"{what} is not in the teacher cache {self.path}; was the cache built from "
                    "this config's data?"
                )
            if self.num_tokens[index] != length:
                raise OpdistillError(
                    f"teacher cache {self.path}: row {index} holds {self.num_tokens[index]} "
                    f"tokens, the batch has {length}"
                )
            start, end = self.offsets[index], self.offsets[index + 1]
            result.indices[row, :length] = self.indices[start:end, :k]
            result.logprobs[row, :length] = self.logprobs[start:end, :k]
            result.token_logprobs[row, :length] = self.token_logprobs[start:end]
        return result.to(batch.response_ids.device)


def _flat(table: pa.Table, column: str, depth: int) -> np.ndarray:
    """The values of a (nested) list column, flattened `depth` times, as numpy."""
    values = table.column(column).combine_chunks()
    for _ in range(depth):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False)
