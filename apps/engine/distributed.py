"""torch.distributed set-up for ``torchrun`` (DDP): gloo on CPU, NCCL on CUDA.

A program calls :func:`init_distributed` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) it joins the process group; otherwise it returns a single-process context whose
collectives are no-ops, so the same training code runs both ways. Only the main process
(rank 0) should write files or print progress (:attr:`DistributedContext.is_main`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistributedContext",
    "ShardSampler",
    "init_distributed",
    "resolve_device",
    "unwrap_model",
    "wrap_model",
]


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` picks CUDA (this process's local GPU) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job and which device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks (in place, also returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def reduce_sums(self, sums: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
        """Sum a dict of scalars over all ranks in one collective; returns Python floats.

        Every rank must pass the same keys.
        """
        keys = sorted(sums)
        values = torch.tensor(
            [float(sums[k]) for k in keys], dtype=torch.float64, device=self.device
        )
        self.all_reduce_sum(values)
        return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the ``torchrun`` process group if there is one (env ``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return DistributedContext(rank, world_size, local_rank, resolved)


def wrap_model(model: torch.nn.Module, ctx: DistributedContext) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when running under several processes."""
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Depthwise-conv weight grads come out channels-last on CPU; DDP copies them into its
    # buckets correctly but warns on every run. The copy is cheap for these small tensors.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index starting at ``rank``, in order, without padding.

    For evaluation: unlike ``DistributedSampler`` it never duplicates samples, so counts
    summed over ranks are exact (shards differ in length by at most one).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
