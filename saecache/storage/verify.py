"""`saecache verify`: read every committed chunk, check its crc32c, count non-finite values,
and check the cache against itself: arrays shaped as the layout says, the statistics in the
attributes equal to those recomputed from blocks/stats, every block of a complete cache
committed. (The header's checksum and plausibility are checked when the cache opens.)"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import zarr

from saecache.core.errors import SaecacheError, first_line
from saecache.storage import layout as names
from saecache.storage.cache import Cache, NodeError
from saecache.storage.chunks import ChunkError, chunk_key
from saecache.storage.stats import LayerStats, per_layer


class Problem(NamedTuple):
    """One bad chunk, array or statistic."""

    array: str
    chunk: tuple[int, ...] | None
    """The chunk's coordinates, or None for a problem of the whole array (or metadata)."""
    reason: str

    def __str__(self) -> str:
        where = self.array if self.chunk is None else f"{self.array} chunk {self.chunk}"
        return f"{where}: {self.reason}"


class VerifyReport(NamedTuple):
    """What verify found."""

    chunks_read: int
    bytes_read: int
    problems: list[Problem]
    nonfinite: dict[int, int]
    """Layer → non-finite values found in its committed chunks."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _expected_chunks(name: str, arr: zarr.Array, committed: np.ndarray):
    """Chunk coordinates that must exist: every chunk of the token arrays, and for the
    per-block arrays the chunks of committed blocks (their first coordinate is the block)."""
    grid = itertools.product(*(range(n) for n in arr.cdata_shape))
    if name in (names.TOKENS, names.SOURCE):
        return list(grid)
    return [c for c in grid if committed[c[0]]]


def _node_names(cache: Cache) -> list[str]:
    """The arrays a tokenised cache holds."""
    return [names.TOKENS, names.SOURCE, names.BLOCK_STATS, names.COMMITTED,
            *(names.resid_name(layer) for layer in cache.layout.layers)]


def missing_chunks(cache: Cache, committed: np.ndarray) -> list[tuple[str, tuple[int, ...]]]:
    """(array, chunk coordinates) of every chunk that must exist and is not stored, found by one
    listing of the cache (no chunk is read): what a resumed harvest checks before it trusts
    its commit record. ``committed``: (n_blocks,) bool."""
    present = set(cache.where.list(""))
    missing = []
    for name in _node_names(cache):
        arr = cache.array(name)
        missing += [(name, c) for c in _expected_chunks(name, arr, committed)
                    if chunk_key(arr, c) not in present]
    return missing


def _check_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> tuple[int, int, str | None]:
    """(bytes read, non-finite count, problem or None) for one chunk."""
    try:
        data = arr.blocks[coords]
    except ChunkError as err:  # the cache's store: missing, the wrong size, a bad checksum
        return 0, 0, err.reason
    except Exception as err:  # a codec raises ValueError on a bad checksum, others on garbage
        return 0, 0, f"unreadable ({type(err).__name__}: {first_line(err)})"
    bad = int(data.size - np.count_nonzero(np.isfinite(data))) if data.dtype.kind == "f" else 0
    return data.nbytes, bad, None


VERIFY_THREADS = 4
"""Chunks read in parallel by default."""


def verify(cache: Cache, threads: int = VERIFY_THREADS) -> VerifyReport:
    """Check every chunk a committed block or the token arrays must have, and the cache's
    metadata against its arrays."""
    problems: list[Problem] = []
    if not cache.tokens_done:  # before tokenisation ends there is nothing that must be complete
        return VerifyReport(0, 0, problems, {})
    record = _commit_record(cache, problems)  # None: the commit array itself is bad (reported below)
    committed = np.zeros(cache.layout.n_blocks, dtype=bool) if record is None else record
    chunks = nbytes = 0
    nonfinite: dict[int, int] = {}
    with ThreadPoolExecutor(threads) as pool:
        for name in _node_names(cache):
            try:
                arr = cache.array(name)
            except NodeError as err:
                problems.append(Problem(name, None, err.reason))
                continue
            read, size, bad_values = _check_array(cache, name, arr, committed, pool, problems)
            chunks, nbytes = chunks + read, nbytes + size
            if name.startswith("resid/"):
                nonfinite[int(name.split("/")[1])] = bad_values
    if cache.complete and record is not None:
        problems += _uncommitted(committed) or _stats_differ(cache, problems)
        problems += _recorded_counts_differ(cache, nonfinite)
    return VerifyReport(chunks, nbytes, problems, nonfinite)


def _check_array(cache: Cache, name: str, arr: zarr.Array, committed: np.ndarray,
                 pool: ThreadPoolExecutor, problems: list[Problem]) -> tuple[int, int, int]:
    """Read every chunk of ``arr`` that must exist; (chunks read, bytes, non-finite values).
    Appends what is missing or bad to ``problems``."""
    present = set(cache.where.list(f"{arr.path}/c/"))  # one listing: a stray file elsewhere is no key here
    wanted = _expected_chunks(name, arr, committed)
    missing = [c for c in wanted if chunk_key(arr, c) not in present]
    problems += [Problem(name, c, "missing") for c in missing]
    todo = [c for c in wanted if c not in set(missing)]
    read = nbytes = bad_values = 0
    for coords, (size, bad, reason) in zip(todo, pool.map(lambda c: _check_chunk(arr, c), todo)):
        read, nbytes, bad_values = read + 1, nbytes + size, bad_values + bad
        if reason:
            problems.append(Problem(name, coords, reason))
    return read, nbytes, bad_values


def _commit_record(cache: Cache, problems: list[Problem]) -> np.ndarray | None:
    """(n_blocks,) bool: which blocks are committed, or None if the commit array is missing
    or misshapen. A commit chunk that is unreadable is a problem (not "uncommitted"); its
    block counts as uncommitted for the other checks."""
    try:
        return cache.committed()
    except NodeError:
        return None
    except ChunkError:  # find which: one chunk at a time
        pass
    arr, flags = cache.array(names.COMMITTED), np.zeros(cache.layout.n_blocks, dtype=bool)
    for block in range(len(flags)):
        try:
            flags[block] = bool(arr.blocks[block][0])
        except ChunkError as err:
            problems.append(Problem(names.COMMITTED, (block,), err.reason))
    return flags


def _uncommitted(committed: np.ndarray) -> list[Problem]:
    """A cache marked complete must have every block committed."""
    todo = np.flatnonzero(~committed)
    if not len(todo):
        return []
    return [Problem(names.COMMITTED, None, f"{len(todo)} of {len(committed)} blocks are not committed "
                    f"(first: block {todo[0]}), yet the cache is marked complete")]


def _stats_differ(cache: Cache, found: list[Problem]) -> list[Problem]:
    """The statistics in the attributes of a complete cache must be what blocks/stats gives
    (storage.stats.per_layer, the same arithmetic as when the cache was finished: equal up to
    float rounding). Only checked when every block is committed and no such chunk is bad."""
    if any(p.array in (names.BLOCK_STATS, names.COMMITTED) for p in found):
        return []  # blocks/stats or the commit record is already reported bad
    try:
        sums = cache.block_stats()  # (n_blocks, n_layers, d + 4)
    except SaecacheError as err:
        return [Problem(names.BLOCK_STATS, None, f"unreadable ({err})")]
    recomputed = per_layer(sums, cache.layout.layers)
    return [Problem("metadata", None, f"layer {layer} statistics: {why}")
            for layer, stats in recomputed.items()
            if (why := _differs(cache.layer_stats(layer), stats)) is not None]


def _differs(recorded: LayerStats, recomputed: LayerStats) -> str | None:
    """The first field in which the recorded statistics are not the recomputed ones, or None."""
    for field in LayerStats._fields:
        a, b = getattr(recorded, field), getattr(recomputed, field)
        if not np.allclose(a, b, rtol=1e-9, atol=1e-12):
            if field == "mean":
                return "the mean is not the one blocks/stats gives"
            return f"{field} is {_number(a)} in the metadata, {_number(b)} from blocks/stats"
    return None


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _recorded_counts_differ(cache: Cache, found: dict[int, int]) -> list[Problem]:
    """A finished cache records its non-finite counts; what is on disk must agree."""
    return [
        Problem(names.resid_name(layer), None, f"{n} non-finite values on disk, "
                f"{cache.layer_stats(layer).nonfinite} recorded at harvest")
        for layer, n in found.items() if n != cache.layer_stats(layer).nonfinite
    ]
