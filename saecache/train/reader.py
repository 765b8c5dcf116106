"""Stage two's data: one layer's cached residual rows served as shuffled training batches.

The batch order is fixed by a :class:`Plan` that depends only on the cache layout, the layer
and the reader settings (seed, batch size, mixing), so a sister run trained later sees the
same batches, and a resumed run restarts at any batch index.

- Held out: the last blocks of the cache (:func:`split_blocks`) are never trained on.
- Chunk order: the training blocks (one chunk each) in a seeded random order.
- Mixing: consecutive groups of ``mix_chunks`` chunks are loaded together and their rows
  permuted (a shuffle buffer of ``mix_chunks`` chunks); each group yields
  ``rows // batch_size`` batches, the remainder is dropped.

:class:`PlainReader` is the obvious reference (zarr reads, numpy shuffle). :class:`PrefetchReader`
yields bitwise the same batches: worker threads read chunk files ahead of the consumer into
(pinned) host buffers, one copy per group moves the rows to the device on a side stream, and
the permutation is applied on the device.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import NamedTuple

import numpy as np
import torch
import zarr

from saecache.core.errors import SaecacheError
from saecache.storage.cache import Cache
from saecache.storage.chunks import chunk_file, chunk_name, read_chunk, read_chunk_zarr
from saecache.storage.layout import CacheLayout
from saecache.train.config import ReaderConfig


# ----------------------------------------------------------------------------- held-out split


def n_heldout_blocks(layout: CacheLayout, holdout_fraction: float) -> int:
    """max(1, ceil(n_blocks * fraction)); the product is rounded first so 100 * 0.07 is 7."""
    return max(1, math.ceil(round(layout.n_blocks * holdout_fraction, 9)))


def split_blocks(layout: CacheLayout, holdout_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(train_blocks, heldout_blocks), int64: the last blocks are held out.

    The held-out blocks always include the last block, so a short last block is never
    trained on and every training block fills a whole chunk.
    """
    n_held = n_heldout_blocks(layout, holdout_fraction)
    if n_held >= layout.n_blocks:
        raise SaecacheError(
            f"a cache of {layout.n_blocks} block(s) leaves no training block after holding out "
            f"{n_held} (holdout fraction {holdout_fraction}): harvest more tokens or use "
            "smaller blocks (--chunk-rows)"
        )
    blocks = np.arange(layout.n_blocks, dtype=np.int64)
    return blocks[:-n_held], blocks[-n_held:]


def heldout_seqs(layout: CacheLayout, holdout_fraction: float = 0.01) -> range:
    """The held-out sequence indices (their tokens are what evaluation reads)."""
    _, held = split_blocks(layout, holdout_fraction)
    return range(layout.block_seqs(int(held[0])).start, layout.n_seq)


# ----------------------------------------------------------------------------- the plan


class Plan:
    """The fixed order of one pass over a layer's training rows.

    Depends only on (layout, layer, cfg.seed, cfg.batch_size, cfg.mix_chunks,
    cfg.holdout_fraction): chunk order ``default_rng([seed, layer]).permutation(train_blocks)``,
    cut into consecutive groups of ``mix_chunks`` chunks (the last may be smaller); group g's
    rows, concatenated in that order, are permuted by :meth:`permutation` and cut into
    ``rows // batch_size`` batches, the remainder dropped.
    """

    def __init__(self, layout: CacheLayout, layer: int, cfg: ReaderConfig):
        self.layer, self.batch_size, self.seed = layer, cfg.batch_size, cfg.seed
        train, _ = split_blocks(layout, cfg.holdout_fraction)
        order = np.random.default_rng([cfg.seed, layer]).permutation(train)  # (n_train,)
        self.groups: list[list[int]] = [[int(b) for b in order[i:i + cfg.mix_chunks]]
                                        for i in range(0, len(order), cfg.mix_chunks)]
        """Blocks (= chunks) of each group, in reading order."""
        self.group_rows: list[int] = [sum(_n_rows(layout.block_rows(b)) for b in group)
                                      for group in self.groups]
        """Rows in each group."""
        self.batches_per_group: list[int] = [n // cfg.batch_size for n in self.group_rows]
        """``group_rows // batch_size``: the rows left over are dropped."""

    @property
    def n_batches(self) -> int:
        return sum(self.batches_per_group)

    @property
    def n_tokens(self) -> int:
        """Training rows one pass yields (the dropped remainders excluded)."""
        return self.n_batches * self.batch_size

    def permutation(self, group: int) -> np.ndarray:
        """(group_rows[group],) int64: batch o of the group is rows perm[o*B:(o+1)*B] of the
        group's rows concatenated in block order."""
        rng = np.random.default_rng([self.seed, self.layer, group])
        return rng.permutation(self.group_rows[group])

    def locate(self, batch_index: int) -> tuple[int, int]:
        """(group, batch offset within that group) of a batch of the pass."""
        if not 0 <= batch_index < self.n_batches:
            raise IndexError(f"batch {batch_index} is outside this pass of {self.n_batches} batches")
        starts = np.cumsum([0] + self.batches_per_group)  # (n_groups + 1,)
        # side="right" skips groups with no batch: they share their start with the next group
        group = int(np.searchsorted(starts, batch_index, side="right")) - 1
        return group, batch_index - int(starts[group])

    def groups_from(self, start_batch: int) -> tuple[list[int], int]:
        """(groups to read, batch offset in the first) for a pass starting at ``start_batch``;
        groups with no batch are left out so they are never read."""
        if start_batch == self.n_batches:
            return [], 0
        first, offset = self.locate(start_batch)
        todo = [g for g in range(first, len(self.groups)) if self.batches_per_group[g] > 0]
        return todo, offset


def _n_rows(rows: slice) -> int:
    return rows.stop - rows.start


# ----------------------------------------------------------------------------- opening a layer


def layer_array(cache: Cache, layer: int) -> zarr.Array:
    """The ``resid/LL`` array of a complete cache; one-line error otherwise."""
    layers = list(cache.layout.layers)
    if layer not in layers:
        raise SaecacheError(f"cache at {cache.location} has no layer {layer}: "
                            f"it holds layers {', '.join(map(str, layers))}")
    if not cache.complete:
        raise SaecacheError(f"cache at {cache.location} is not complete: finish its harvest "
                            "(re-run saecache harvest with the same arguments) before training")
    return cache.resid(layer)


def read_heldout(cache: Cache, layer: int, cfg: ReaderConfig, max_rows: int | None = None) -> torch.Tensor:
    """(min(max_rows, held-out rows), d) float16 CPU: the first rows of the held-out blocks."""
    arr = layer_array(cache, layer)
    lay = cache.layout
    _, held = split_blocks(lay, cfg.holdout_fraction)
    start = lay.block_rows(int(held[0])).start
    stop = lay.n_tokens if max_rows is None else min(lay.n_tokens, start + max_rows)
    # through zarr: the cache's store (storage.chunks.CheckedStore) refuses, naming it, a
    # held-out chunk that is missing (zarr would give zeros), the wrong size or corrupt
    return torch.from_numpy(arr[start:stop])


# ----------------------------------------------------------------------------- both readers


class Reader:
    """What both readers share: one layer's array and the :class:`Plan` of a pass over it,
    the counters, and use as an iterable and a context manager.

    Counters (over the reader's life): ``bytes_read`` (stored bytes of the chunks read),
    ``wait_seconds`` (time the consumer waited for data), ``batches`` (batches yielded).
    """

    def __init__(self, cache: Cache, layer: int, cfg: ReaderConfig = ReaderConfig()):
        self.arr = layer_array(cache, layer)
        self.layout = cache.layout
        self.cfg = cfg
        self.plan = Plan(self.layout, layer, cfg)
        self.bytes_read = 0
        self.wait_seconds = 0.0
        self.batches = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter()

    def iter(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """(B, d) float16 batches from batch ``start_batch`` of the pass."""
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release unless a reader says otherwise; here so both are used the same way."""

    def __enter__(self):  # -> the reader itself
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- the reference


class PlainReader(Reader):
    """The obvious reader: each group's chunks read through zarr, shuffled with numpy.

    Slow, and the reference the fast reader is tested against. Yields (B, d) float16 CPU
    tensors in plan order; ``iter(start_batch)`` starts anywhere in the pass.
    """

    def iter(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """(B, d) float16 CPU batches from batch ``start_batch`` of the pass; earlier groups
        are skipped without being read."""
        todo, offset = self.plan.groups_from(start_batch)  # checks start_batch now, not lazily
        return self._pass(todo, offset)

    def _pass(self, todo: list[int], offset: int) -> Iterator[torch.Tensor]:
        batch = self.cfg.batch_size
        for i, group in enumerate(todo):
            t0 = time.perf_counter()
            rows = self.read_group(group)  # (group_rows, d)
            self.wait_seconds += time.perf_counter() - t0
            perm = self.plan.permutation(group)  # (group_rows,)
            for o in range(offset if i == 0 else 0, self.plan.batches_per_group[group]):
                self.batches += 1
                yield torch.from_numpy(rows[perm[o * batch:(o + 1) * batch]])  # (B, d)

    def read_group(self, group: int) -> np.ndarray:
        """(group_rows, d) float16: a group's rows, its chunks in plan order."""
        parts = []
        for block in self.plan.groups[group]:
            rows = self.layout.block_rows(block)
            out = np.empty((_n_rows(rows), self.layout.d), dtype=np.float16)  # (rows_per_block, d)
            self.bytes_read += read_chunk_zarr(self.arr, block, rows, out, chunk_name(self.arr, block))
            parts.append(out)
        return np.concatenate(parts)


# ----------------------------------------------------------------------------- the fast path


class _Staged(NamedTuple):
    """One group's rows on the device, ready to be cut into batches."""

    group: int
    rows: torch.Tensor
    """(group_rows, d) float16 on the device."""
    perm: torch.Tensor
    """(group_rows,) int64 on the device."""
    ready: torch.cuda.Event | None
    """Recorded after the copies on the side stream (CUDA); the consumer's stream waits on it."""


def copy_event() -> torch.cuda.Event:
    """The event recorded after a group's copies. Blocking: a worker that waits on it before
    refilling the buffer (``.synchronize()``) sleeps until the copy ends, where a default
    event would spin a CPU core for the whole copy; the consumer's stream waits on it alike."""
    return torch.cuda.Event(blocking=True)


class StagingRing:
    """The host side of :class:`PrefetchReader`: a ring of host buffers, one group each, and
    the move of a filled buffer onto the device.

    ``slots`` buffers of (rows, d) float16, allocated on first use and pinned when the device
    is CUDA. The ``i``-th group of a pass goes into slot ``i % slots``; before a worker writes
    a buffer again it waits for the copy of the group that was in it before (:meth:`slot`).
    """

    def __init__(self, slots: int, rows: int, d: int, device: torch.device):
        self.slots, self.shape, self.device = slots, (rows, d), device
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None
        self._buffers: list[torch.Tensor] = []  # the ring, allocated on first use
        self._copied: list[torch.cuda.Event | None] = [None] * slots

    def consumer_stream(self) -> torch.cuda.Stream | None:
        """The stream batches are made on: the current one (CUDA), else None."""
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def slot(self, i: int) -> tuple[int, torch.Tensor, torch.cuda.Event | None]:
        """(slot, its host buffer, the event of the last copy out of it) for the ``i``-th group
        of a pass."""
        if not self._buffers:
            # Pinned (page-locked) host memory lets the copy to the GPU run asynchronously, by
            # DMA, at full speed (55 GB/s on an H200 against 14 GB/s from pageable memory).
            self._buffers = [torch.empty(self.shape, dtype=torch.float16, pin_memory=self.cuda)
                             for _ in range(self.slots)]  # (mix_chunks * rows_per_block, d) each
        slot = i % self.slots
        return slot, self._buffers[slot], self._copied[slot]

    def stage(self, group: int, slot: int, host: torch.Tensor, perm: torch.Tensor, consumer) -> _Staged:
        """Put a filled buffer's rows ``host`` (group_rows, d) and the group's permutation
        ``perm`` (group_rows,) int64 on the device."""
        if not self.cuda:  # CPU: the host buffer is the device copy; batches are gathered out of it
            return _Staged(group, host.to(self.device), perm, None)
        with torch.cuda.device(self.device), torch.cuda.stream(self._side):
            # Copies on a side stream overlap the consumer's kernels; non_blocking from pinned
            # memory returns at once (the perm is pinned too, so its copy is async as well).
            rows = host.to(self.device, non_blocking=True)  # (group_rows, d)
            perm = perm.pin_memory().to(self.device, non_blocking=True)  # (group_rows,)
            ready = copy_event()
            ready.record(self._side)
        # Allocated on the side stream but used on the consumer's: without record_stream the
        # caching allocator could hand the memory out again while consumer kernels still read it.
        rows.record_stream(consumer)
        perm.record_stream(consumer)
        self._copied[slot] = ready  # the next reads into this buffer wait for this copy
        return _Staged(group, rows, perm, ready)

    def free(self) -> None:
        """Release the host buffers (allocated again if the ring is used again)."""
        self._buffers = []


class PrefetchReader(Reader):
    """The fast reader: the same batches as :class:`PlainReader`, bitwise, on ``device``.

    Pipeline, for a pass over groups g0, g1, …:

    - Worker threads (``cfg.threads``) read the chunks of the next ``prefetch_groups`` groups
      while the consumer trains on the current one. Each group has its own host buffer of
      ``mix_chunks`` chunks (a :class:`StagingRing` of ``prefetch_groups + 1``), pinned when the
      device is CUDA. A chunk goes straight from its file into its rows of that buffer with
      ``os.preadv`` and is checked against its crc32c (:func:`chunk_file`), or is decoded by
      zarr where plain reads cannot stand in for it (zstd, an fsspec URL, ``fast=False``).
    - One stager thread waits for a group's chunks and moves the whole group to the device
      in one copy (CUDA: non-blocking, on a side stream, an event marks it done) together
      with its permutation.
    - The consumer cuts batches with ``rows.index_select(0, perm[o*B:(o+1)*B])`` on the
      device: the host never shuffles rows.

    Counters as :class:`Reader`'s (``wait_seconds``: the time the consumer waited for a
    group). One pass is active at a time: ``iter()`` closes the previous one. On CUDA the batches are
    made on the stream that is current when ``iter()`` is called; use them on that stream.
    Host memory: ``(prefetch_groups + 1) * mix_chunks`` chunks (768 MiB at the defaults and
    32 MiB chunks), pinned on CUDA; about as much again on the device.
    """

    def __init__(self, cache: Cache, layer: int, cfg: ReaderConfig = ReaderConfig(),
                 device: str | torch.device = "cpu", *, fast: bool = True):
        super().__init__(cache, layer, cfg)
        self.device = torch.device(device)
        self.fast_path = fast and chunk_file(self.arr, 0) is not None
        """Whether chunks are read as plain files (else decoded through zarr)."""
        self._ring = StagingRing(cfg.prefetch_groups + 1, cfg.mix_chunks * self.layout.rows_per_block,
                                 self.layout.d, self.device)
        self._workers = ThreadPoolExecutor(cfg.threads, thread_name_prefix="saecache-read")
        self._stager = ThreadPoolExecutor(1, thread_name_prefix="saecache-stage")
        self._lock = threading.Lock()
        self._active: Iterator[torch.Tensor] | None = None
        self._inflight: deque[tuple[Future, list[Future]]] = deque()  # (staging, chunk reads) per group

    # ---- the consumer's side --------------------------------------------------------------

    def iter(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """(B, d) float16 batches on the device, from batch ``start_batch`` of the pass.

        Reading starts here, not at the first ``next``: the first groups load while the
        caller finishes setting up.
        """
        self._close_active()
        todo, offset = self.plan.groups_from(start_batch)
        consumer = self._ring.consumer_stream()
        ahead = min(self.cfg.prefetch_groups, len(todo))
        self._inflight = deque(self._submit(todo[i], i, consumer) for i in range(ahead))
        self._active = self._pass(todo, offset, consumer, self._inflight)
        return self._active

    def _pass(self, todo: list[int], offset: int, consumer, inflight: deque) -> Iterator[torch.Tensor]:
        """The generator behind :meth:`iter`; its ``finally`` stops every read in flight.

        ``inflight`` holds (staging future, chunk-read futures) per group, in pass order.
        """
        ahead = self.cfg.prefetch_groups
        try:
            for i in range(len(todo)):
                # slot (i + ahead) % (ahead + 1) is the buffer of group i - 1, consumed by now
                if i + ahead < len(todo):
                    inflight.append(self._submit(todo[i + ahead], i + ahead, consumer))
                staged = self._wait(inflight[0][0])
                inflight.popleft()  # only once staged: after an error _stop still waits for its reads
                yield from self._cut(staged, consumer, offset if i == 0 else 0)
        finally:
            self._stop(inflight)

    def _wait(self, staged: Future) -> _Staged:
        """The next group on the device; re-raises a worker's error. Counts the wait."""
        t0 = time.perf_counter()
        try:
            return staged.result()
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _cut(self, staged: _Staged, consumer, first: int) -> Iterator[torch.Tensor]:
        """The group's batches, gathered on the device in permuted order."""
        if staged.ready is not None:
            consumer.wait_event(staged.ready)  # the GPU waits for the copy; the host does not
        batch = self.cfg.batch_size
        for o in range(first, self.plan.batches_per_group[staged.group]):
            idx = staged.perm[o * batch:(o + 1) * batch]  # (B,) on the device
            self.batches += 1
            yield staged.rows.index_select(0, idx)  # (B, d): the shuffle, done on the device

    # ---- reading a group ------------------------------------------------------------------

    def _submit(self, group: int, i: int, consumer) -> tuple[Future, list[Future]]:
        """Start reading the ``i``-th group of the pass into its ring slot; returns (its
        staging future, its chunk futures)."""
        slot, host, reuse = self._ring.slot(i)  # reuse: the previous group's copy out of host
        reads, start = [], 0
        for block in self.plan.groups[group]:
            rows = self.layout.block_rows(block)
            out = host[start:start + _n_rows(rows)]  # (rows_per_block, d) view of the buffer
            reads.append(self._workers.submit(self._read, block, rows, out, reuse))
            start += _n_rows(rows)
        return self._stager.submit(self._stage, group, slot, host[:start], reads, consumer), reads

    def _read(self, block: int, rows: slice, out: torch.Tensor, reuse) -> None:
        """Worker: one chunk into its rows of a host buffer."""
        if reuse is not None:
            reuse.synchronize()  # the GPU may still be copying the buffer's previous group
        n = read_chunk(self.arr, block, rows, out.numpy(), fast=self.fast_path)  # file or zarr
        with self._lock:
            self.bytes_read += n

    def _stage(self, group: int, slot: int, host: torch.Tensor, reads: list[Future], consumer) -> _Staged:
        """Stager: once a group's chunks are in ``host`` (group_rows, d), put it and its
        permutation on the device."""
        for read in reads:
            read.result()  # raises the first worker error (or CancelledError when stopped)
        perm = torch.from_numpy(self.plan.permutation(group))  # (group_rows,) int64
        return self._ring.stage(group, slot, host, perm, consumer)

    # ---- stopping ---------------------------------------------------------------------------

    def _stop(self, inflight: deque[tuple[Future, list[Future]]]) -> None:
        """Cancel the reads not started and wait for the running ones, so no worker writes
        into a buffer the next pass reuses."""
        futures = [f for staged, reads in inflight for f in (staged, *reads)]
        for future in futures:
            future.cancel()
        wait_all(futures)

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # runs the pass's finally, if it had started
            self._active = None
        self._stop(self._inflight)  # for a pass whose generator never started

    def close(self) -> None:
        """Stop the active pass, end the threads and free the buffers."""
        self._close_active()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._stager.shutdown(wait=True, cancel_futures=True)
        self._ring.free()
