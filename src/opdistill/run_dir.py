"""Run directories: which one opdistill may replace or resume, and which run holds it.

A run directory holds, besides what the run writes,

    opdistill-run.json   the marker: a run id, written when the run starts. Only a directory
                         with it (or an empty one) is replaced by `--overwrite` or resumed.
    .lock                locked (flock) by the process that writes to the directory, holding
                         its PID; the lock goes with the process, however it ends.
    config.yaml          the run's configuration as it started; a resume never rewrites it
    resumes.jsonl        one line per resume: when, from which step, and which keys changed

The keys in `RESUMABLE` may change when a run resumes (how long it runs, how often it logs,
evaluates and saves, how it is evaluated); any other change defines another run and is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from opdistill.config import Config, config_to_dict, short_repr
from opdistill.errors import OpdistillError
from opdistill.files import append_line, writable, write_atomic

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

MARKER = "opdistill-run.json"
LOCK = ".lock"
CONFIG = "config.yaml"
RESUMES = "resumes.jsonl"

# Keys (or sections, ending in ".") that a resumed run may change.
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.output_dir",  # the directory may have moved
    "model.teacher_timeout",
    "model.teacher_token_env",
    "eval.",
)

_held: dict[Path, tuple[int, int]] = {}  # locks this process holds: path -> (fd, depth)


def is_run(directory: Path) -> bool:
    """Whether `directory` holds a run marker."""
    return (directory / MARKER).is_file()


def contents(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name != LOCK] if directory.is_dir() else []


def _protected(directory: Path, inputs: Iterable[Path]) -> str | None:
    """Why `directory` may never be replaced, or None."""
    resolved = directory.resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root directory"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == Path.cwd().resolve():
        return "it is the current directory"
    if resolved in Path.cwd().resolve().parents:
        return "it holds the current directory"
    for path in inputs:
        target = path.expanduser().resolve()
        if target == resolved or resolved in target.parents:
            return f"it holds the input {str(path)!r}"
    return None


def check_output_dir(
    directory: Path, resume: bool, overwrite: bool, inputs: Iterable[Path] = ()
) -> None:
    """Refuse, before anything loads, an output directory the run may not write or replace."""
    name = str(directory)
    if resume and overwrite:
        raise OpdistillError("--resume and --overwrite exclude each other: pass one of them")
    if directory.exists() and not directory.is_dir():
        raise OpdistillError(f"train.output_dir {name!r} is a file, not a directory")
    if not writable(directory):
        raise OpdistillError(f"train.output_dir {name!r} is not writable")
    if not contents(directory):
        return
    if resume:
        if not is_run(directory):
            raise OpdistillError(
                f"--resume: {name!r} is not an opdistill run (no {MARKER}); refusing to write "
                "into it"
            )
        return
    if not overwrite:
        raise OpdistillError(
            f"output directory {name!r} is not empty: pass --resume to continue the run "
            "there or --overwrite to replace it"
        )
    reason = _protected(directory, inputs)
    if reason:
        raise OpdistillError(f"--overwrite: refusing to replace {name!r}: {reason}")
    if not is_run(directory):
        raise OpdistillError(
            f"--overwrite: {name!r} is not a run opdistill created (no {MARKER}); only a run "
            "directory or an empty one is replaced: delete it yourself or pick another "
            "train.output_dir"
        )


def config_inputs(config: Config, config_path: str | Path | None = None) -> list[Path]:
    """The local files and folders a run reads (config, data, models), which it never deletes."""
    candidates: list[Any] = [config_path, config.model.student, config.model.teacher]
    candidates += [config.model.tokenizer, config.model.teacher_cache]
    candidates += list(config.data.task_args.values())
    inputs = []
    for value in candidates:
        if isinstance(value, str | os.PathLike) and str(value):
            path = Path(value).expanduser()
            if path.exists():
                inputs.append(path)
    return inputs


class RunLock:
    """An exclusive lock on a run directory, re-entrant within this process."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.key = directory.absolute()

    def acquire(self) -> None:
        if self.key in _held:
            fd, depth = _held[self.key]
            _held[self.key] = (fd, depth + 1)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OpdistillError(
                    f"train.output_dir {str(self.directory)!r} is in use by another run "
                    f"(PID {holder}); wait for it to end or pick another train.output_dir"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[self.key] = (fd, 1)

    def release(self) -> None:
        if self.key not in _held:
            return
        fd, depth = _held.pop(self.key)
        if depth > 1:
            _held[self.key] = (fd, depth - 1)
            return
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clear(directory: Path) -> None:
    """Delete what `directory` holds (its lock stays, held by this process)."""
    for path in contents(directory):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def start(directory: Path, config: Config) -> str:
    """Mark `directory` as a new run of `config`; return its run id."""
    run_id = uuid.uuid4().hex
    marker = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(directory / MARKER, json.dumps(marker, indent=1) + "\n")
    write_atomic(directory / CONFIG, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return run_id


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as {"section.key": value}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def resume_changes(directory: Path, config: Config) -> dict[str, list[Any]]:
    """The keys `config` changes against the run in `directory`: {key: [old, new]}.

    Refuses a directory that is not a run, and any change to a key that defines the run.
    """
    name = str(directory)
    if not is_run(directory):
        raise OpdistillError(f"--resume: {name!r} is not an opdistill run (no {MARKER})")
    try:
        saved = yaml.safe_load((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise OpdistillError(f"--resume: {name}/{CONFIG} is missing or unreadable")
    old, new = _flatten(saved), _flatten(config_to_dict(config))
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))}
    changes = {k: pair for k, pair in changes.items() if pair[0] != pair[1]}
    refused = [k for k in changes if not _resumable(k)]
    if refused:
        key = refused[0]
        before, after = (short_repr(v) for v in changes[key])
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])})" if refused[1:] else ""
        raise OpdistillError(
            f"--resume: {key} was {before}, now {after}{more}; these keys define the run "
            f"in {name!r} (on resume only steps, cadences and eval.* may change): "
            "start a new run instead"
        )
    return changes


def record_resume(directory: Path, step: int, changes: dict[str, list[Any]]) -> None:
    """Append the resume (its step and what changed) to `resumes.jsonl`."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "pid": os.getpid()}
    append_line(directory / RESUMES, json.dumps({**record, "changed": changes}, default=str))
