"""Writes that a crash cannot leave half-done."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single O_APPEND write, flushed to disk."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A handle on a file beside `path` that is flushed, then renamed over `path` on success."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: written beside it, flushed, then renamed over it."""
    with atomic_file(path) as handle:
        handle.write(text)


def fsync_tree(root: Path, recursive: bool = True) -> None:
    """Flush the files below `root` (and the directories themselves) to disk."""
    paths = [*(root.rglob("*") if recursive else []), root]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def writable(directory: str | Path) -> bool:
    """Whether files can be created in `directory`, or in the nearest existing folder above it
    (tried with a temporary file: permissions, read-only file systems, a file in the way)."""
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=existing):
            return True
    except OSError:
        return False
