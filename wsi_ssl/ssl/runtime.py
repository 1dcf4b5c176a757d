"""Where and how a pretraining run computes: its device, precision and process group.

The device comes from the project's one resolver (:func:`wsi_ssl.device.resolve_device`).
Under ``torchrun --nproc-per-node N`` a run joins the process group the launcher describes
(gloo on CPUs, NCCL on GPUs); :class:`DistContext` says which process this is, and
:func:`reduce_mean` / :func:`broadcast_buffers` are the two collectives the loop needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from wsi_ssl.errors import ConfigError

__all__ = [
    "AMP_DTYPES",
    "DistContext",
    "broadcast_buffers",
    "init_distributed",
    "reduce_mean",
    "resolve_precision",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtype of each reduced precision (``fp32`` runs without autocast)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 on a GPU that supports it, else fp32; fp16 needs CUDA."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision 'fp16' needs CUDA, the device here is {device.type}; use "
            "precision='bf16' or precision='fp32' (a resumed run may change it)",
            parameters=("precision",),
        )
    return precision


@dataclass(frozen=True)
class DistContext:
    """This process in the run: its rank, the number of processes, its local (GPU) rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``LOCAL_RANK``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, False)
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, True)


def reduce_mean(ctx: DistContext, value: torch.Tensor) -> float:
    """The mean of a scalar tensor over all processes."""
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value.item())


def broadcast_buffers(ctx: DistContext, modules: Iterable[nn.Module]) -> None:
    """Give every rank rank 0's buffers, e.g. BatchNorm statistics (a teacher is not
    DDP-wrapped, and without SyncBatchNorm, which needs CUDA, each rank updates its own)."""
    if ctx.enabled:
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)
