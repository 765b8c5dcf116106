"""`saecache verify`: read every committed chunk, check its crc32c, count non-finite values."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import zarr

from saecache.storage import layout as names
from saecache.core.errors import first_line
from saecache.storage.cache import Cache
from saecache.storage.chunks import chunk_key


class Problem(NamedTuple):
    """One bad chunk."""

    array: str
    chunk: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.array} chunk {self.chunk}: {self.reason}"


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


def _expected_chunks(cache: Cache, name: str, arr: zarr.Array, committed: np.ndarray):
    """Chunk coordinates that must exist: every chunk of the token arrays, and for the
    per-block arrays the chunks of committed blocks (their first coordinate is the block)."""
    grid = itertools.product(*(range(n) for n in arr.cdata_shape))
    if name in (names.TOKENS, names.SOURCE):
        return list(grid)
    return [c for c in grid if committed[c[0]]]


def _check_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> tuple[int, int, str | None]:
    """(bytes read, non-finite count, problem or None) for one chunk."""
    try:
        data = arr.blocks[coords]
    except Exception as err:  # a codec raises ValueError on a bad checksum, others on garbage
        return 0, 0, f"unreadable ({type(err).__name__}: {first_line(err)})"
    bad = int(data.size - np.count_nonzero(np.isfinite(data))) if data.dtype.kind == "f" else 0
    return data.nbytes, bad, None


VERIFY_THREADS = 4
"""Chunks read in parallel by default."""


def verify(cache: Cache, threads: int = VERIFY_THREADS) -> VerifyReport:
    """Check every chunk a committed block or the token arrays must have."""
    committed = cache.committed()
    node_names = []  # before tokenisation ends there is nothing that must be complete
    if cache.tokens_done:
        node_names = [names.TOKENS, names.SOURCE, names.BLOCK_STATS, names.COMMITTED]
        node_names += [names.resid_name(layer) for layer in cache.layout.layers]
    problems: list[Problem] = []
    chunks = nbytes = 0
    nonfinite: dict[int, int] = {}
    with ThreadPoolExecutor(threads) as pool:
        for name in node_names:
            arr = cache.array(name)
            present = set(cache.where.list(f"{arr.path}/c/"))
            wanted = _expected_chunks(cache, name, arr, committed)
            missing = [c for c in wanted if chunk_key(arr, c) not in present]
            problems += [Problem(name, c, "missing") for c in missing]
            todo = [c for c in wanted if c not in set(missing)]
            bad_values = 0
            for coords, (size, bad, reason) in zip(todo, pool.map(lambda c: _check_chunk(arr, c), todo)):
                chunks += 1
                nbytes += size
                bad_values += bad
                if reason:
                    problems.append(Problem(name, coords, reason))
            if name.startswith("resid/"):
                nonfinite[int(name.split("/")[1])] = bad_values
    problems += _recorded_counts_differ(cache, nonfinite)
    return VerifyReport(chunks, nbytes, problems, nonfinite)


def _recorded_counts_differ(cache: Cache, found: dict[int, int]) -> list[Problem]:
    """A finished cache records its non-finite counts; what is on disk must agree."""
    if not cache.complete:
        return []
    return [
        Problem(names.resid_name(layer), (), f"{n} non-finite values on disk, "
                f"{cache.layer_stats(layer).nonfinite} recorded at harvest")
        for layer, n in found.items() if n != cache.layer_stats(layer).nonfinite
    ]
