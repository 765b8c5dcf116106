"""Writing a residual chunk's file the way zarr would, straight from a host buffer.

zarr's codec pipeline encodes a chunk on its event-loop thread holding the GIL: it copies the
32 MiB chunk and checksums it there, so however many threads write, one core encodes (the
block writer reached 0.13–0.30 × raw writes through it). Where the codecs are exactly bytes
(little endian) and crc32c and the store is a local folder (:func:`chunks.chunk_file`), the
encoded chunk is the rows' own bytes followed by their crc32c, little endian. This module writes
exactly that, from the caller's (pinned) buffer without a copy, with the GIL released for the
checksum (:mod:`storage.checksum`) and for the writes (``os.pwritev``), so writer threads run in
parallel. What lands on disk is byte for byte what zarr writes, under the same name, the same
way: a temporary ``KEY.<uuid>.partial`` beside the chunk, renamed onto it, no fsync (zarr's
``LocalStore._atomic_write``; a killed writer's temporaries are what
``LocalFolder.clean_partials`` removes, and verify never lists them as chunks).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import zarr

from saecache.storage.checksum import crc32c
from saecache.storage.chunks import CRC_BYTES, chunk_file


def direct_file(arr: zarr.Array, block: int, data: np.ndarray) -> Path | None:
    """Where :func:`write_chunk_file` may write ``data`` (rows, d) as block ``block``'s chunk of
    ``arr``, or None where zarr must encode it: another codec or store, a short block (zarr
    pads it to the whole chunk), or data that is not the chunk's own C-order little-endian
    bytes."""
    if len(data) != arr.chunks[0] or data.dtype != arr.dtype or not data.flags.c_contiguous \
            or sys.byteorder != "little":
        return None
    return chunk_file(arr, block)


def temporary_path(path: Path) -> Path:
    """A new temporary file name beside ``path``: ``0`` → ``0.<32 hex digits>.partial``, as
    zarr's LocalStore names its own (so ``LocalFolder.clean_partials`` removes both)."""
    return path.with_suffix(f".{uuid.uuid4().hex}.partial")


def write_chunk_file(path: Path, data: np.ndarray) -> int:
    """Write ``data`` (C-contiguous) and its 4-byte little-endian crc32c to a temporary file
    beside ``path``, then rename it onto ``path``. Returns the bytes written. On any failure the
    temporary is removed and nothing is left under ``path``'s name; an OSError names ``path``."""
    view = memoryview(data).cast("B")  # (bytes,) of the caller's buffer: no copy
    trailer = crc32c(view).to_bytes(CRC_BYTES, "little")
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open("wb") gives
        try:
            _pwrite_all(fd, [view, trailer])
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return len(view) + CRC_BYTES


def _pwrite_all(fd: int, parts: list) -> None:
    """Write ``parts`` (buffers) back to back from offset 0; pwritev may write fewer bytes
    than asked (a signal, the 2 GiB per-call limit), so go on from where it stopped."""
    views = [memoryview(p).cast("B") for p in parts]
    offset = 0
    while views:
        n = os.pwritev(fd, views, offset)
        if n == 0:
            raise OSError(0, "the file system accepted no bytes")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
