"""The cache's geometry: node names, chunking, and how sequences are cut into blocks.

Every path inside a cache is computed here and nowhere else.

A *block* is a run of whole sequences whose residual rows fill exactly one chunk of every
``resid/LL`` array (the last block may be short). Blocks are the unit of work and of commit:
a writer owns whole blocks, so no two writers ever touch the same chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

TOKENS = "tokens"
SOURCE = "source"
COMMITTED = "blocks/committed"
BLOCK_STATS = "blocks/stats"

# Target rows per residual chunk: 16384 × 1024 fp16 = 32 MiB at Pythia-410M's width, the size
# that wrote and read best (docs/benchmarks.md, "Cache layout").
DEFAULT_CHUNK_ROWS = 16384
# Caps on what a layout read from a cache may say: generous (Pythia-410M's card is ctx 2048,
# d 1024, 24 layers, 300M tokens in 18K blocks of 32 MiB) but finite, so that crafted or
# damaged metadata is refused before anything is allocated from it.
MAX_CTX = 2**20
MAX_D = 2**16
MAX_LAYERS = 4096  # a layer index is below this
MAX_TOKENS = 2**40  # n_seq * ctx: ~1.1T tokens
MAX_BLOCKS = 2**24  # the commit record is read whole: at most 16 MiB
MAX_CHUNK_BYTES = 2**32  # one chunk of any array (4 GiB), decoded whole by every read
COMPRESSIONS = ("none", "zstd")
# Fields a resumed harvest must share with the cache: (label in messages, field name).
_IDENTITY = (
    ("ctx", "ctx"),
    ("layers", "layers"),
    ("rows per chunk (--chunk-rows)", "seqs_per_block"),
    ("compression", "compression"),
)


def resid_name(layer: int) -> str:
    """``resid/05``: the residual stream after block 5."""
    return f"resid/{layer:02d}"


class NodeShape(NamedTuple):
    """What one array of a cache must be, as its layout says."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CacheLayout:
    """How a cache's arrays are shaped and chunked. Saved in the group attributes."""

    ctx: int
    """Tokens per sequence."""
    d: int
    """Width of the residual stream."""
    layers: tuple[int, ...]
    """Blocks whose outputs are stored, ascending."""
    seqs_per_block: int
    """Sequences per block; ``seqs_per_block * ctx`` rows make one residual chunk."""
    n_seq: int
    """Sequences in the cache (0 until tokenisation has finished)."""
    compression: str = "none"
    """``none`` or ``zstd``: the bytes-to-bytes codec before the crc32c checksum."""

    @staticmethod
    def seqs_per_block_for(ctx: int, chunk_rows: int) -> int:
        """Whole sequences per block for a target chunk size (at least one)."""
        return max(1, chunk_rows // ctx)

    @property
    def rows_per_block(self) -> int:
        return self.seqs_per_block * self.ctx

    @property
    def n_blocks(self) -> int:
        return -(-self.n_seq // self.seqs_per_block)

    @property
    def n_tokens(self) -> int:
        return self.n_seq * self.ctx

    def block_seqs(self, block: int) -> range:
        """The sequence indices of one block."""
        start = block * self.seqs_per_block
        return range(start, min(start + self.seqs_per_block, self.n_seq))

    def block_rows(self, block: int) -> slice:
        """The residual rows of one block: row r is token (r // ctx, r % ctx)."""
        seqs = self.block_seqs(block)
        return slice(seqs.start * self.ctx, seqs.stop * self.ctx)

    def differences(self, requested: CacheLayout) -> list[str]:
        """Human-readable differences in what a resumed harvest must keep (the sequence count
        is not compared: it is known only once tokenisation has finished)."""
        mine, theirs = self.to_json(), requested.to_json()  # layers as lists, as messages show them
        found = []
        for label, name in _IDENTITY:
            if mine[name] == theirs[name]:
                continue
            if name == "seqs_per_block":  # said in rows, as --chunk-rows asks for them
                found.append(f"rows per chunk (--chunk-rows) is {self.rows_per_block} in the cache "
                             f"({self.seqs_per_block} sequences of ctx {self.ctx}), not "
                             f"{requested.rows_per_block}")
            else:
                found.append(f"{label} is {mine[name]!r} in the cache, not {theirs[name]!r}")
        return found

    def nodes(self) -> dict[str, NodeShape]:
        """Every array of a cache with this layout: name → shape, chunks and dtype."""
        rows, width = self.rows_per_block, self.d + 4  # width: storage.stats.width(d)
        nodes = {TOKENS: NodeShape((self.n_seq, self.ctx), (self.seqs_per_block, self.ctx), "int32"),
                 SOURCE: NodeShape((self.n_seq, 2), (self.seqs_per_block, 2), "int64")}
        for layer in self.layers:
            nodes[resid_name(layer)] = NodeShape((self.n_tokens, self.d), (rows, self.d), "float16")
        nodes[BLOCK_STATS] = NodeShape((self.n_blocks, len(self.layers), width),
                                       (1, len(self.layers), width), "float64")
        nodes[COMMITTED] = NodeShape((self.n_blocks,), (1,), "uint8")
        return nodes

    def implausible(self) -> str | None:
        """Why this layout cannot be a cache's (a damaged or crafted one), or None: checked
        before any size is computed from it, so nothing huge is ever allocated."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layers":
                if not value or not all(_is_int(v) and 0 <= v < MAX_LAYERS for v in value) \
                        or list(value) != sorted(set(value)):
                    return f"layers {list(value)!r} are not distinct ascending layer indices"
            elif f.name == "compression":
                if value not in COMPRESSIONS:
                    return f"compression {value!r} is not one of {', '.join(COMPRESSIONS)}"
            elif not _is_int(value):
                return f"{f.name} {value!r} is not an integer"
        return self._implausible_size()

    def _implausible_size(self) -> str | None:
        fields_first = (("ctx", self.ctx, 1, MAX_CTX), ("d", self.d, 1, MAX_D),
                        ("seqs_per_block", self.seqs_per_block, 1, MAX_CHUNK_BYTES),
                        ("n_seq", self.n_seq, 0, MAX_TOKENS))
        for label, value, low, high in fields_first:  # before anything is computed from them
            if not low <= value <= high:
                return f"{label} {value} is outside {low}..{high}"
        chunk = self.seqs_per_block * self.ctx * max(2 * self.d, 4)  # bytes of a resid or tokens chunk
        for label, value, high in (("n_seq * ctx", self.n_tokens, MAX_TOKENS),
                                   ("blocks", self.n_blocks, MAX_BLOCKS),
                                   ("bytes per chunk", chunk, MAX_CHUNK_BYTES)):
            if value > high:
                return f"{label} {value} is more than {high}"
        return None

    def to_json(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, data: dict) -> CacheLayout:
        """The layout saved in a cache's attributes; ValueError, naming the field, for one that
        is malformed or implausible."""
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise ValueError(f"layout {data!r} is not a layout")
        names = {f.name for f in fields(cls)}
        if set(data) - names or {"ctx", "d", "layers", "seqs_per_block", "n_seq"} - set(data):
            raise ValueError(f"layout fields {sorted(data)} are not {sorted(names)}")
        layout = cls(**{**data, "layers": tuple(data["layers"])})
        if (why := layout.implausible()) is not None:
            raise ValueError(f"layout {why}")
        return layout


def _is_int(value) -> bool:
    """A JSON integer (not a bool, not 1e13 written as a float)."""
    return isinstance(value, int) and not isinstance(value, bool)
