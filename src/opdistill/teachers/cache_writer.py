"""Writing a teacher cache (`opdistill cache-teacher`): score the training completions once.

`write_teacher_cache` scores every training example's reference completion with the teacher and
writes Parquet shards of `examples_per_shard` examples plus a `manifest.json` (the format is in
`opdistill.teachers.cache`). Shards are written under a temporary name and renamed when complete,
and the manifest is replaced atomically after each one, so an interrupted run resumes where it
stopped and never leaves a partial shard visible.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from opdistill.batch import chat_prompt, completion_ids, dataset_batch
from opdistill.config import Config, is_served_teacher
from opdistill.errors import OpdistillError
from opdistill.files import atomic_file, fsync_tree, write_atomic
from opdistill.models.loading import (
    check_tokenizers_match,
    load_model,
    load_model_config,
    load_tokenizer,
)
from opdistill.models.tokenizers import tokenizer_fingerprint
from opdistill.prompts import context_window, fit_split
from opdistill.tasks import make_task
from opdistill.tasks.base import Example
from opdistill.teachers.base import ModelTeacher
from opdistill.teachers.cache import (
    COMPRESSION,
    FORMAT,
    MANIFEST,
    SETTINGS,
    VERSION,
    example_key,
    read_manifest,
)


@dataclass
class CacheReport:
    """What `write_teacher_cache` found and wrote."""

    path: Path
    num_examples: int
    num_tokens: int
    total_bytes: int
    shards_written: int
    shards_skipped: int
    seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / max(1, self.num_tokens)

    def summary(self) -> str:
        return (
            f"teacher cache {self.path}: {self.num_examples} examples, {self.num_tokens} tokens, "
            f"{self.total_bytes / 1e6:.2f} MB ({self.bytes_per_token:.1f} bytes per token); "
            f"{self.shards_written} shards written, {self.shards_skipped} already there, "
            f"{self.seconds:.1f} s"
        )


def cache_examples(
    config: Config, tokenizer: PreTrainedTokenizerBase, window: int | None
) -> tuple[list[Example], list[str]]:
    """The training examples as `build_trainer` fits them, and their keys."""
    dc = config.data
    task = make_task(dc.task, **dc.task_args)
    examples = task.examples("train", dc.train_size, seed=dc.seed)
    fit = fit_split(dc, tokenizer, window, examples, "train", config.train.max_new_tokens)
    if fit.too_long:
        print(f"opdistill: {fit.summary('train')}", file=sys.stderr)
    if not fit.examples:
        raise OpdistillError("the training set is empty")
    missing = [e for e in fit.examples if e.completion is None]
    if missing:
        raise OpdistillError(
            "a teacher cache scores the dataset's completions; missing a 'completion' for "
            f"prompt {missing[0].prompt[:40]!r}"
        )
    keys = [
        example_key(chat_prompt(tokenizer, e.prompt), completion_ids(tokenizer, e.completion))
        for e in fit.examples
    ]
    return fit.examples, keys


def write_teacher_cache(
    config: Config,
    output_dir: str | Path,
    k: int,
    batch_size: int = 16,
    temperature: float = 1.0,
    progress: bool = True,
    examples_per_shard: int = 256,
    teacher: str | None = None,
    device: str | torch.device | None = None,
) -> CacheReport:
    """Score the training examples of `config` with its teacher and store the top-k log-probs.

    The tokenizer, the teacher (`teacher`, default `config.model.teacher`) and the prompt fitting
    are those of `build_trainer`, so the keys match the batches training builds. An existing cache
    in `output_dir` with the same settings is completed (its finished shards are kept); one with
    other settings is refused.
    """
    started = time.perf_counter()
    mc = config.model
    spec = teacher or mc.teacher
    if not spec:
        raise OpdistillError("a teacher cache needs a teacher: set model.teacher or pass --teacher")
    if is_served_teacher(spec):
        raise OpdistillError(
            f"cache-teacher loads the teacher in this process; {spec!r} is a served teacher: give "
            "a path, hub id or gguf: spec"
        )
    checks = [
        (k >= 1, f"--top-k must be >= 1, got {k}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (temperature > 0 and math.isfinite(temperature), "--temperature must be > 0"),
        (examples_per_shard >= 1, "--examples-per-shard must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise OpdistillError(message)
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise OpdistillError(f"teacher cache {str(output)!r} is a file, not a directory")

    tokenizer = load_tokenizer(mc.tokenizer or mc.student)
    teacher_tokenizer = load_tokenizer(spec) if mc.tokenizer is None else tokenizer
    check_tokenizers_match(teacher_tokenizer, tokenizer)
    window = context_window(load_model_config(mc.student), load_model_config(spec))
    examples, keys = cache_examples(config, tokenizer, window)
    vocab_size = len(tokenizer)
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "k": min(k, vocab_size),
        "temperature": float(temperature),
        "vocab_size": vocab_size,
        "teacher": spec,
        "dtype": mc.dtype,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "num_examples": len(examples),
        "examples_fingerprint": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        "examples_per_shard": examples_per_shard,
        "context_window": window,
        "logprobs_dtype": "float32",
    }
    shards = _resume(output, settings)
    num_shards = math.ceil(len(examples) / examples_per_shard)
    names = [f"shard-{index:05d}.parquet" for index in range(num_shards)]
    todo = [index for index, name in enumerate(names) if name not in shards]
    skipped = num_shards - len(todo)
    _write_manifest(output, settings, shards, num_shards)

    if todo:
        model = load_model(spec, mc.dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        scorer = ModelTeacher(model.to(device), vocab_size)
        done = sum(info["examples"] for info in shards.values())
        bar = tqdm(
            total=len(examples),
            initial=done,
            desc="cache-teacher",
            unit="ex",
            dynamic_ncols=True,
            disable=not progress,
        )
        for index in todo:
            start = index * examples_per_shard
            chunk = examples[start : start + examples_per_shard]
            chunk_keys = keys[start : start + len(chunk)]
            table = _score_shard(scorer, tokenizer, chunk, chunk_keys, settings, batch_size, bar)
            shards[names[index]] = _write_shard(output, names[index], table)
            _write_manifest(output, settings, shards, num_shards)
        bar.close()

    return CacheReport(
        path=output,
        num_examples=len(examples),
        num_tokens=sum(info["tokens"] for info in shards.values()),
        total_bytes=sum(info["bytes"] for info in shards.values()),
        shards_written=len(todo),
        shards_skipped=skipped,
        seconds=time.perf_counter() - started,
    )


def _resume(output: Path, settings: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The completed shards of an existing cache with the same settings (none for a new one)."""
    manifest_path = output / MANIFEST
    if not manifest_path.exists():
        if output.exists() and any(output.iterdir()):
            raise OpdistillError(
                f"{output} is not empty and holds no teacher cache ({MANIFEST}); "
                "give an empty or new directory"
            )
        output.mkdir(parents=True, exist_ok=True)
        return {}
    manifest = read_manifest(output)
    for key in SETTINGS:
        if manifest.get(key) != settings[key]:
            raise OpdistillError(
                f"teacher cache {output} was built with {key}={_short(manifest.get(key))}, not "
                f"{_short(settings[key])}; resume it with the same settings or write to another "
                "directory"
            )
    for stale in output.glob(".*.tmp"):  # a shard or manifest whose writing was interrupted
        stale.unlink()
    return {
        name: info for name, info in manifest.get("shards", {}).items() if (output / name).is_file()
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "…'"


def _write_manifest(
    output: Path, settings: dict[str, Any], shards: dict[str, dict[str, int]], num_shards: int
) -> None:
    tokens = sum(info["tokens"] for info in shards.values())
    size = sum(info["bytes"] for info in shards.values())
    manifest = {
        **settings,
        "num_shards": num_shards,
        "complete": len(shards) == num_shards,
        "shards": dict(sorted(shards.items())),
        "total_tokens": tokens,
        "total_bytes": size,
        "bytes_per_token": round(size / max(1, tokens), 2),
    }
    write_atomic(output / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _score_shard(
    scorer: ModelTeacher,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    keys: Sequence[str],
    settings: dict[str, Any],
    batch_size: int,
    bar: tqdm,
) -> pa.Table:
    """One shard's rows, in example order (scored in batches of similar length)."""
    k, temperature = settings["k"], settings["temperature"]
    lengths = [len(e.prompt) + len(e.completion or "") for e in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = dataset_batch(tokenizer, [examples[i] for i in chosen])
        top = scorer.topk(batch, k, temperature)
        indices = top.indices.to(torch.int32).cpu().numpy()
        logprobs = top.logprobs.float().cpu().numpy()
        token_logprobs = top.token_logprobs.float().cpu().numpy()
        for row, (i, n) in enumerate(zip(chosen, batch.response_mask.sum(1).tolist(), strict=True)):
            rows[i] = (indices[row, :n], logprobs[row, :n], token_logprobs[row, :n])
        bar.update(len(chosen))
    counts = np.array([len(row[2]) for row in rows], dtype=np.int32)
    if int(counts.sum()) * k >= 2**31:
        raise OpdistillError(
            f"a shard of {len(examples)} examples holds {int(counts.sum())} × {k} values, over "
            "Parquet's list limit; use fewer examples per shard"
        )
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))

    def nested(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
        inner_offsets = pa.array(np.arange(0, values.size + 1, k, dtype=np.int32))
        inner = pa.ListArray.from_arrays(inner_offsets, pa.array(values.reshape(-1), dtype))
        return pa.ListArray.from_arrays(offsets, inner)

    return pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "num_tokens": pa.array(counts, pa.int32()),
            "indices": nested(np.concatenate([row[0] for row in rows]), pa.int32()),
            "logprobs": nested(np.concatenate([row[1] for row in rows]), pa.float32()),
            "token_logprobs": pa.ListArray.from_arrays(
                offsets, pa.array(np.concatenate([row[2] for row in rows]), pa.float32())
            ),
        }
    )


def _write_shard(output: Path, name: str, table: pa.Table) -> dict[str, int]:
    """Write `table` as `output/name`: under a temporary name, flushed, then renamed."""
    with atomic_file(output / name, "wb") as handle:
        pq.write_table(table, handle, compression=COMPRESSION)
    fsync_tree(output, recursive=False)
    return {
        "examples": table.num_rows,
        "tokens": int(table.column("num_tokens").to_numpy().sum()),
        "bytes": (output / name).stat().st_size,
    }
