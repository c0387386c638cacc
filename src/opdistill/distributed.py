"""Processes: refusing launches accelerate would mis-run, FSDP2 on CPU, global reductions."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from opdistill.errors import OpdistillError


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a multi-process launch that accelerate would run as independent single processes,
    and a DeepSpeed launch on CPU processes, which accelerate 1.15 trains as DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise OpdistillError(
            f"launched as {world} processes, but accelerate found no distributed backend and "
            "would train them independently; without GPUs set ACCELERATE_USE_CPU=1 (gloo), "
            "see docs/scaling.md"
        )
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and accelerator.distributed_type == DistributedType.MULTI_CPU:
        raise OpdistillError(
            "a DeepSpeed launch on CPU processes: accelerate would train them as DDP without "
            "DeepSpeed; on CPUs use DDP or FSDP2 (examples/accelerate/fsdp2_cpu.yaml), see "
            "docs/scaling.md"
        )


def shard_on_cpu(accelerator: Accelerator) -> None:
    """Apply an FSDP launch (`ACCELERATE_USE_FSDP`, set by an FSDP accelerate config) to CPU
    processes joined over gloo.

    accelerate 1.15 marks such processes MULTI_CPU and then ignores the FSDP plugin, training
    them as DDP; torch's FSDP2 (`fully_shard`) runs on CPU over gloo, so the state is switched
    to FSDP before the student is prepared. GPUs take accelerate's own path.
    """
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables of the launch
    if plugin.fsdp_version != 2:
        raise OpdistillError(
            f"fsdp_version: {plugin.fsdp_version} on CPU: only FSDP2 (fsdp_config.fsdp_version: "
            "2) shards over gloo, see docs/scaling.md"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether parameters are sharded across processes (FSDP, DeepSpeed)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def global_sum(accelerator: Accelerator, value: int) -> int:
    """`value` summed over every process."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(value, device=accelerator.device)
    return int(accelerator.reduce(tensor, reduction="sum"))


def global_mean(accelerator: Accelerator, value: float) -> float:
    """`value` averaged over every process (in float64)."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="mean"))


def check_checkpointing(
    accelerator: Accelerator, save_every: int, networks: Mapping[str, torch.nn.Module]
) -> None:
    """Refuse, before any compute, checkpoints of a sharded run whose extra networks (a teacher
    copied from the student) hold sharded parameters: only the student and its optimizer are
    saved sharded (through accelerate)."""
    if not (save_every and is_sharded(accelerator)):
        return
    for name, network in networks.items():
        if any(isinstance(p, DTensor) for p in network.parameters()):
            raise OpdistillError(
                f"train.save_every={save_every}: the teacher's network {name!r} is a sharded "
                "copy of the student, which checkpoints cannot hold (set train.save_every: 0; "
                "final/ is saved), see docs/scaling.md"
            )
