"""torchrun: the environment's rank and world size, and the process group (gloo on CPU, NCCL on GPU). Used by
the trainer (DDP) and by `robustlab eval` (ranks take batches round-robin)."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor


class Torchrun:
    """torchrun environment: rank, world size, process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, device: str, connect: bool = True) -> None:
        """connect=False reads the environment only (no process group yet: cheap, and nothing to leave when a
        user error stops the command first)."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if connect and self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (a CPU tensor such as a generator state, under gloo or NCCL alike), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, together: bool = True) -> None:
        """Leave the process group (every rank together; together=False when this rank stops on an error and the
        others may never reach the barrier): a gloo group left to the interpreter's exit can abort the process
        ("terminate called without an active exception")."""
        if self.enabled and torch.distributed.is_initialized():
            if together:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
