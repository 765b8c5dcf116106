"""The cache's chunk files: what a chunk is called, where its bytes are, and reading one.

A residual chunk holds the rows of one block (``resid/LL`` chunk ``(block, 0)``). With the
cache's default codecs (bytes, little endian, then crc32c) its file is the chunk's own fp16
bytes in C order followed by a 4-byte checksum, so a plain read can stand in for zarr's
decode (:func:`chunk_file`, :func:`read_chunk_file`); any other codec or store is decoded
through zarr (:func:`read_chunk_zarr`); :func:`read_chunk` picks. Both refuse a missing or
corrupt chunk naming it.

Every zarr read of a cache goes through :class:`CheckedStore`, which refuses a chunk that must
exist and does not (zarr would return the fill value: zeros) and a chunk whose bytes fail
their crc32c check, naming the array, the chunk and the cache (:class:`ChunkError`).
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from saecache.core.errors import SaecacheError
from saecache.storage.checksum import crc32c
from saecache.storage.location import local_file, run

CRC_BYTES = 4  # zarr's crc32c codec appends the checksum as one little-endian uint32


class ChunkRef(NamedTuple):
    """One chunk of one array of one cache, as messages name it."""

    array: str
    """The array's path in the cache: ``resid/05``."""
    coords: tuple[int, ...]
    """Its chunk coordinates: ``(3, 0)``."""
    location: str
    """The cache, as the command line gave it."""

    def __str__(self) -> str:
        return f"{self.array} chunk {self.coords} of {self.location}"


class ChunkError(SaecacheError):
    """A chunk that must be there is missing, the wrong size or fails its crc32c check."""

    def __init__(self, ref: ChunkRef, reason: str):
        self.ref = ref
        self.reason = reason
        """What is wrong, after "is": ``missing``, ``corrupt (...)``, ``the wrong size (...)``."""
        super().__init__(f"{ref.array} chunk {ref.coords} is {reason} in {ref.location}: the cache "
                         f"is damaged or incomplete; run saecache verify {ref.location}")


def _corrupt(stored: int, computed: int) -> str:
    return f"corrupt (crc32c checksum stored {stored:#010x}, computed {computed:#010x})"


class ChunkRule(NamedTuple):
    """What :class:`CheckedStore` checks of every chunk of one array."""

    required: bool
    """A missing chunk is an error (else it reads as the fill value: "not written yet")."""
    nbytes: int | None
    """The stored size of every chunk when the codecs fix it (bytes + crc32c), else None."""
    crc: bool
    """The chunk ends with a crc32c checksum of the bytes before it."""


def chunk_rule(arr: zarr.Array, required: bool) -> ChunkRule:
    """The rule for ``arr``'s chunks from its codecs (zarr stores edge chunks whole too)."""
    codecs = tuple(arr.metadata.codecs)
    crc = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    plain = len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and crc
    nbytes = math.prod(arr.chunks) * arr.dtype.itemsize + CRC_BYTES if plain else None
    return ChunkRule(required, nbytes, crc)


def check_chunk(ref: ChunkRef, rule: ChunkRule, value: Buffer | None) -> None:
    """Refuse, naming it, a chunk that breaks ``rule``: missing when required, the wrong size,
    or failing its crc32c (zarr's codec checks it again: this one says which chunk)."""
    if value is None:
        if rule.required:
            raise ChunkError(ref, "missing")
        return
    data = value.as_numpy_array().reshape(-1)  # (stored bytes,) uint8, no copy
    if rule.nbytes is not None and len(data) != rule.nbytes:
        raise ChunkError(ref, f"the wrong size ({len(data)} bytes, not {rule.nbytes})")
    if not rule.crc:
        return
    if len(data) < CRC_BYTES:
        raise ChunkError(ref, f"the wrong size ({len(data)} bytes, too short for its crc32c)")
    stored = int.from_bytes(data[-CRC_BYTES:].tobytes(), "little")
    computed = crc32c(data[:-CRC_BYTES])
    if computed != stored:
        raise ChunkError(ref, _corrupt(stored, computed))


class CheckedStore(WrapperStore[Store]):
    """The store a :class:`saecache.storage.cache.Cache` reads and writes through.

    Why a store and not a checked read at each call site: zarr decides inside its codec
    pipeline that a missing chunk is the fill value, on every path (``arr[...]``,
    ``arr.blocks``, orthogonal selections, a writer's read-modify-write); a wrapper sees every
    chunk zarr fetches, so no reader written later can forget the check. The cost is one
    crc32c pass (~10 GB/s) over each chunk zarr reads, on top of zarr's own; the plain-file
    fast path (:func:`read_chunk_file`) never goes through zarr.

    ``rules`` (array path → :class:`ChunkRule`) says which arrays' chunks are checked; the
    cache fills it as it opens arrays. Keys of other arrays, metadata and partial reads pass
    unchanged.
    """

    def __init__(self, store: Store, location: str = "", rules: dict[str, ChunkRule] | None = None):
        super().__init__(store)
        self.location = location
        self.rules: dict[str, ChunkRule] = {} if rules is None else rules  # shared by copies

    def _with_store(self, store: Store) -> CheckedStore:
        return type(self)(store, self.location, self.rules)

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        path, sep, coords = key.rpartition("/c/")  # "resid/05/c/3/0": array, chunk coordinates
        rule = self.rules.get(path) if sep and byte_range is None else None
        if rule is not None:
            ref = ChunkRef(path, tuple(int(c) for c in coords.split("/")), self.location)
            check_chunk(ref, rule, value)
        return value

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:  # through get: every chunk is checked
            yield key, await self.get(key, prototype, byte_range)

    async def getsize(self, key: str) -> int:
        return await self._store.getsize(key)  # the wrapped store's: no read of the chunk

    async def getsize_prefix(self, prefix: str) -> int:
        return await self._store.getsize_prefix(prefix)


def unwrapped(store: Store) -> Store:
    """The store under any wrappers (a local folder or an fsspec store)."""
    while isinstance(store, WrapperStore):
        store = store._store
    return store


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The store key of one chunk of ``arr``: ``resid/05/c/3/0``."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def chunk_name(arr: zarr.Array, block: int) -> ChunkRef:
    """``resid/05 chunk (3, 0) of CACHE``: how errors name a block's chunk."""
    return ChunkRef(arr.path, (block, 0), getattr(arr.store, "location", "") or str(unwrapped(arr.store)))


def chunk_file(arr: zarr.Array, block: int) -> Path | None:
    """The file of a block's chunk when plain reads can replace zarr's decode, else None.

    That is when the store is a local folder and the codecs are exactly bytes (little
    endian, so the file holds the array's own fp16 bytes in C order) and crc32c: the file
    is then the chunk's data followed by its 4-byte checksum.
    """
    codecs = tuple(arr.metadata.codecs)
    if codecs != (BytesCodec(endian="little"), Crc32cCodec()):
        return None
    return local_file(unwrapped(arr.store), chunk_key(arr, (block, 0)))


def read_chunk(arr: zarr.Array, block: int, rows: slice, out: np.ndarray, *, fast: bool = True) -> int:
    """One block's chunk into ``out`` (rows, d): a plain read of its file where that can
    stand in for zarr's decode and ``fast`` allows it, else through zarr. Returns the bytes
    stored for it."""
    name = chunk_name(arr, block)
    path = chunk_file(arr, block) if fast else None
    if path is not None and len(out) == arr.chunks[0]:
        return read_chunk_file(path, out.view(np.uint8), name)
    return read_chunk_zarr(arr, block, rows, out, name)  # a short last chunk, another codec or store


def read_chunk_file(path: Path, out: np.ndarray, name: ChunkRef) -> int:
    """Read one chunk file into ``out`` (a C-contiguous uint8 view of its rows), check its
    crc32c; returns the bytes read. ``name`` says which chunk in errors."""
    size = out.nbytes
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkError(name, "missing") from None
    try:
        stored = os.fstat(fd).st_size
        if stored != size + CRC_BYTES:
            raise ChunkError(name, f"the wrong size ({stored} bytes, not {size + CRC_BYTES})")
        try:
            _pread_into(fd, memoryview(out.reshape(-1)), 0)  # straight into the (pinned) buffer: no copy
        except EOFError as err:  # cut short after fstat: another process is rewriting it
            raise ChunkError(name, f"the wrong size ({err})") from None
        tail = os.pread(fd, CRC_BYTES, size)
    finally:
        os.close(fd)
    # storage.checksum releases the GIL (google_crc32c 1.9, zarr's, holds it for this numpy
    # view: ~3 ms per 32 MiB chunk), so reader threads checksum in parallel with each other
    # and with the training loop; the reads themselves (os.preadv) release it too.
    computed = crc32c(out)
    if computed != int.from_bytes(tail, "little"):
        raise ChunkError(name, _corrupt(int.from_bytes(tail, "little"), computed))
    return stored


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; preadv may return fewer bytes than asked."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ended after {offset + done} bytes")
        done += n


def read_chunk_zarr(arr: zarr.Array, block: int, rows: slice, out: np.ndarray, name: ChunkRef) -> int:
    """Decode one chunk through zarr (any codec, any store) into ``out`` (rows, d); returns
    the bytes stored for it. A cache's :class:`CheckedStore` refuses a missing or corrupt
    chunk; the size asked first also covers an array opened on a bare store."""
    try:
        stored = run(arr.store.getsize(chunk_key(arr, (block, 0))))  # bare zarr would read a missing chunk as zeros
    except FileNotFoundError:
        raise ChunkError(name, "missing") from None
    try:
        out[...] = arr[rows]
    except ValueError as err:  # zarr's crc32c codec on a bare store: "Stored and computed checksum do not match"
        raise ChunkError(name, f"corrupt ({err})") from err
    return stored
