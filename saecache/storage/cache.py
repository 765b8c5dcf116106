"""A saecache cache: one zarr v3 group holding tokens, sources and residuals.

Nodes (names in ``layout``):

    tokens            int32   (n_seq, ctx)             token ids, written before any model runs
    source            int64   (n_seq, 2)               (document index, offset) of each first token
    resid/LL          float16 (n_seq * ctx, d)         residual stream after block LL
    blocks/stats      float64 (n_blocks, n_layers, d+4) per-block sums (storage.stats)
    blocks/committed  uint8   (n_blocks,)              1 once every array's data for a block is in

Progress is the commit record, never an array's shape: a chunk file appears atomically, the
``blocks/committed`` chunk of a block is written last, and resume redoes every block whose
flag is missing. Every array carries a crc32c checksum per chunk.

Integrity: the group is opened on a :class:`storage.chunks.CheckedStore`, so no read ever
returns zarr's fill value for a chunk that must exist or decodes a chunk failing its crc32c;
the ``saecache`` attribute is checked (checksum, types, plausible sizes: storage.header) when
the cache opens; and each array is checked against the layout (shape, chunks, dtype) when it
is first opened. Each failure is one line naming the array, chunk or field.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from saecache.core.errors import SaecacheError, first_line
from saecache.storage import layout as names
from saecache.storage import stats as stats_mod
from saecache.storage.chunks import CheckedStore, chunk_rule
from saecache.storage.header import ATTR, FORMAT_VERSION, UNCHECKSUMMED, new_header, raw_header, \
    read_header, signed
from saecache.storage.layout import CacheLayout
from saecache.storage.location import Location, location_of
from saecache.storage.provenance import Provenance
from saecache.storage.stats import LayerStats

__all__ = ["ATTR", "FORMAT_VERSION", "UNCHECKSUMMED", "Cache", "NodeError", "codecs"]
# zarr skips writing a chunk equal to the fill value by default; a committed block must have
# every chunk on disk (verify checks), and the check costs 40-50% of write speed on dense data.
WRITE_CONFIG = {"write_empty_chunks": True}
_REDO = "harvest it again with --overwrite"


def codecs(compression: str) -> list:
    """Bytes-to-bytes codecs: optional zstd, then always a crc32c checksum."""
    if compression == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise SaecacheError(f"--compression {compression!r} is unknown: use none or zstd")


class NodeError(SaecacheError):
    """An array of a cache that is missing, unreadable or not shaped as the layout says."""

    def __init__(self, name: str, location: str, reason: str):
        self.array, self.reason = name, reason
        super().__init__(f"{name} of cache {location} is {reason}: the cache is damaged; {_REDO}")


def _open_group(location: str, where: Location, writable: bool) -> zarr.Group:
    """The cache's zarr group, on a :class:`CheckedStore`; one line if there is none."""
    if not where.exists():
        raise SaecacheError(f"no saecache cache at {location}: run saecache harvest first")
    try:
        store = CheckedStore(where.store(read_only=not writable), location)
        return zarr.open_group(store, mode="r+" if writable else "r")
    except json.JSONDecodeError as err:
        raise SaecacheError(f"the group metadata (zarr.json) of {location} is not valid JSON "
                            f"({err}): the cache is damaged; delete it and harvest it again") from None
    except (OSError, TypeError, ValueError, zarr.errors.BaseZarrError):  # no group, a file, not a dict
        raise SaecacheError(f"{location} is not a saecache cache (it holds no zarr group): "
                            "choose a new or empty path") from None


def _create_group(location: str, where: Location, provenance: Provenance,
                  layout: CacheLayout) -> zarr.Group:
    """A new cache's group (``where`` must be empty or absent), on a :class:`CheckedStore`."""
    if where.exists():
        raise SaecacheError(f"{location} already exists and is not empty; choose a new CACHE path")
    if (why := layout.implausible()) is not None:  # a layout that could not be opened again
        raise SaecacheError(f"cannot create a cache at {location}: its {why}")
    store = CheckedStore(where.store(read_only=False), location)
    return zarr.create_group(store, attributes={ATTR: new_header(provenance, layout)})


def _node_problem(name: str, arr: zarr.Array, layout: CacheLayout, tokens_done: bool) -> str | None:
    """How ``arr`` differs from what the layout says node ``name`` is, or None. Before the
    tokens are done the token arrays' length is not known yet (it is their maximum)."""
    want = layout.nodes().get(name)
    if want is None:
        return "not a node of this layout"
    have = (tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))
    expected = (want.shape, want.chunks, want.dtype)
    if not tokens_done and name in (names.TOKENS, names.SOURCE):
        have, expected = (have[0][1:], *have[1:]), (want.shape[1:], *expected[1:])
    if have != expected:
        return (f"{have[0]} {have[2]} in chunks of {have[1]}, but the layout says "
                f"{expected[0]} {expected[2]} in chunks of {expected[1]}")
    codecs = tuple(arr.metadata.codecs)
    if not codecs or not isinstance(codecs[-1], Crc32cCodec):  # saecache always writes one
        return f"stored without a crc32c checksum (codecs {[c.to_dict()['name'] for c in codecs]})"
    return None


def _open_node(group: zarr.Group, name: str, location: str, layout: CacheLayout,
               tokens_done: bool) -> zarr.Array:
    """Node ``name`` of a cache's group; NodeError if it is missing, unreadable, or not what
    the layout says."""
    try:
        arr = group[name]
    except KeyError:
        raise NodeError(name, location, "missing (no zarr.json)") from None
    except (ValueError, TypeError, zarr.errors.BaseZarrError) as err:  # invalid JSON or metadata
        raise NodeError(name, location, f"unreadable ({first_line(err)})") from None
    if not isinstance(arr, zarr.Array):
        raise NodeError(name, location, "a group, not an array")
    if (why := _node_problem(name, arr, layout, tokens_done)) is not None:
        raise NodeError(name, location, why)
    return arr.with_config(WRITE_CONFIG)


def _required(name: str, tokens_done: bool) -> bool:
    """Whether every chunk of node ``name`` must exist: the token arrays' once tokenisation is
    done, the residuals' and blocks/stats' always (only committed blocks' are ever read), the
    commit record's never (a missing one means "not committed")."""
    return {names.TOKENS: tokens_done, names.SOURCE: tokens_done, names.COMMITTED: False}.get(name, True)


class Cache:
    """Open handle on a cache; create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, where: Location, group: zarr.Group):
        self.where = where  # where the cache lives
        self.location = str(where)  # the CACHE text it was opened with, as messages show it
        self.group = group
        self.store: CheckedStore = group.store  # every chunk read is checked (storage.chunks)
        # the checked header: meta (as stored), provenance (Provenance), layout (CacheLayout)
        self.meta, self.provenance, self.layout = read_header(self.location, dict(group.attrs))
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads metadata

    # ---- opening and creating -------------------------------------------------------------

    @classmethod
    def open(cls, location: str, *, writable: bool = False,
             storage_options: dict | None = None) -> Cache:
        """Open an existing cache; one-line error if there is none at ``location``."""
        where = location_of(location, storage_options)
        return cls(where, _open_group(location, where, writable))

    @classmethod
    def create(cls, location: str, provenance: Provenance, layout: CacheLayout, *,
               storage_options: dict | None = None) -> Cache:
        """A new, empty cache at ``location`` (which must be empty or absent)."""
        where = location_of(location, storage_options)
        return cls(where, _create_group(location, where, provenance, layout))

    @staticmethod
    def remove(location: str, storage_options: dict | None = None) -> None:
        """Delete the cache at ``location`` (``--overwrite``), damaged or not; refuses anything
        that is not a saecache cache."""
        where = location_of(location, storage_options)
        raw_header(location, dict(_open_group(location, where, False).attrs))  # proves it is a cache
        where.remove()

    # ---- what it is ------------------------------------------------------------------------

    @property
    def tokens_done(self) -> bool:
        return bool(self.meta["tokens_done"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    def check_matches(self, provenance: Provenance, layout: CacheLayout) -> None:
        """Refuse, in one line, to mix a different model, data or layout into this cache."""
        diffs = self.provenance.differences(provenance) + self.layout.differences(layout)
        if diffs:
            raise SaecacheError(
                f"cache at {self.location} differs from this harvest: {diffs[0]}; re-run with "
                "the cache's settings to resume, --overwrite to start over, or choose another CACHE"
            )

    # ---- arrays ----------------------------------------------------------------------------

    def array(self, name: str) -> zarr.Array:
        """A node of the cache by name (storage.layout), opened for writing; refuses, in one
        line, one that is missing or not shaped, chunked and typed as the layout says."""
        if name not in self._arrays:
            self._watch(name, _open_node(self.group, name, self.location, self.layout, self.tokens_done))
        return self._arrays[name]

    def _watch(self, name: str, arr: zarr.Array) -> None:
        """Keep ``arr`` open and tell the store how to check its chunks (:func:`_required`)."""
        self.store.rules[arr.path] = chunk_rule(arr, _required(name, self.tokens_done))
        self._arrays[name] = arr

    @property
    def tokens(self) -> zarr.Array:
        return self.array(names.TOKENS)

    @property
    def source(self) -> zarr.Array:
        return self.array(names.SOURCE)

    def resid(self, layer: int) -> zarr.Array:
        return self.array(names.resid_name(layer))

    def _create(self, name: str, shape: tuple, chunks: tuple, dtype: str, compression="none"):
        self._watch(name, self.group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, serializer=BytesCodec(),
            compressors=codecs(compression), fill_value=0, overwrite=True, config=WRITE_CONFIG,
        ))
        return self._arrays[name]

    def create_token_arrays(self, max_seqs: int) -> tuple[zarr.Array, zarr.Array]:
        """(tokens, source) sized for ``max_seqs``; shrunk by :meth:`finish_tokens`."""
        nodes = replace(self.layout, n_seq=max_seqs).nodes()  # one tokens chunk per block
        return tuple(self._create(name, *nodes[name]) for name in (names.TOKENS, names.SOURCE))

    def finish_tokens(self, n_seq: int) -> None:
        """Fix the sequence count and create the residual and commit arrays."""
        self.tokens.resize((n_seq, self.layout.ctx))
        self.source.resize((n_seq, 2))
        lay = CacheLayout.from_json({**self.meta["layout"], "n_seq": n_seq})
        nodes = lay.nodes()  # the shapes every later open checks
        for name in [names.resid_name(layer) for layer in lay.layers]:
            self._create(name, *nodes[name], lay.compression)
        for name in (names.BLOCK_STATS, names.COMMITTED):
            self._create(name, *nodes[name])
        self._update(layout=lay.to_json(), tokens_done=True)
        for name in (names.TOKENS, names.SOURCE):  # from now on their chunks must all exist
            self._watch(name, self.array(name))

    # ---- blocks ----------------------------------------------------------------------------

    def committed(self) -> np.ndarray:
        """(n_blocks,) bool: which blocks are complete."""
        if not self.tokens_done:
            return np.zeros(0, dtype=bool)
        return self.array(names.COMMITTED)[:].astype(bool)

    def commit_block(self, block: int, block_stats: np.ndarray) -> None:
        """Record a block whose residuals are all written. block_stats: (n_layers, d + 4)."""
        self.array(names.BLOCK_STATS)[block] = block_stats
        self.array(names.COMMITTED)[block] = 1  # written last: the commit itself

    def block_stats(self) -> np.ndarray:
        """(n_blocks, n_layers, d + 4) float64 sums; zero rows for uncommitted blocks, whose
        chunks are never read (a committed block's must exist: the store checks)."""
        arr = self.array(names.BLOCK_STATS)
        sums = np.zeros(arr.shape, dtype=np.float64)  # (n_blocks, n_layers, d + 4)
        done = np.flatnonzero(self.committed())
        if len(done):
            sums[done] = arr.get_orthogonal_selection((done, slice(None), slice(None)))
        return sums

    def finalize(self) -> None:
        """Reduce the per-block statistics into the attributes and mark the cache complete."""
        stats = stats_mod.per_layer(self.block_stats(), self.layout.layers)
        self._update(stats={f"{layer:02d}": s.to_json() for layer, s in stats.items()}, complete=True)

    def layer_stats(self, layer: int) -> LayerStats:
        """The statistics of one layer of a complete cache (checked when the cache opened)."""
        key = f"{layer:02d}"
        if key not in self.meta["stats"]:
            raise SaecacheError(f"cache at {self.location} has no statistics for layer {layer}: "
                                "finish its harvest first")
        return LayerStats.from_json(self.meta["stats"][key])

    def _update(self, **changes) -> None:
        """Change header fields and write the header again, with its new checksum."""
        meta = signed({**self.meta, **changes})
        self.meta, self.provenance, self.layout = read_header(self.location, {ATTR: meta})
        self.group.update_attributes({ATTR: meta})
