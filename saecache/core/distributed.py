"""Running under torchrun: which rank this is, and the few collective steps saecache needs.

Without torchrun (no WORLD_SIZE, or 1) everything here is a no-op for a single process. Under
`torchrun --nproc-per-node N -m saecache …` ranks split the work (harvest: units of blocks;
train: layers) through torch.distributed — gloo on the CPU, NCCL on GPUs — and nothing else.
"""

from __future__ import annotations

import inspect
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
        """Each rank on its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK`` (the device
        :func:`ranks` made current); a GPU named by index is refused under torchrun."""
        if self.world == 1 or not device.startswith("cuda"):
            return device
        if device != "cuda":
            raise SaecacheError(f"--device {device} under torchrun: each rank uses its own GPU, "
                                f"cuda:LOCAL_RANK; pass --device cuda (choose GPUs with "
                                f"CUDA_VISIBLE_DEVICES)")
        return f"cuda:{self.local_rank}"

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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        _join(local_rank)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def _join(local_rank: int) -> None:
    """Join the process group: NCCL on this rank's own GPU when there are GPUs, else gloo.

    NCCL runs its collectives (barrier, broadcast_object_list) on the current device: without
    set_device every rank's would land on cuda:0 and hang or fail there.
    """
    if not torch.cuda.is_available():
        dist.init_process_group("gloo", timeout=TIMEOUT)
        return
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise SaecacheError(f"torchrun started local rank {local_rank} but {gpus} GPU(s) are visible: "
                            f"pass --nproc-per-node {gpus} or fewer")
    torch.cuda.set_device(local_rank)
    bind = {}
    if "device_id" in inspect.signature(dist.init_process_group).parameters:  # newer torch only
        bind["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", timeout=TIMEOUT, **bind)
