"""Running under torchrun: which rank this is, and the few collective steps saecache needs.

Without torchrun (no WORLD_SIZE, or 1) everything here is a no-op for a single process. Under
`torchrun --nproc-per-node N -m saecache …` ranks split the work (harvest: units of blocks;
train: layers) through torch.distributed — gloo on the CPU, NCCL on GPUs — and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from saecache.core.errors import SaecacheError

T = TypeVar("T")
# Rank 0 tokenises (minutes for 300M tokens) while the others wait at a barrier.
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the torchrun workers."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list[T]) -> list[T]:
        """Round-robin share of ``items`` for this rank."""
        return items[self.rank::self.world]

    def device(self, device: str) -> str:
        """Each rank on its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; every rank raises the same one-line error if it fails."""
        error, result = None, None
        if self.is_main:
            try:
                result = fn()
            except SaecacheError as err:
                error = str(err)
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise SaecacheError(error)
        return result


def ranks() -> Ranks:
    """The torchrun ranks, joining the process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
