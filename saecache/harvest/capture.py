"""Forward hooks that copy the chosen blocks' outputs to host memory while the model runs on.

On CUDA each block's output is copied device → pinned host memory on a side stream, so the
copy of block L overlaps the compute of block L+1; ``record_stream`` keeps the caching
allocator from reusing the output's memory before its copy has run. The writer threads wait
on one blocking CUDA event per unit (they sleep, not spin) before they read the host buffer.
Token ids go up through a pinned staging tensor per buffer, asynchronously, so the host queues
the next forward while the GPU runs. On the CPU the same hooks copy synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from saecache.harvest.models import block_output
from saecache.storage import stats


class _StopForward(Exception):
    """Raised by the hook of the last wanted block: the blocks after it need not run."""


@dataclass
class HostBuffer:
    """Host memory for one unit of work (a few blocks of sequences), reused round-robin."""

    resid: torch.Tensor
    """(n_layers, rows, d) float16; pinned when the model is on CUDA."""
    sums: torch.Tensor
    """(n_layers, seqs, d + 4) float32: per-sequence statistics (storage.stats)."""
    ids: torch.Tensor | None = None
    """(seqs, ctx) int32 pinned staging for the unit's token ids on CUDA (None on the CPU)."""
    ready: torch.cuda.Event | None = None
    """Recorded on the copy stream after the unit's last copy (None on the CPU)."""

    @classmethod
    def allocate(cls, n_layers: int, seqs: int, ctx: int, d: int, pin: bool) -> HostBuffer:
        resid = torch.empty((n_layers, seqs * ctx, d), dtype=torch.float16, pin_memory=pin)
        sums = torch.empty((n_layers, seqs, stats.width(d)), dtype=torch.float32, pin_memory=pin)
        ids = torch.empty((seqs, ctx), dtype=torch.int32, pin_memory=True) if pin else None
        return cls(resid, sums, ids)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.resid, self.sums, self.ids) if t is not None)

    def wait(self) -> None:
        """Block the calling (writer) thread until the unit's copies have landed."""
        if self.ready is not None:
            self.ready.synchronize()


class ResidualCapture:
    """Runs a batch through the model and leaves the chosen blocks' outputs in a HostBuffer."""

    def __init__(self, model: nn.Module, blocks_path: str, layers: tuple[int, ...]):
        self.model = model
        self.blocks = model.get_submodule(blocks_path)
        self.layers = layers
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # Blocks past the last wanted one are skipped; the final norm and LM head never run.
        self.stop_at = max(layers) if max(layers) < len(self.blocks) - 1 else None

    def upload(self, tokens: np.ndarray, buffer: HostBuffer) -> torch.Tensor:
        """tokens (S, ctx) int32 → the same ids on the model's device, without a host wait.

        On CUDA they are copied into ``buffer``'s pinned staging tensor and sent with a
        non-blocking copy on the compute stream. The staging tensor is overwritten only after
        the buffer's last ready event: recorded on the copy stream behind the unit's forward,
        it follows the previous upload from it (a no-op wait once the writer has waited).
        """
        ids = torch.from_numpy(tokens)
        if not self.cuda:
            return ids
        buffer.wait()
        staging = buffer.ids[:len(ids)]
        staging.copy_(ids)
        return staging.to(self.device, non_blocking=True)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, buffer: HostBuffer, seq0: int) -> None:
        """Forward input_ids (B, T) and copy each wanted block's output into ``buffer``
        at sequences [seq0, seq0 + B)."""
        handles = [
            self.blocks[layer].register_forward_hook(self._hook(i, layer, buffer, seq0))
            for i, layer in enumerate(self.layers)
        ]
        try:
            self.model.base_model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def finish(self, buffer: HostBuffer) -> None:
        """Mark the unit's copies so writer threads can wait for them (CUDA)."""
        if self.cuda:
            buffer.ready = torch.cuda.Event(blocking=True)  # the writers sleep on it, not spin
            buffer.ready.record(self.copy_stream)

    def _hook(self, index: int, layer: int, buffer: HostBuffer, seq0: int):
        def hook(module, args, output):
            h = block_output(output).to(torch.float16)  # (B, T, d): what the cache stores
            batch, ctx, d = h.shape
            sums = stats.sequence_sums(h)  # (B, d + 4), on the model's device
            rows = buffer.resid[index, seq0 * ctx:(seq0 + batch) * ctx]  # (B·T, d) host view
            self._copy(rows, h.reshape(-1, d), buffer.sums[index, seq0:seq0 + batch], sums)
            if layer == self.stop_at:
                raise _StopForward

        return hook

    def _copy(self, rows, h, sums_dst, sums) -> None:
        if not self.cuda:
            rows.copy_(h)
            sums_dst.copy_(sums)
            return
        # Copy on the side stream once the compute stream has produced h and sums.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            rows.copy_(h, non_blocking=True)  # device → pinned host: a DMA, no CPU work
            sums_dst.copy_(sums, non_blocking=True)
        h.record_stream(self.copy_stream)  # not reused before the copy has run
        sums.record_stream(self.copy_stream)
