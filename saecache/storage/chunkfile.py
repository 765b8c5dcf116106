"""Writing a residual chunk's file the way zarr would, straight from a host buffer.

zarr's codec pipeline encodes a chunk on its event-loop thread holding the GIL: it copies the
32 MiB chunk and checksums it there, so however many threads write, one core encodes (the
block writer reached 0.13–0.30 × raw writes through it). Where the codecs are exactly bytes
(little endian) and crc32c and the store is a local folder (:func:`chunks.chunk_file`), the
encoded chunk is the rows' own bytes followed by their crc32c, little endian. This module writes
exactly that, from the caller's (pinned) buffer without a copy, with the GIL released for the
checksum (:mod:`storage.checksum`) and for the writes (``os.pwrite``), so writer threads run in
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


PIECE = 1 << 20
"""Bytes checksummed and then written at a time: the write's copy into the page cache finds
them still in the CPU cache, so the chunk crosses memory once, not twice (the checksum costs
~10% of a plain write's CPU time otherwise, which a loaded 2-core machine shows)."""


def write_chunk_file(path: Path, data: np.ndarray) -> int:
    """Write ``data`` (C-contiguous) and its 4-byte little-endian crc32c to a temporary file
    beside ``path``, then rename it onto ``path``. Returns the bytes written. On any failure the
    temporary is removed and nothing is left under ``path``'s name; an OSError names ``path``."""
    view = memoryview(data).cast("B")  # (bytes,) of the caller's buffer: no copy
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open("wb") gives
        try:
            _write_checksummed(fd, view)
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


def _write_checksummed(fd: int, view: memoryview) -> None:
    """``view`` from offset 0 of ``fd``, then its crc32c (little endian), :data:`PIECE` by
    piece; both the checksum and the writes release the GIL."""
    crc = 0
    for start in range(0, len(view), PIECE):
        piece = view[start:start + PIECE]
        crc = crc32c(piece, crc)
        _pwrite_all(fd, piece, start)
    _pwrite_all(fd, crc.to_bytes(CRC_BYTES, "little"), len(view))


def _pwrite_all(fd: int, data, offset: int) -> None:
    """All of ``data`` at ``offset``; pwrite may write fewer bytes than asked (a signal), so go
    on from where it stopped."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(0, f"the file system accepted no bytes at offset {offset}")
        view, offset = view[n:], offset + n
