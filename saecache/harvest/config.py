"""Stage one's settings (HarvestConfig) and what a harvest reports (HarvestResult).

Each field's default, range and help are written here once; the command line is built from
them (saecache.core.options) and a config checks itself when made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from saecache.core.devices import default_device
from saecache.core.settings import setting, validate
from saecache.harvest.corpus import DatasetSpec
from saecache.harvest.models import DTYPES
from saecache.storage.layout import DEFAULT_CHUNK_ROWS

if TYPE_CHECKING:
    from saecache.storage.cache import Cache

COMPRESSIONS = ("none", "zstd")


@dataclass
class HarvestConfig:
    """Everything `saecache harvest` needs; the CLI builds it, harvest() runs it."""

    cache: str
    """Where the cache goes: a folder or an fsspec URL."""
    model: str = "EleutherAI/pythia-410m"
    """Hugging Face model id or local folder."""
    revision: str | None = None
    """Model revision (branch, tag or commit)."""
    dtype: str = setting("float16", choices=tuple(DTYPES))
    """dtype the model runs in; residuals are stored as float16."""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    """Which documents to tokenise."""
    tokens: int = setting(300_000_000, min=1, count=True)
    """Token budget."""
    ctx: int = setting(2048, min=1)
    """Tokens per sequence."""
    layers: str = "all"
    """Blocks to store: all, 0-23, 0,5,10."""
    batch_size: int = setting(8, min=1)
    """Sequences per forward pass (keep it the same when resuming for identical bytes)."""
    device: str = field(default_factory=default_device)
    """torch device. [default: cuda if available, else cpu]"""
    chunk_rows: int = setting(DEFAULT_CHUNK_ROWS, min=1)
    """Target rows per residual chunk (rounded down to whole sequences)."""
    compression: str = setting("none", choices=COMPRESSIONS)
    """Compression before the crc32c checksum (fp16 residuals gain ~1.08×)."""
    writer_threads: int = setting(4, min=1)
    """Threads checksumming and writing chunk files (GIL-free on a local folder; 2-4 reach the
    disk's plain-write speed, docs/benchmarks.md "Writer vs raw disk")."""
    buffers: int = setting(3, min=1)
    """Host buffers in flight (memory = buffers × layers × rows/chunk × d × 2 bytes)."""
    allow_nonfinite: bool = False
    """Store and count non-finite residuals instead of stopping."""
    overwrite: bool = False
    """Delete an existing cache at CACHE and start over."""
    no_space_check: bool = setting(False, result=False)
    """Start even when the disk at CACHE has less free space than the harvest will write."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a URL cache."""
    progress: bool | None = None
    """Progress bar [default: on a terminal]."""

    def __post_init__(self):
        validate(self)
        if self.tokens < self.ctx:
            raise ValueError(f"tokens ({self.tokens}) is less than one sequence of ctx {self.ctx}")


@dataclass
class HarvestResult:
    """What a harvest did."""

    cache: Cache
    tokens_harvested: int
    """Tokens whose residuals this invocation wrote (0 when the cache was already complete)."""
    bytes_written: int
    """Residual bytes this invocation wrote (before codecs)."""
    seconds: float
    """Wall time of the forward-and-write loop."""
    was_complete: bool = False
    """The cache was complete already: its identity and commit record were checked, nothing
    was written."""
