"""Refuse accelerate's checkpoint files that only code-running unpickling could read.

`Accelerator.save_state` writes some state with `torch.save` (optimizer and schedule of
unsharded runs, the RNG states, DeepSpeed's files) and, under FSDP, torch distributed checkpoints
(DCP): tensors in `.distcp` files plus a pickled `.metadata` index and pickled non-tensor
values (such as the optimizer's hyper-parameters). `Accelerator.load_state` reads the `torch.save`
files with `weights_only=True`, but DCP reads its index with `pickle.load` and its non-tensor
values with `torch.load(weights_only=False)`, either of which can run any code; so does DeepSpeed
with its own checkpoint files (`*_model_states.pt`, `*_optim_states.pt`).

`check_loadable` reads every such file first without running code: the DCP index through an
unpickler that only builds DCP's own metadata classes, every non-tensor value and every
`torch.save` file with `torch.load(weights_only=True)`, allowing only the NumPy types
accelerate's RNG states hold and the three plain classes DeepSpeed's ZeRO optimizer state holds
(its loss scaler, ZeRO stage enum and fragment address). A file that needs more is refused
before accelerate or DeepSpeed touches it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as accelerate_load
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from opdistill.errors import OpdistillError

PICKLED_SUFFIXES = (".bin", ".pkl", ".pt")
DCP_INDEX = ".metadata"

_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("pathlib", "PosixPath"): Path,
    ("pathlib", "PurePosixPath"): Path,
    ("collections", "OrderedDict"): dict,
}


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes and dtypes, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        value = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if isinstance(value, type) and value.__module__ == module:
            return value  # its own dataclasses and enums of plain fields
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _refuse(path: Path, why: str) -> OpdistillError:
    return OpdistillError(
        f"checkpoint file {path} {why}: only unpickling could restore it (which can run any "
        "code); refusing to load it"
    )


def read_dcp_index(directory: Path) -> dcp_metadata.Metadata:
    """The `.metadata` index of the DCP checkpoint in `directory`, read without running code."""
    path = directory / DCP_INDEX
    try:
        with open(path, "rb") as handle:
            return _IndexUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        raise _refuse(path, f"holds Python objects ({error})") from None


def check_dcp(directory: Path) -> None:
    """Every non-tensor value of the DCP checkpoint in `directory` reads as plain data."""
    index = read_dcp_index(directory)
    for key, info in index.storage_data.items():
        stored = index.state_dict_metadata.get(key.fqn)
        if not isinstance(stored, dcp_metadata.BytesStorageMetadata):
            continue  # tensors: DCP reads them with weights_only=True
        path = directory / info.relative_path
        if info.transform_descriptors:
            raise _refuse(path, f"holds {key.fqn} transformed ({info.transform_descriptors})")
        with open(path, "rb") as handle:
            handle.seek(info.offset)
            blob = io.BytesIO(handle.read(info.length))
        try:
            torch.load(blob, weights_only=True)
        except pickle.UnpicklingError:
            raise _refuse(path, f"holds {key.fqn} as a Python object") from None


def deepspeed_globals() -> list[type]:
    """The classes of DeepSpeed's ZeRO optimizer state (none without DeepSpeed): plain data
    holders, built from plain fields without calling any other code."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_loadable(directory: Path) -> None:
    """Refuse `directory` (an `Accelerator.save_state` output) if any file needs code to load."""
    for index in sorted(directory.rglob(DCP_INDEX)):
        check_dcp(index.parent)
    pickled = sorted(p for p in directory.rglob("*") if p.suffix in PICKLED_SUFFIXES)
    allowed = deepspeed_globals() if any(p.suffix == ".pt" for p in pickled) else []
    for path in pickled:
        try:
            with torch.serialization.safe_globals(allowed):
                accelerate_load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise _refuse(path, "holds Python objects") from None
