"""Stage one: tokenise a dataset and run the model once, writing every chosen layer's residuals.

    harvest(cfg)
      ├─ check the request (model config, tokenizer, layers, ctx) before touching anything
      ├─ open + compare, or create, the cache               (storage.cache)
      ├─ tokenise + pack into `tokens`/`source`              (corpus, packing) — once
      └─ for each unit of pending blocks:
           forward with hooks → HostBuffer                    (capture)
           write chunks + commit on worker threads            (storage.writer)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from saecache import __version__
from saecache.harvest.capture import HostBuffer, ResidualCapture
from saecache.harvest.corpus import DEFAULT_DATASET, DatasetSpec, iter_texts
from saecache.core.distributed import ranks
from saecache.core.devices import default_device
from saecache.core.errors import SaecacheError
from saecache.harvest.models import (find_blocks, load_config, load_model, load_tokenizer, max_ctx_of,
                             n_layers_of, vocab_hash)
from saecache.harvest.packing import Sequence, pack, tokenize_documents
from saecache.core.progress import Progress
from saecache.storage.cache import Cache, codecs
from saecache.storage.layout import DEFAULT_CHUNK_ROWS, CacheLayout
from saecache.storage.provenance import Provenance
from saecache.storage.store import location_exists, remove_partial_writes
from saecache.harvest.writer import BlockWriter
from saecache.core.units import parse_layers

log = logging.getLogger(__name__)


@dataclass
class HarvestConfig:
    """Everything `saecache harvest` needs; the CLI builds it, :func:`harvest` runs it."""

    cache: str
    """Where the cache goes: a folder or an fsspec URL."""
    model: str = "EleutherAI/pythia-410m"
    """Hub id or local folder of a Hugging Face causal LM."""
    revision: str | None = None
    """Model revision (branch, tag or commit)."""
    dtype: str = "float16"
    """dtype the model runs in; residuals are always stored as float16."""
    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(DEFAULT_DATASET))
    """Which documents to tokenise."""
    tokens: int = 300_000_000
    """Token budget: the cache holds tokens // ctx sequences (fewer if the data runs out)."""
    ctx: int = 2048
    """Tokens per sequence."""
    layers: str | None = None
    """Blocks to store: None or "all", or a list such as "0-3,8"."""
    batch_size: int = 8
    """Sequences per forward pass."""
    device: str = field(default_factory=default_device)
    """torch device for the model."""
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Target rows per residual chunk (rounded down to whole sequences)."""
    compression: str = "none"
    """none or zstd (checksums are always on)."""
    writer_threads: int = 4
    """Threads encoding and writing chunks."""
    buffers: int = 3
    """Host buffers in flight: bounds memory at buffers × layers × unit rows × d × 2 bytes."""
    allow_nonfinite: bool = False
    """Store and count non-finite residuals instead of stopping at the first."""
    overwrite: bool = False
    """Delete an existing cache at `cache` and start over."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a URL cache."""
    progress: bool | None = None
    """Show a progress bar (None: when stderr is a terminal)."""

    def __post_init__(self):
        for name in ("tokens", "ctx", "batch_size", "chunk_rows", "writer_threads", "buffers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.tokens < self.ctx:
            raise ValueError(f"tokens ({self.tokens}) is less than one sequence of ctx {self.ctx}")
        codecs(self.compression)  # raises on an unknown name


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


def harvest(cfg: HarvestConfig) -> HarvestResult:
    """Create or resume the cache at ``cfg.cache``; returns when every block is committed.

    Under torchrun, rank 0 checks, creates and tokenises while the others wait; then every
    rank forwards its round-robin share of the pending units; rank 0 finishes the cache.
    """
    group = ranks()
    config = load_config(cfg.model, cfg.revision)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    provenance, layout = _describe(cfg, config, tokenizer)
    group.on_main(lambda: _open_or_create(cfg, provenance, layout, tokenizer))
    cache = Cache.open(cfg.cache, writable=True, storage_options=cfg.storage_options)
    pending = [int(b) for b in np.flatnonzero(~cache.committed())]
    units = group.mine(units_of(cache.layout, pending, cfg.batch_size))
    result = HarvestResult(cache, 0, 0, 0.0)
    if units:
        model = load_model(cfg.model, cfg.revision, cfg.dtype, group.device(cfg.device))
        label = "harvest" if group.world == 1 else f"harvest (rank {group.rank})"
        result = _run_blocks(cfg, cache, model, units, set(pending), label)
    group.barrier()
    if group.is_main and not cache.complete and cache.committed().all():
        cache.finalize()
    return result


# ---- checking the request -------------------------------------------------------------------


def _describe(cfg: HarvestConfig, config, tokenizer) -> tuple[Provenance, CacheLayout]:
    """Provenance and layout of the requested cache; one-line errors for impossible requests."""
    n_layers = n_layers_of(config)
    try:
        layers = parse_layers(cfg.layers, n_layers)
    except ValueError as err:
        raise SaecacheError(f"{err} in {cfg.model}") from None
    max_ctx = max_ctx_of(config)
    if max_ctx is not None and cfg.ctx > max_ctx:
        raise SaecacheError(f"--ctx {cfg.ctx} is longer than {cfg.model} allows ({max_ctx}): "
                            f"use --ctx {max_ctx} or less")
    architecture = (config.architectures or [type(config).__name__])[0]
    provenance = Provenance(
        model=cfg.model, revision=cfg.revision, dtype=cfg.dtype, architecture=architecture,
        blocks=blocks_path_of(config, n_layers), n_layers=n_layers, tokenizer=cfg.model, vocab_hash=vocab_hash(tokenizer),
        eos_token_id=int(tokenizer.eos_token_id), dataset=cfg.dataset.canonical_id(),
        dataset_config=cfg.dataset.config, split=cfg.dataset.split,
        dataset_revision=cfg.dataset.revision, text_field=cfg.dataset.text_field,
        token_budget=cfg.tokens, model_commit=getattr(config, "_commit_hash", None),
        saecache_version=__version__,
    )
    layout = CacheLayout(ctx=cfg.ctx, d=int(config.hidden_size), layers=layers,
                         seqs_per_block=CacheLayout.seqs_per_block_for(cfg.ctx, cfg.chunk_rows),
                         n_seq=0, compression=cfg.compression)
    return provenance, layout


def blocks_path_of(config, n_layers: int) -> str:
    """Where the blocks sit, read off a weightless copy of the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return find_blocks(skeleton, n_layers)[0]


def _open_or_create(cfg: HarvestConfig, provenance: Provenance, layout: CacheLayout,
                    tokenizer) -> Cache:
    """The cache to fill: the existing one if it matches, else a new one with its tokens."""
    exists = location_exists(cfg.cache, cfg.storage_options)
    cache = None
    if exists and not cfg.overwrite:
        cache = Cache.open(cfg.cache, writable=True, storage_options=cfg.storage_options)
        cache.check_matches(provenance, layout)
        if removed := remove_partial_writes(cfg.cache):  # before any rank writes again
            log.info("removed %d partial chunk files left by an interrupted harvest", removed)
        if cache.tokens_done:
            return cache
    sequences = _sequences(cfg, tokenizer)  # fails on missing or empty data before any change
    if cache is None:
        if exists:
            Cache.remove(cfg.cache, cfg.storage_options)
        cache = Cache.create(cfg.cache, provenance, layout, storage_options=cfg.storage_options)
    _write_tokens(cache, sequences, cfg.tokens // cfg.ctx)
    return cache


def _sequences(cfg: HarvestConfig, tokenizer) -> Iterator[Sequence]:
    """The packed sequences, with the first one already read (so empty data fails now)."""
    docs = tokenize_documents(tokenizer, iter_texts(cfg.dataset))
    stream = pack(docs, cfg.ctx, int(tokenizer.eos_token_id), cfg.tokens // cfg.ctx)
    first = next(stream, None)
    if first is None:
        raise SaecacheError(f"dataset {cfg.dataset.id} holds fewer than --ctx {cfg.ctx} tokens: "
                            "give more text or a smaller --ctx")
    return itertools.chain([first], stream)


def _write_tokens(cache: Cache, sequences: Iterator[Sequence], max_seqs: int) -> None:
    """Fill `tokens` and `source` one block at a time, then fix the sequence count."""
    tokens, source = cache.create_token_arrays(max_seqs)
    per_block = cache.layout.seqs_per_block
    n = 0
    while batch := list(itertools.islice(sequences, per_block)):
        tokens[n:n + len(batch)] = np.stack([s.ids for s in batch])  # (s, ctx) int32
        source[n:n + len(batch)] = np.array([(s.doc, s.offset) for s in batch], dtype=np.int64)
        n += len(batch)
    if n < max_seqs:
        log.warning("the dataset ran out after %d sequences (%d tokens) of the %d asked for",
                    n, n * cache.layout.ctx, max_seqs)
    cache.finish_tokens(n)


# ---- the forward-and-write loop -----------------------------------------------------------


def units_of(layout: CacheLayout, pending: list[int], batch_size: int) -> list[list[int]]:
    """Group blocks into fixed units of ``max(1, batch_size // seqs_per_block)`` blocks.

    Unit boundaries depend only on the layout and batch size, never on what is pending, so a
    resumed harvest forwards exactly the batches an uninterrupted one would: identical bytes.
    Returns the units that hold a pending block, as lists of all their blocks.
    """
    per_unit = max(1, batch_size // layout.seqs_per_block)
    wanted = sorted({block // per_unit for block in pending})
    return [list(range(u * per_unit, min((u + 1) * per_unit, layout.n_blocks))) for u in wanted]


def _run_blocks(cfg: HarvestConfig, cache: Cache, model, units: list[list[int]],
                pending: set[int], label: str) -> HarvestResult:
    """Forward ``units`` and write their ``pending`` blocks."""
    layout = cache.layout
    capture = ResidualCapture(model, cache.provenance.blocks, layout.layers)
    unit_seqs = max(len(unit) for unit in units) * layout.seqs_per_block
    buffers = [HostBuffer.allocate(len(layout.layers), unit_seqs, layout.ctx, layout.d,
                                   pin=capture.cuda) for _ in range(cfg.buffers)]
    log.info("host buffers: %d × %.1f MiB", len(buffers), buffers[0].nbytes / 2**20)
    writer = BlockWriter(cache, buffers, cfg.writer_threads, cfg.allow_nonfinite)
    mine = [b for unit in units for b in unit if b in pending]
    progress = Progress(len(mine) * layout.rows_per_block, label, cfg.progress)
    try:
        for unit in units:
            _forward_unit(cfg, cache, capture, writer, unit, pending)
            progress.update(sum(len(layout.block_seqs(b)) for b in unit if b in pending) * layout.ctx,
                            writer.bytes_written)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    tokens = sum(len(layout.block_seqs(b)) for b in mine) * layout.ctx
    return HarvestResult(cache, tokens, writer.bytes_written, progress.seconds)


def _forward_unit(cfg, cache: Cache, capture: ResidualCapture, writer: BlockWriter,
                  unit: list[int], todo: set[int]) -> None:
    """Forward every sequence of one unit, then hand its pending blocks to the writer."""
    layout = cache.layout
    seqs = range(layout.block_seqs(unit[0]).start, layout.block_seqs(unit[-1]).stop)
    ids = torch.from_numpy(cache.tokens[seqs.start:seqs.stop]).to(capture.device)  # (S, ctx)
    buffer = writer.acquire()
    for start in range(0, len(seqs), cfg.batch_size):
        batch = ids[start:start + cfg.batch_size].long()  # (B, ctx)
        capture.run(batch, buffer, start)
    capture.finish(buffer)
    writer.submit(buffer, unit[0], [b for b in unit if b in todo])
