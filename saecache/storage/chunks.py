"""The cache's chunk files: what a chunk is called, where its bytes are, and reading one.

A residual chunk holds the rows of one block (``resid/LL`` chunk ``(block, 0)``). With the
cache's default codecs (bytes, little endian, then crc32c) its file is the chunk's own fp16
bytes in C order followed by a 4-byte checksum, so a plain read can stand in for zarr's
decode (:func:`chunk_file`, :func:`read_chunk_file`); any other codec or store is decoded
through zarr (:func:`read_chunk_zarr`); :func:`read_chunk` picks. Both refuse a missing or
corrupt chunk naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from saecache.core.errors import SaecacheError
from saecache.storage.location import local_file, run

CRC_BYTES = 4  # zarr's crc32c codec appends the checksum as one little-endian uint32


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The store key of one chunk of ``arr``: ``resid/05/c/3/0``."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def chunk_name(arr: zarr.Array, block: int) -> str:
    """``resid/05 chunk (3, 0)``: how errors name a chunk."""
    return f"{arr.path} chunk ({block}, 0)"


def chunk_file(arr: zarr.Array, block: int) -> Path | None:
    """The file of a block's chunk when plain reads can replace zarr's decode, else None.

    That is when the store is a local folder and the codecs are exactly bytes (little
    endian, so the file holds the array's own fp16 bytes in C order) and crc32c: the file
    is then the chunk's data followed by its 4-byte checksum.
    """
    codecs = tuple(arr.metadata.codecs)
    if codecs != (BytesCodec(endian="little"), Crc32cCodec()):
        return None
    return local_file(arr.store, chunk_key(arr, (block, 0)))


def read_chunk(arr: zarr.Array, block: int, rows: slice, out: np.ndarray, *, fast: bool = True) -> int:
    """One block's chunk into ``out`` (rows, d): a plain read of its file where that can
    stand in for zarr's decode and ``fast`` allows it, else through zarr. Returns the bytes
    stored for it."""
    name = chunk_name(arr, block)
    path = chunk_file(arr, block) if fast else None
    if path is not None and len(out) == arr.chunks[0]:
        return read_chunk_file(path, out.view(np.uint8), name)
    return read_chunk_zarr(arr, block, rows, out, name)  # a short last chunk, another codec or store


def read_chunk_file(path: Path, out: np.ndarray, name: str) -> int:
    """Read one chunk file into ``out`` (a C-contiguous uint8 view of its rows), check its
    crc32c; returns the bytes read. ``name`` says which chunk in errors."""
    size = out.nbytes
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SaecacheError(f"{name} is missing ({path}): run saecache verify on the cache") from None
    try:
        stored = os.fstat(fd).st_size
        if stored != size + CRC_BYTES:
            raise SaecacheError(f"{name} ({path}) holds {stored} bytes, not {size + CRC_BYTES}: "
                                "the cache is corrupt; run saecache verify on it")
        _pread_into(fd, memoryview(out.reshape(-1)), 0)  # straight into the (pinned) buffer: no copy
        tail = os.pread(fd, CRC_BYTES, size)
    finally:
        os.close(fd)
    # google_crc32c 1.9 releases the GIL only for a `bytes` argument of 1 MiB or more; for
    # this numpy view it holds the GIL (measured: 9.8 GB/s from 1 thread, 9.7 from 2). That
    # serialises checksums across workers at ~10 GB/s per process, well above the ~1 GB/s a
    # GPU trains on; the reads themselves (os.preadv) release it.
    computed = google_crc32c.value(out)
    if computed != int.from_bytes(tail, "little"):
        raise SaecacheError(
            f"{name} ({path}) fails its crc32c check (stored {int.from_bytes(tail, 'little'):#010x}, "
            f"computed {computed:#010x}): the cache is corrupt; run saecache verify on it"
        )
    return stored


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; preadv may return fewer bytes than asked."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ended after {offset + done} bytes")
        done += n


def read_chunk_zarr(arr: zarr.Array, block: int, rows: slice, out: np.ndarray, name: str) -> int:
    """Decode one chunk through zarr (any codec, any store) into ``out`` (rows, d); returns
    the bytes stored for it. zarr's crc32c codec checks the checksum."""
    try:
        stored = run(arr.store.getsize(chunk_key(arr, (block, 0))))  # first: zarr would read a missing chunk as zeros
    except FileNotFoundError:
        raise SaecacheError(f"{name} is missing: the cache is incomplete or damaged; run "
                            "saecache verify on it") from None
    try:
        out[...] = arr[rows]
    except ValueError as err:  # zarr's crc32c codec: "Stored and computed checksum do not match"
        raise SaecacheError(f"{name} could not be read ({err}): the cache is corrupt; "
                            "run saecache verify on it") from err
    return stored
