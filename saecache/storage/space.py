"""Disk space before a long job: what a harvest or an import will still write, and whether it fits.

The projection counts what the cache's arrays hold, chunk by chunk: ``tokens`` (n_seq, ctx)
int32 and ``source`` (n_seq, 2) int64 unless they are written already, then for every block
not yet committed its residuals (rows × d × 2 bytes × layers), its statistics row (layers ×
(d + 4) float64) and its commit flag, plus each chunk's 4-byte crc32c and the metadata files.
Compression is not counted (fp16 residuals gain ~1.08× with zstd), so the projection errs on
the safe side. The card's default, 300M tokens of pythia-410m at all 24 layers, is 14.7 TB.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from saecache.core.errors import SaecacheError
from saecache.storage import stats
from saecache.storage.layout import CacheLayout
from saecache.storage.location import Location

METADATA_BYTES = 64 * 1024
"""zarr.json files and the lock file, generously."""
CRC_BYTES = 4
"""crc32c checksum appended to every chunk."""


def bytes_to_write(layout: CacheLayout, token_budget: int, committed: np.ndarray | None) -> int:
    """Bytes still to write for a cache of ``layout``: everything (``committed`` None: the
    tokens are not written yet, so the sequence count is the budget's) or the blocks whose
    flag in ``committed`` (n_blocks,) bool is not set."""
    if committed is None:
        lay = replace(layout, n_seq=token_budget // layout.ctx)
        tokens = lay.n_seq * (lay.ctx * 4 + 2 * 8) + 2 * lay.n_blocks * CRC_BYTES
        pending, seqs = lay.n_blocks, lay.n_seq
    else:
        lay, tokens = layout, 0
        pending = int((~committed).sum())
        short = lay.n_blocks * lay.seqs_per_block - lay.n_seq  # the last block may be shorter
        seqs = pending * lay.seqs_per_block - (short if lay.n_blocks and not committed[-1] else 0)
    n_layers = len(lay.layers)
    per_block = n_layers * stats.width(lay.d) * 8 + 1 + (n_layers + 2) * CRC_BYTES  # stats, flag
    return tokens + seqs * lay.ctx * lay.d * 2 * n_layers + pending * per_block + METADATA_BYTES


def format_bytes(n: float) -> str:
    """``14.7 TB``, ``61.2 GB``, ``3.1 MB``: decimal units, as disks are sold and df -H shows."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_space(where: Location, needed: int, command: str, reclaimed: int = 0,
                hint: str = "lower --tokens or --layers, ") -> None:
    """Refuse, in one line with both numbers, a job that needs more than the free space at
    ``where`` (plus ``reclaimed``: what --overwrite deletes first). URLs are not checked."""
    free = where.free_bytes()
    if free is None or needed <= free + reclaimed:
        return
    raise SaecacheError(
        f"{command} needs {format_bytes(needed)} at {where} but {format_bytes(free + reclaimed)} "
        f"are free there: free space, {hint}choose another CACHE, or pass --no-space-check")
