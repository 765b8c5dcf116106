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
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from saecache import __version__
from saecache.core.errors import SaecacheError
from saecache.storage import layout as names
from saecache.storage import stats as stats_mod
from saecache.storage.layout import CacheLayout
from saecache.storage.location import Location, location_of
from saecache.storage.provenance import Provenance
from saecache.storage.stats import LayerStats

FORMAT_VERSION = 1
ATTR = "saecache"
# zarr skips writing a chunk equal to the fill value by default; a committed block must have
# every chunk on disk (verify checks), and the check costs 40-50% of write speed on dense data.
WRITE_CONFIG = {"write_empty_chunks": True}


def codecs(compression: str) -> list:
    """Bytes-to-bytes codecs: optional zstd, then always a crc32c checksum."""
    if compression == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise SaecacheError(f"--compression {compression!r} is unknown: use none or zstd")


def _new_header(provenance: Provenance, layout: CacheLayout) -> dict:
    """The ``saecache`` attribute of a new cache: its format, what it is made from, its
    layout, and no progress yet."""
    return {"format_version": FORMAT_VERSION, "saecache_version": __version__,
            "provenance": provenance.to_json(), "layout": layout.to_json(),
            "tokens_done": False, "complete": False, "stats": {}}


def _read_header(location: str, group: zarr.Group) -> dict:
    """The ``saecache`` attribute of a group: what the cache is and how far it got. Refuses,
    in one line, a group that is not a saecache cache or one of another format version."""
    meta = dict(group.attrs).get(ATTR)
    if not isinstance(meta, dict):
        raise SaecacheError(f"{location} is a zarr group but not a saecache cache: "
                            "choose a new or empty path")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SaecacheError(
            f"cache at {location} has format version {meta.get('format_version')}, this "
            f"saecache reads version {FORMAT_VERSION}: harvest it again with --overwrite"
        )
    return meta


class Cache:
    """Open handle on a cache; create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, where: Location, group: zarr.Group):
        self.where = where  # where the cache lives
        self.location = str(where)  # the CACHE text it was opened with, as messages show it
        self.group = group
        self.meta = _read_header(self.location, group)
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads metadata

    # ---- opening and creating -------------------------------------------------------------

    @classmethod
    def open(cls, location: str, *, writable: bool = False,
             storage_options: dict | None = None) -> Cache:
        """Open an existing cache; one-line error if there is none at ``location``."""
        where = location_of(location, storage_options)
        if not where.exists():
            raise SaecacheError(f"no saecache cache at {location}: run saecache harvest first")
        try:
            group = zarr.open_group(where.store(read_only=not writable), mode="r+" if writable else "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise SaecacheError(f"{location} is not a saecache cache (it holds no zarr group): "
                                "choose a new or empty path") from None
        return cls(where, group)

    @classmethod
    def create(cls, location: str, provenance: Provenance, layout: CacheLayout, *,
               storage_options: dict | None = None) -> Cache:
        """A new, empty cache at ``location`` (which must be empty or absent)."""
        where = location_of(location, storage_options)
        if where.exists():
            raise SaecacheError(f"{location} already exists and is not empty; choose a new CACHE path")
        header = _new_header(provenance, layout)
        group = zarr.create_group(where.store(read_only=False), attributes={ATTR: header})
        return cls(where, group)

    @staticmethod
    def remove(location: str, storage_options: dict | None = None) -> None:
        """Delete the cache at ``location`` (``--overwrite``); refuses anything else."""
        Cache.open(location, storage_options=storage_options).where.remove()  # open: proves it is a cache

    # ---- what it is ------------------------------------------------------------------------

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_json(self.meta["provenance"])

    @property
    def layout(self) -> CacheLayout:
        return CacheLayout.from_json(self.meta["layout"])

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
        """A node of the cache by name (storage.layout), opened for writing."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config(WRITE_CONFIG)
        return self._arrays[name]

    @property
    def tokens(self) -> zarr.Array:
        return self.array(names.TOKENS)

    @property
    def source(self) -> zarr.Array:
        return self.array(names.SOURCE)

    def resid(self, layer: int) -> zarr.Array:
        return self.array(names.resid_name(layer))

    def _create(self, name: str, shape: tuple, chunks: tuple, dtype: str, compression="none"):
        self._arrays[name] = self.group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, serializer=BytesCodec(),
            compressors=codecs(compression), fill_value=0, overwrite=True, config=WRITE_CONFIG,
        )
        return self._arrays[name]

    def create_token_arrays(self, max_seqs: int) -> tuple[zarr.Array, zarr.Array]:
        """(tokens, source) sized for ``max_seqs``; shrunk by :meth:`finish_tokens`."""
        lay = self.layout
        rows = lay.seqs_per_block  # one tokens chunk per block: a writer reads only its own
        tokens = self._create(names.TOKENS, (max_seqs, lay.ctx), (rows, lay.ctx), "int32")
        source = self._create(names.SOURCE, (max_seqs, 2), (rows, 2), "int64")
        return tokens, source

    def finish_tokens(self, n_seq: int) -> None:
        """Fix the sequence count and create the residual and commit arrays."""
        self.tokens.resize((n_seq, self.layout.ctx))
        self.source.resize((n_seq, 2))
        lay = CacheLayout.from_json({**self.meta["layout"], "n_seq": n_seq})
        for layer in lay.layers:
            self._create(names.resid_name(layer), (lay.n_seq * lay.ctx, lay.d),
                         (lay.rows_per_block, lay.d), "float16", lay.compression)
        width = stats_mod.width(lay.d)
        self._create(names.BLOCK_STATS, (lay.n_blocks, len(lay.layers), width),
                     (1, len(lay.layers), width), "float64")
        self._create(names.COMMITTED, (lay.n_blocks,), (1,), "uint8")
        self._update(layout=lay.to_json(), tokens_done=True)

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
        """(n_blocks, n_layers, d + 4) float64 sums; zero rows for uncommitted blocks."""
        return self.array(names.BLOCK_STATS)[:]

    def finalize(self) -> None:
        """Reduce the per-block statistics into the attributes and mark the cache complete."""
        stats = stats_mod.per_layer(self.block_stats(), self.layout.layers)
        self._update(stats={f"{layer:02d}": s.to_json() for layer, s in stats.items()}, complete=True)

    def layer_stats(self, layer: int) -> LayerStats:
        """The statistics of one layer of a complete cache."""
        key = f"{layer:02d}"
        if key not in self.meta["stats"]:
            raise SaecacheError(f"cache at {self.location} has no statistics for layer {layer}: "
                                "finish its harvest first")
        return LayerStats.from_json(self.meta["stats"][key])

    def _update(self, **changes) -> None:
        self.meta = {**self.meta, **changes}
        self.group.update_attributes({ATTR: self.meta})
