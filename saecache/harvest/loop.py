"""Stage one: tokenise a dataset and run the model once, writing every chosen layer's residuals.

    harvest(cfg)
      ├─ check the request (model config, tokenizer, layers, ctx) before touching anything  (prepare)
      ├─ take the cache's writer lock, held to the end (a second writer is refused)
      ├─ open + compare (weights, tokenizer, commit record), check free space, or create  (prepare)
      ├─ tokenise + pack into `tokens`/`source`                (corpus, packing) — once
      └─ for each unit of pending blocks:
           forward with hooks → HostBuffer                      (capture)
           write chunks + commit on worker threads              (writer)
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

import numpy as np

from saecache.core.distributed import ranks
from saecache.core.progress import Progress
from saecache.harvest.capture import HostBuffer, ResidualCapture
from saecache.harvest.config import HarvestConfig, HarvestResult
from saecache.harvest.models import load_config, load_model, load_tokenizer
from saecache.harvest.prepare import describe, open_or_create
from saecache.harvest.writer import BlockWriter
from saecache.storage.cache import Cache
from saecache.storage.layout import CacheLayout
from saecache.storage.location import location_of

log = logging.getLogger(__name__)


def harvest(cfg: HarvestConfig) -> HarvestResult:
    """Create or resume the cache at ``cfg.cache``; returns when every block is committed.

    Under torchrun, rank 0 takes the cache's lock, checks, creates and tokenises while the
    others wait; then every rank forwards its round-robin share of the pending units; rank 0
    finishes the cache and releases the lock.
    """
    group = ranks()
    device = group.device(cfg.device)  # cuda:LOCAL_RANK under torchrun; refused before any work
    config = load_config(cfg.model, cfg.revision)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    provenance, layout = describe(cfg, config, tokenizer)
    where = location_of(cfg.cache, cfg.storage_options)
    if cfg.overwrite:
        where.check_removable()  # a symbolic link is refused before anything is touched
    with ExitStack() as held:
        def prepare() -> None:
            held.enter_context(where.lock())  # before anything is created, cleaned or removed
            open_or_create(cfg, provenance, layout, tokenizer)

        group.on_main(prepare)
        cache = Cache.open(cfg.cache, writable=True, storage_options=cfg.storage_options)
        if cache.complete:
            return HarvestResult(cache, 0, 0, 0.0, was_complete=True)
        return _harvest_pending(cfg, group, cache, device)


def _harvest_pending(cfg: HarvestConfig, group, cache: Cache, device: str) -> HarvestResult:
    """Forward this rank's share of the uncommitted blocks; rank 0 finishes the cache."""
    pending = [int(b) for b in np.flatnonzero(~cache.committed())]
    units = group.mine(units_of(cache.layout, pending, cfg.batch_size))
    result = HarvestResult(cache, 0, 0, 0.0)
    if units:
        model = load_model(cfg.model, cfg.revision, cfg.dtype, device)
        label = "harvest" if group.world == 1 else f"harvest (rank {group.rank})"
        result = _run_blocks(cfg, cache, model, units, set(pending), label)
    group.barrier()
    if group.is_main and not cache.complete and cache.committed().all():
        cache.finalize()
    return result


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
    buffer = writer.acquire()
    # a missing or corrupt tokens chunk is refused by the cache's store, naming it: never zeros
    ids = capture.upload(cache.tokens[seqs.start:seqs.stop], buffer)  # (S, ctx) int32, on the device
    for start in range(0, len(seqs), cfg.batch_size):
        batch = ids[start:start + cfg.batch_size].long()  # (B, ctx)
        capture.run(batch, buffer, start)
    capture.finish(buffer)
    writer.submit(buffer, unit[0], [b for b in unit if b in todo])
