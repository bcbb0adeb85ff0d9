"""Data-parallel training under ``torchrun``: one process per device, one code path.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) or inside an initialised
process group, each of the ``world`` processes takes its slice of every global batch
and gradients are averaged by ``DistributedDataParallel``; with a mean loss over
equal slices this is the single-process gradient of the whole batch, so a run gives
the same parameters (up to rounding) on any number of processes. The backend is
``nccl`` on GPU and ``gloo`` on CPU.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "world"]


@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    created: bool = False  # we initialised the process group, so we tear it down

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` when distributed, else itself."""
        if not self.distributed:
            return module
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def shard(self, rows: torch.Tensor, what: str = "batch_size") -> torch.Tensor:
        """This process's slice of a global batch (equal slices)."""
        if not self.distributed:
            return rows
        if len(rows) % self.size:
            raise ValueError(
                f"{what}={len(rows)} must be divisible by the number of processes "
                f"({self.size}) so that every process gets an equal slice"
            )
        per = len(rows) // self.size
        return rows[self.rank * per : (self.rank + 1) * per]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def world(backend: str | None = None) -> World:
    """The current process group, initialising one from the ``torchrun`` environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return World()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), created=True)
