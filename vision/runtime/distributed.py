"""Data-parallel training when started by ``torchrun``.

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; a plain ``vision train`` sets none and runs
as a world of one, so the rest of the engine asks only ``dist_info()`` and never branches on how it was
started.  gloo on CPU, nccl on CUDA.  Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group ``torchrun`` prepared (idempotent); a world of one otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    if not launched_by_torchrun():
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return dist_info()


def dist_info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """Every rank gets the same verdict (all ranks must skip or take a step together)."""
    if dist_info().enabled:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    info = dist_info()
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist_info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    info = dist_info()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist_info().enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

