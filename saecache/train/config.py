"""Stage two's settings: how a layer is read (ReaderConfig) and how its SAEs train (TrainConfig).

Each field's default, range and help are written here once; the command line is built from
them (saecache.core.options) and a config checks itself when made.
"""

from __future__ import annotations

from dataclasses import dataclass

from saecache.core.settings import setting, validate


@dataclass(frozen=True)
class ReaderConfig:
    """How stage two reads one layer of a cache; the batch order depends on nothing else."""

    batch_size: int = setting(4096, min=1)
    """Tokens per step (rows per training batch)."""
    seed: int = setting(0, min=0)
    """Seeds the initialisation and batch order."""
    mix_chunks: int = setting(8, min=1)
    """Chunks whose rows are shuffled together."""
    threads: int = setting(8, min=1, flag="--reader-threads", result=False)
    """Chunk-reading threads."""
    prefetch_groups: int = setting(2, min=1, result=False)
    """Groups of mix_chunks chunks read ahead of the one being consumed."""
    holdout_fraction: float = setting(0.01, min=0, max=1, max_open=True)
    """Fraction of the cache's blocks, at its end, held out of training (at least one block)."""

    def __post_init__(self):
        validate(self)
