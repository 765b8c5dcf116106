"""The cache's geometry: node names, chunking, and how sequences are cut into blocks.

Every path inside a cache is computed here and nowhere else.

A *block* is a run of whole sequences whose residual rows fill exactly one chunk of every
``resid/LL`` array (the last block may be short). Blocks are the unit of work and of commit:
a writer owns whole blocks, so no two writers ever touch the same chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TOKENS = "tokens"
SOURCE = "source"
COMMITTED = "blocks/committed"
BLOCK_STATS = "blocks/stats"

# Target rows per residual chunk: 16384 × 1024 fp16 = 32 MiB at Pythia-410M's width, the size
# that wrote and read best (docs/benchmarks.md, "Cache layout").
DEFAULT_CHUNK_ROWS = 16384
# Fields a resumed harvest must share with the cache: (label in messages, field name).
_IDENTITY = (
    ("ctx", "ctx"),
    ("layers", "layers"),
    ("sequences per block (--chunk-rows)", "seqs_per_block"),
    ("compression", "compression"),
)


def resid_name(layer: int) -> str:
    """``resid/05``: the residual stream after block 5."""
    return f"resid/{layer:02d}"


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
        return [f"{label} is {mine[name]!r} in the cache, not {theirs[name]!r}"
                for label, name in _IDENTITY if mine[name] != theirs[name]]

    def to_json(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, data: dict) -> CacheLayout:
        return cls(**{**data, "layers": tuple(data["layers"])})
