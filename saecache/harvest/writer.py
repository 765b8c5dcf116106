"""Writes harvested units to the cache on worker threads and commits each finished block.

The model thread never touches storage: it takes a free HostBuffer (waiting only when every
buffer is still being written — that bound is what keeps memory fixed), fills it, and hands it
here. Worker threads encode and write one layer-chunk each; a single committer thread, in
submission order, waits for a block's chunks, checks its statistics, writes its commit record
and, once the unit's blocks are done, returns the buffer to the free list.

A chunk of a local cache with the default codecs (bytes, crc32c) is written straight from the
host buffer (storage.chunkfile: the bytes zarr would write, with the GIL released, so the
threads write in parallel); any other chunk (an object store, zstd, a short last block) is
encoded by zarr, which holds the GIL for the copy and checksum of each chunk.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from saecache.harvest.capture import HostBuffer
from saecache.core.errors import SaecacheError
from saecache.storage.cache import Cache
from saecache.storage.chunkfile import direct_file, write_chunk_file
from saecache.storage.stats import nonfinite_count

DIRECT = True
"""Write eligible chunks straight from the host buffer (False: every chunk through zarr, the
reference the tests and benchmarks/bench_writer.py compare against)."""


class BlockWriter:
    """Background writer for units of whole blocks."""

    def __init__(self, cache: Cache, buffers: list[HostBuffer], threads: int,
                 allow_nonfinite: bool = False, direct: bool | None = None):
        self.cache = cache
        self.direct = DIRECT if direct is None else direct
        self.layout = cache.layout
        self.arrays = [cache.resid(layer) for layer in self.layout.layers]
        self.allow_nonfinite = allow_nonfinite
        self.workers = ThreadPoolExecutor(threads, thread_name_prefix="saecache-write")
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="saecache-commit")
        self.free: queue.Queue[HostBuffer] = queue.Queue()
        for buffer in buffers:
            self.free.put(buffer)
        self.tasks: list[Future] = []
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.blocks_committed = 0
        self._lock = threading.Lock()

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """On success wait for every write and commit (:meth:`close`), on an error :meth:`abort`."""
        if kind is None:
            self.close()
        else:
            self.abort()

    def acquire(self) -> HostBuffer:
        """A buffer free to fill; waits while all are being written. Raises a writer's error."""
        while True:
            self.raise_error()
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue

    def submit(self, buffer: HostBuffer, first_block: int, blocks: list[int]) -> None:
        """Write ``blocks`` (a subset of the unit starting at ``first_block``) from ``buffer``."""
        for block in blocks:
            chunks = [self.workers.submit(self._write, buffer, first_block, block, i)
                      for i in range(len(self.arrays))]
            self.tasks.append(self.committer.submit(self._commit, buffer, first_block, block, chunks))
        self.tasks.append(self.committer.submit(self.free.put, buffer))
        self.tasks = [t for t in self.tasks if not t.done() or t.exception()]

    def close(self) -> None:
        """Wait for every write and commit; raise the first error."""
        for task in self.tasks:
            try:
                task.result()
            except BaseException:  # recorded in self.error by the task itself
                pass
        self.workers.shutdown()
        self.committer.shutdown()
        self.raise_error()

    def abort(self) -> None:
        """Stop taking work; let what is running finish (uncommitted blocks are redone)."""
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.committer.shutdown(wait=True, cancel_futures=True)

    def raise_error(self) -> None:
        if self.error is None:
            return
        if isinstance(self.error, SaecacheError):
            raise self.error
        if isinstance(self.error, OSError):
            raise SaecacheError(
                f"writing the cache at {self.cache.location} failed: {self.error.strerror or self.error}"
                "; committed blocks are safe, re-run the same command to resume once fixed"
            ) from self.error
        raise self.error

    # ---- worker and committer tasks ------------------------------------------------------

    def _rows(self, first_block: int, block: int) -> slice:
        """Rows of ``block`` within a buffer whose unit starts at ``first_block``."""
        base = self.layout.block_rows(first_block).start
        rows = self.layout.block_rows(block)
        return slice(rows.start - base, rows.stop - base)

    def _write(self, buffer: HostBuffer, first_block: int, block: int, index: int) -> None:
        try:
            buffer.wait()
            data = buffer.resid[index, self._rows(first_block, block)].numpy()  # (rows, d) fp16, a view
            arr = self.arrays[index]
            path = direct_file(arr, block, data) if self.direct else None
            if path is not None:
                write_chunk_file(path, data)
            else:
                arr[self.layout.block_rows(block)] = data
            with self._lock:
                self.bytes_written += data.nbytes
        except BaseException as err:
            self.error = self.error or err
            raise

    def _commit(self, buffer: HostBuffer, first_block: int, block: int, chunks: list[Future]) -> None:
        try:
            for chunk in chunks:
                chunk.result()
            seqs = self.layout.block_seqs(block)
            seq0 = self.layout.block_seqs(first_block).start
            sums = buffer.sums[:, seqs.start - seq0:seqs.stop - seq0].double().numpy()  # (L, s, d+4)
            self._check_finite(sums, seqs.start)
            self.cache.commit_block(block, sums.sum(axis=1))  # (L, d + 4)
            self.blocks_committed += 1
        except BaseException as err:
            self.error = self.error or err
            raise

    def _check_finite(self, sums: np.ndarray, seq0: int) -> None:
        """sums: (n_layers, seqs, d + 4). Non-finite values are an error unless allowed."""
        if self.allow_nonfinite or nonfinite_count(sums) == 0:
            return
        index, seq = np.argwhere(sums[..., -1] > 0)[0]
        layer = self.layout.layers[index]
        raise SaecacheError(
            f"layer {layer}, sequence {seq0 + seq}: {int(sums[index, seq, -1])} non-finite "
            "residual values (overflow in --dtype float16?); try --dtype bfloat16/float32, or "
            "pass --allow-nonfinite to store and count them"
        )
