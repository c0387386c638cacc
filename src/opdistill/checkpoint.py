"""Training state on disk: written atomically, the newest N kept, torn or unreadable ones skipped.

A checkpoint `step-NNNNNNNN/` of a single-process or DDP run holds

    model/                       the student (`save_pretrained`; LoRA: its adapters) + tokenizer
    trainer_state.json           {name: state_dict()} of every stateful object (optimizer,
                                 schedules, data position, the RNGs of every process and device,
                                 ...) as plain JSON
    trainer_state.safetensors    the tensors among them (referenced by name from the JSON)
    NAME.safetensors             the weights of each extra network (a frozen or EMA teacher copy)
    COMPLETE                     written last: the step and the SHA-256 of every other file; a
                                 directory without it is torn and never read

A sharded run (FSDP, DeepSpeed) cannot gather its optimizer state on one process cheaply, so its
student, optimizer and schedule go through accelerate instead of `model/`:

    accelerate/                  `Accelerator.save_state`, written by every process: under FSDP
                                 the model and optimizer as torch distributed checkpoints
                                 (`pytorch_model_fsdp_0/`, `optimizer_0/`: one `__RANK_0.distcp`
                                 per process + `.metadata`), whatever `fsdp_state_dict_type` the
                                 launch set; under DeepSpeed its own checkpoint; the schedule
                                 (`scheduler.bin`) and each process's RNGs (`random_states_R.pkl`)
    trainer_state.json/.safetensors, NAME.safetensors, COMPLETE   as above, without the optimizer
                                 and schedule, plus `launch`: the sharding and process count, which
                                 a resume must match

The other state stays in our JSON rather than accelerate's `register_for_checkpointing`, whose
`custom_checkpoint_N.pkl` files accelerate reads with `weights_only=False`. Nothing is unpickled
that needs code: a checkpoint holding a pickle (`trainer_state.pt`, the old format) is read with
`torch.load(weights_only=True)`, and one that needs more than tensors and plain data is refused;
accelerate reads its own `torch.save` files with `weights_only=True`, and the pickled parts of
torch distributed checkpoints are checked without running code before it reads them
(`opdistill.unpickling`). A file whose checksum differs (a bit flip, an edit) makes the
checkpoint unreadable: the one before it is used, with a warning.

It is written as `step-NNNNNNNN.tmp`, flushed to disk, marked complete and renamed into place by
the main process (the shards are written into the staging directory by every process first).
This module knows nothing of the trainer: it takes a directory, the student (and for a whole run
the accelerator), and named objects with `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file, save_file, save_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdistill.distributed import is_sharded
from opdistill.errors import OpdistillError
from opdistill.files import fsync_tree
from opdistill.models.lora import is_lora, load_adapter_weights, save_merged, weights_file
from opdistill.unpickling import check_loadable

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
PICKLED_STATE_FILE = "trainer_state.pt"  # the old format: read with weights_only=True only
MODEL_DIR = "model"
ACCELERATE_DIR = "accelerate"  # sharded runs: `Accelerator.save_state` (model, optimizer, ...)
LAUNCH = "launch"  # sharded runs: the sharding and process count that wrote the checkpoint
T = TypeVar("T")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomState:
    """Every random number generator of a run, as one plain-data state (ints, lists, tensors).

    Per process: Python's, NumPy's and torch's global generators, torch's generator on every
    CUDA (and MPS) device, and the named private `generators`. In a multi-process run every
    process draws its own numbers (`seed` offsets the seed by the process index), so a checkpoint
    holds one state per process: `gather` collects them on every process before the main process
    saves, and `load_state_dict` gives each process its own.
    """

    def __init__(
        self,
        generators: Mapping[str, random.Random | torch.Generator] | None = None,
        *,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.generators = dict(generators or {})
        self.process_index = process_index
        self.num_processes = num_processes
        self._gathered: list[dict[str, Any]] | None = None

    @staticmethod
    def seed(seed: int, process_index: int = 0) -> int:
        """Seed every global generator (all devices) of this process with `seed` + its index."""
        process_seed = seed + process_index
        set_seed(process_seed)
        return process_seed

    def local_state(self) -> dict[str, Any]:
        """This process's generators as plain data."""
        version, state, gauss = random.getstate()
        name, keys, position, has_gauss, cached = np.random.get_state()
        return {
            "python": [version, list(state), gauss],
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "mps": [torch.mps.get_rng_state()] if torch.backends.mps.is_available() else [],
            "generators": {
                name: _generator_state(generator) for name, generator in self.generators.items()
            },
        }

    def gather(self) -> None:
        """Collect every process's state (call on every process before saving)."""
        local = self.local_state()
        if self.num_processes == 1:
            self._gathered = [local]
            return
        self._gathered = list(gather_object([local]))

    def state_dict(self) -> dict[str, Any]:
        processes = self._gathered if self._gathered is not None else [self.local_state()]
        self._gathered = None
        return {"processes": processes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        processes = state.get("processes", [state])  # older checkpoints: one process
        if len(processes) != self.num_processes:
            warnings.warn(
                f"the checkpoint holds the random state of {len(processes)} processes and this "
                f"run has {self.num_processes}: processes without a saved state keep their seed",
                stacklevel=2,
            )
        if self.process_index >= len(processes):
            return
        saved = processes[self.process_index]
        version, python_state, gauss = saved["python"]
        random.setstate((version, tuple(python_state), gauss))
        name, keys, position, has_gauss, cached = saved["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(saved["torch"])
        cuda = saved.get("cuda", [])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        mps = saved.get("mps", [])
        if mps and torch.backends.mps.is_available():
            torch.mps.set_rng_state(mps[0])
        for name, generator in self.generators.items():
            saved_generator = saved["generators"][name]
            if isinstance(generator, random.Random):
                version, inner, gauss = saved_generator
                generator.setstate((version, tuple(inner), gauss))
            else:
                generator.set_state(saved_generator)


def _generator_state(generator: random.Random | torch.Generator) -> Any:
    if isinstance(generator, random.Random):
        version, state, gauss = generator.getstate()
        return [version, list(state), gauss]
    return generator.get_state()


@contextmanager
def forked_rng() -> Iterator[None]:
    """Within the block the global generators of the CPU and of every CUDA device may be reseeded
    and used; on leaving, all of them are as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


class Checkpoints:
    """The checkpoints under `directory`, of which the newest `keep` are kept (0: all)."""

    def __init__(self, directory: str | Path, keep: int = 0):
        self.directory = Path(directory)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def save(
        self,
        step: int,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        state: Mapping[str, Stateful],
        networks: Mapping[str, torch.nn.Module] | None = None,
    ) -> Path:
        """Write the unsharded checkpoint of `step` (call on one process only)."""
        final, staging = self._stage(step)
        model.save_pretrained(staging / MODEL_DIR)
        tokenizer.save_pretrained(staging / MODEL_DIR)
        write_state(staging, step, state, networks)
        self._seal(step, staging, final)
        return final

    def save_run(
        self,
        accelerator: Accelerator,
        step: int,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        state: Mapping[str, Stateful],
        networks: Mapping[str, torch.nn.Module] | None = None,
    ) -> Path:
        """Every process: the checkpoint of `step` of the prepared `model`, written by the main
        process (unsharded) or by every process through `Accelerator.save_state` (sharded)."""
        accelerator.wait_for_everyone()
        for obj in state.values():
            if isinstance(obj, RandomState):
                obj.gather()  # every process's RNG state, on every process
        if not is_sharded(accelerator):
            if accelerator.is_main_process:
                self.save(step, accelerator.unwrap_model(model), tokenizer, state, networks)
            accelerator.wait_for_everyone()
            return self.path(step)
        final, staging = self._stage(step, create=accelerator.is_main_process)
        accelerator.wait_for_everyone()
        with sharded_state_dicts(accelerator):  # model and optimizer: one shard per process
            accelerator.save_state(str(staging / ACCELERATE_DIR))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            own = {name: obj for name, obj in state.items() if not is_prepared(obj)}
            write_state(staging, step, own, networks, launch_of(accelerator))
            self._seal(step, staging, final)
        accelerator.wait_for_everyone()
        return self.path(step)

    def _stage(self, step: int, create: bool = True) -> tuple[Path, Path]:
        """The checkpoint of `step` and its staging directory (created empty by one process)."""
        final = self.path(step)
        staging = final.with_name(final.name + ".tmp")
        if create:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        return final, staging

    def _seal(self, step: int, staging: Path, final: Path) -> None:
        """Flush, mark complete with every file's checksum, rename into place, drop old ones."""
        fsync_tree(staging)  # contents on disk before the marker makes them visible
        marker = {"step": step, "sha256": checksums(staging)}
        (staging / COMPLETE).write_text(json.dumps(marker, indent=1))
        fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        fsync_tree(self.directory, recursive=False)
        for old in self.complete()[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Checkpoints whose writing finished, oldest first (a torn one has no marker)."""
        return sorted(
            p for p in self.directory.glob("step-*") if p.is_dir() and (p / COMPLETE).exists()
        )

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def restore_latest(
        self,
        model: PreTrainedModel,
        state: Mapping[str, Stateful],
        networks: Mapping[str, torch.nn.Module] | None = None,
    ) -> tuple[Path, int] | None:
        """Restore the newest readable unsharded checkpoint into the given objects; None when
        there is none.

        A checkpoint whose files cannot be read (truncated, corrupted, a checksum that differs)
        is skipped with a warning in favour of the one before it; one that needs unpickling, or
        one of a sharded run, is refused. Returns the checkpoint and its step.
        """
        networks = networks or {}

        def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
            saved = read_state(path)
            check_same_launch(path, saved.get(LAUNCH), None)
            weights = load_file(str(path / MODEL_DIR / weights_file(model)))
            copies = {name: load_file(str(path / f"{name}.safetensors")) for name in networks}
            return saved, weights, copies

        found = self._newest_readable(read)
        if found is None:
            return None
        path, (saved, weights, copies) = found
        if is_lora(model):
            load_adapter_weights(model, weights, path)
        else:
            load_weights(model, weights, path)
        for name, network in networks.items():
            load_weights(network, copies[name], path)
        for name, obj in state.items():
            obj.load_state_dict(saved[name])
        return path, int(saved["step"])

    def restore_run(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        state: Mapping[str, Stateful],
        networks: Mapping[str, torch.nn.Module] | None = None,
    ) -> tuple[Path, int] | None:
        """Every process: restore the newest readable checkpoint into the prepared `model` and
        the given objects (sharded: through `Accelerator.load_state`); see `restore_latest`."""
        if not is_sharded(accelerator):
            return self.restore_latest(accelerator.unwrap_model(model), state, networks)
        networks = networks or {}
        launch = launch_of(accelerator)

        def read(path: Path) -> None:
            check_same_launch(path, read_state(path).get(LAUNCH), launch)
            check_loadable(path / ACCELERATE_DIR)
            for name in networks:
                load_file(str(path / f"{name}.safetensors"))

        chosen: list[tuple[str | None, str | None]] = [(None, None)]
        if accelerator.is_main_process:  # checks the files once; every process reads the choice
            try:
                found = self._newest_readable(read)
                chosen = [(str(found[0]) if found else None, None)]
            except OpdistillError as error:
                chosen = [(None, str(error))]
        (name, error), *_ = broadcast_object_list(chosen)
        if error is not None:
            raise OpdistillError(error)
        if name is None:
            return None
        path = Path(name)
        with sharded_state_dicts(accelerator):
            accelerator.load_state(str(path / ACCELERATE_DIR))
        saved = read_state(path)
        for network_name, network in networks.items():
            load_weights(network, load_file(str(path / f"{network_name}.safetensors")), path)
        for state_name, obj in state.items():
            if not is_prepared(obj):
                obj.load_state_dict(saved[state_name])
        return path, int(saved["step"])

    def _newest_readable(self, read: Callable[[Path], T]) -> tuple[Path, T] | None:
        """The newest complete checkpoint whose checksums match and that `read` reads, with what
        it read; an unreadable one is skipped with a warning, an `OpdistillError` raised."""
        for path in reversed(self.complete()):
            try:
                verify_checksums(path)
                return path, read(path)
            except OpdistillError:
                raise
            except Exception as error:  # any unreadable file: fall back to an older checkpoint
                warnings.warn(
                    f"checkpoint {path} is unreadable ({type(error).__name__}: "
                    f"{str(error)[:80]}); trying the one before it",
                    stacklevel=3,
                )
        return None


def is_prepared(obj: object) -> bool:
    """Whether `obj` is an optimizer or schedule prepared by accelerate (which saves it)."""
    return isinstance(obj, AcceleratedOptimizer | AcceleratedScheduler)


def launch_of(accelerator: Accelerator) -> dict[str, Any]:
    """What a sharded checkpoint needs to be restored: the sharding and the process count."""
    return {
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
    }


def check_same_launch(
    path: Path, saved: Mapping[str, Any] | None, launch: Mapping[str, Any] | None
) -> None:
    """Refuse to resume a sharded checkpoint in another launch, or an unsharded one sharded."""
    if saved == launch:
        return

    def describe(launch: Mapping[str, Any] | None) -> str:
        if launch is None:
            return "unsharded state (one process or DDP)"
        processes, sharding = launch["num_processes"], launch["distributed_type"]
        return f"the sharded state of {processes} {sharding} processes"

    raise OpdistillError(
        f"--resume: checkpoint {path} holds {describe(saved)} and this launch needs "
        f"{describe(launch)}; resume with the launch that wrote it, see docs/scaling.md"
    )


@contextmanager
def sharded_state_dicts(accelerator: Accelerator) -> Iterator[None]:
    """Within the block accelerate saves and loads FSDP state sharded (torch distributed
    checkpoint, one file per process), whatever `fsdp_state_dict_type` the launch set."""
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    plugin = accelerator.state.fsdp_plugin
    kept = plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = kept


def write_state(
    directory: Path,
    step: int,
    state: Mapping[str, Stateful],
    networks: Mapping[str, torch.nn.Module] | None = None,
    launch: Mapping[str, Any] | None = None,
) -> None:
    """The objects' states as JSON + safetensors, and each network's weights, in `directory`."""
    tensors: dict[str, torch.Tensor] = {}
    states = {name: obj.state_dict() for name, obj in state.items()}
    plain = to_plain({"step": step, **({LAUNCH: launch} if launch else {}), **states}, tensors)
    (directory / STATE_FILE).write_text(json.dumps(plain))
    save_file(tensors, str(directory / STATE_TENSORS))
    for name, network in (networks or {}).items():
        save_model(network, str(directory / f"{name}.safetensors"))


def checksums(directory: Path) -> dict[str, str]:
    """The SHA-256 of every file below `directory` (but the marker), by relative path."""
    sums = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETE):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        sums[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return sums


class ChecksumMismatch(Exception):
    """A checkpoint file differs from what its completion marker recorded."""


def verify_checksums(path: Path) -> None:
    """Compare the checkpoint's files with its marker (an old marker holds only the step)."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except ValueError:
        marker = None
    if not isinstance(marker, dict):
        return  # the old format: a bare step number, no checksums to compare
    recorded = marker.get("sha256")
    if not isinstance(recorded, dict):
        raise ChecksumMismatch("the completion marker holds no checksums")
    actual = checksums(path)
    changed = sorted(
        set(recorded) ^ set(actual) | {f for f in recorded if recorded[f] != actual.get(f)}
    )
    if changed:
        raise ChecksumMismatch(f"{changed[0]} differs from its checksum")


def read_state(path: Path) -> dict[str, Any]:
    """The saved training state: JSON + tensors, or an old pickle holding only plain data."""
    if not (path / STATE_FILE).exists() and (path / PICKLED_STATE_FILE).exists():
        try:
            return torch.load(path / PICKLED_STATE_FILE, weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights only" not in str(error).lower():
                raise
            raise OpdistillError(
                f"checkpoint {path / PICKLED_STATE_FILE} holds Python objects that only "
                "unpickling could restore (which can run any code); refusing to load it"
            ) from None
    tensors = load_file(str(path / STATE_TENSORS))
    return from_plain(json.loads((path / STATE_FILE).read_text()), tensors)


def to_plain(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """`value` as JSON-ready data; its tensors move to `tensors`, referenced by name."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [to_plain(v, tensors, where) for v in value]}
    if isinstance(value, list):
        return [to_plain(v, tensors, where) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: to_plain(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            "__items__": [
                [to_plain(k, tensors, where), to_plain(v, tensors, f"{where}.{k}")]
                for k, v in value.items()
            ]
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a checkpoint")


def from_plain(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of `to_plain`."""
    if isinstance(value, list):
        return [from_plain(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=value["dtype"])
    if "__tuple__" in value:
        return tuple(from_plain(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {from_plain(k, tensors): from_plain(v, tensors) for k, v in value["__items__"]}
    return {k: from_plain(v, tensors) for k, v in value.items()}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's weights; either side of a pair of tied weights may be absent."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # size mismatch: another architecture
        detail = next((ln.strip() for ln in str(error).splitlines() if "size mismatch" in ln), "")
        raise OpdistillError(
            f"checkpoint {path} does not match the student model ({detail[:160]})"
        ) from None
    tied_pairs = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(tied_pairs) | set(tied_pairs.values()) if isinstance(tied_pairs, dict) else set()
    real_missing = [k for k in missing if k not in tied]
    if unexpected or (real_missing and "lm_head.weight" not in real_missing):
        raise OpdistillError(f"checkpoint {path} does not match the student model")


def save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
) -> Path:
    """The trained model (the prepared `model`, unwrapped) and its tokenizer at `path`, as a full,
    unsharded `save_pretrained` directory written by the main process; every process calls this,
    since sharded (FSDP) parameters are gathered first. A LoRA model is saved merged (a plain
    causal LM), with its adapters in `path/adapter`."""
    student = accelerator.unwrap_model(model)
    state_dict = None
    if accelerator.distributed_type == DistributedType.FSDP:
        # gathered copies share no storage: drop the tied aliases (lm_head)
        state_dict = accelerator.get_state_dict(model)
        for alias in getattr(student, "all_tied_weights_keys", {}):
            state_dict.pop(alias, None)
    if accelerator.is_main_process:
        if is_lora(student):
            student.save_pretrained(path / "adapter", state_dict=state_dict)
            save_merged(student, path)
        else:
            student.save_pretrained(path, state_dict=state_dict)
        tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()
    return path
