"""Stage two: train SAEs on one or more layers of a cache, every sister run sharing each batch.

    train(cfg)
      └─ for each --layer:
           runs = one SisterRun per (layer, --l1 or --k)    resumed from their common checkpoint
           reader = PrefetchReader(cache, layer)             one read pass, batches on the device
           for each batch:  x' = x · √d / E‖x‖               (inputs normalised per layer)
               for run in runs: run.step(x')                 the same batch for every sister run
               log / snapshot (+ held-out metrics) / checkpoint
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import ExitStack
from dataclasses import replace

import torch

from saecache.core.atomic import check_folder
from saecache.core.distributed import ranks
from saecache.core.errors import SaecacheError
from saecache.core.lock import LOCK_NAME, FileLock
from saecache.core.progress import Progress
from saecache.core.units import format_count
from saecache.storage.cache import Cache
from saecache.storage.layout import CacheLayout
from saecache.storage.location import location_of
from saecache.train.config import TrainConfig
from saecache.train.reader import Plan, PrefetchReader, read_heldout
from saecache.train.runfolder import RunFolder, RunRecord
from saecache.train.sister import SisterRun
from saecache.train.trainer import set_precision

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> list[SisterRun]:
    """Train every run of every requested layer; returns the finished runs.

    Under torchrun each rank takes a round-robin share of the layers and trains each of them
    with all its sister runs, from one read pass, on its own GPU.
    """
    group = ranks()
    cfg = replace(cfg, device=group.device(cfg.device))
    check_folder(cfg.out)
    # A reader's lock on the cache for the whole run: refused while a harvest writes it, and
    # a writer (harvest --overwrite) is refused while this reads.
    with location_of(cfg.cache, cfg.storage_options).lock(exclusive=False):
        cache = Cache.open(cfg.cache, storage_options=cfg.storage_options)
        _check_cache(cache, cfg)
        for layer in cfg.layers:  # what needs the cache's d and size, before any run folder is made
            _check_layer(cfg, cache, layer)
        set_precision(cfg.precision)
        finished = []
        for layer in group.mine(list(cfg.layers)):
            finished += train_layer(cfg, cache, layer)
        group.barrier()
    return finished


def _check_cache(cache: Cache, cfg: TrainConfig) -> None:
    if not cache.complete:
        done = int(cache.committed().sum())
        raise SaecacheError(f"cache at {cache.location} is not complete ({done}/"
                            f"{cache.layout.n_blocks} blocks): finish its harvest first")
    missing = [layer for layer in cfg.layers if layer not in cache.layout.layers]
    if missing:
        raise SaecacheError(f"layer {missing[0]} is not in the cache at {cache.location} "
                            f"(it holds layers {', '.join(map(str, cache.layout.layers))})")


def _check_layer(cfg: TrainConfig, cache: Cache, layer: int) -> None:
    """One line if --tokens is more than ``layer`` holds or a sparsity does not fit the SAE's
    width (--k above F)."""
    plan = Plan(cache.layout, layer, cfg.reader)
    if cfg.steps > plan.n_batches:
        raise SaecacheError(
            f"--tokens {format_count(cfg.tokens)} is more than the {format_count(plan.n_tokens)} "
            f"training tokens layer {layer} of {cache.location} holds (its last blocks are held "
            "out): lower --tokens or harvest more"
        )
    try:
        runs = len(cfg.run_specs(layer, cache.layout.d))
    except ValueError as err:
        raise SaecacheError(str(err)) from None
    _check_memory(cfg, cache.layout, runs)


def _check_memory(cfg: TrainConfig, lay: CacheLayout, runs: int) -> None:
    """One line when what cannot fit at all is asked for: the reader's host buffers
    (train.reader.StagingRing: prefetch_groups + 1 groups of --mix-chunks fp16 chunks), or the
    SAEs with their gradients and Adam moments (4 × (2·F·d + F + d) float32 each)."""
    reader, d, n_features = cfg.reader, lay.d, cfg.expansion * lay.d
    chunk = lay.rows_per_block * d * 2
    buffers = (reader.prefetch_groups + 1) * reader.mix_chunks * chunk
    host = _memory("cpu")
    if host is not None and buffers > host:
        raise SaecacheError(
            f"--mix-chunks {reader.mix_chunks} needs {buffers / 2**30:,.1f} GiB of reading buffers "
            f"({reader.prefetch_groups + 1} groups × {reader.mix_chunks} chunks of "
            f"{chunk / 2**20:,.1f} MiB), more than this machine's {host / 2**30:,.1f} GiB: lower "
            "--mix-chunks")
    saes = runs * 4 * (2 * n_features * d + n_features + d) * 4
    device = _memory(cfg.device)
    if device is not None and saes > device:
        raise SaecacheError(
            f"{runs} SAE(s) of F = {n_features:,} features × d = {d} (--expansion {cfg.expansion}) "
            f"need {saes / 2**30:,.1f} GiB with their optimiser state, more than the "
            f"{device / 2**30:,.1f} GiB of {cfg.device}: lower --expansion")


def _memory(device: str) -> int | None:
    """Bytes of memory of a CPU or CUDA device (None: unknown)."""
    kind = torch.device(device).type
    try:
        if kind == "cuda":
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if kind == "cpu" else None
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def run_identity(cache: Cache, layer: int) -> dict:
    """What a run records of its cache: the provenance identity, the layout, the layer."""
    lay = cache.layout
    return {**cache.provenance.identity(), "ctx": lay.ctx, "d": lay.d, "n_seq": lay.n_seq,
            "seqs_per_block": lay.seqs_per_block, "layer": layer}


def train_layer(cfg: TrainConfig, cache: Cache, layer: int) -> list[SisterRun]:
    """Train all runs of one layer from one read pass of its residuals."""
    _check_layer(cfg, cache, layer)
    stats, d = cache.layer_stats(layer), cache.layout.d
    scale = math.sqrt(d) / stats.mean_norm  # E‖x·scale‖ = √d
    mean = torch.from_numpy(stats.mean * scale).float()  # (d,) where b_dec starts
    records = [RunRecord(spec, cfg.identity(), run_identity(cache, layer), scale, cfg.cache, cfg.logging())
               for spec in cfg.run_specs(layer, d)]
    with ExitStack() as held:  # each run folder's writer lock, from before run.json is read
        for folder in (RunFolder.of(cfg.out, r.spec) for r in records):
            held.enter_context(FileLock(folder.dir / LOCK_NAME, f"run {folder.dir}").exclusive())
        runs = [SisterRun.open(RunFolder.of(cfg.out, r.spec), r, cfg, d, mean) for r in records]
        start = SisterRun.common_step(runs)
        heldout = None  # read before anything is written: a damaged cache leaves no run behind
        if start < cfg.steps:
            heldout = read_heldout(cache, layer, cfg.reader, cfg.heldout_rows)  # (H, d) fp16
            heldout = heldout.to(cfg.device).float() * scale
        bytes_read = [run.resume(start) for run in runs][0]  # each saved the same reader count
        if heldout is None:
            return runs
        if warning := cfg.checkpoint_warning():  # as training starts: not before a refusal
            log.warning("warning: %s", warning)
        with PrefetchReader(cache, layer, cfg.reader, cfg.device) as reader:
            _loop(cfg, runs, _Window(reader, start, bytes_read, cfg.device), heldout, start, scale)
    return runs


def _loop(cfg: TrainConfig, runs: list[SisterRun], window: _Window, heldout, start: int,
          scale: float) -> None:
    progress = Progress(cfg.tokens, f"layer {runs[0].spec.layer}", cfg.progress, moved="read")
    progress.update(start * cfg.batch_size)
    snapshot_steps = {-(-s // cfg.batch_size) - 1: s for s in cfg.snapshots}  # step reaching s
    every = max(1, cfg.checkpoint_every // cfg.batch_size)
    try:
        batches = window.reader.iter(start)
        for step in range(start, cfg.steps):
            x = next(batches).float() * scale  # (B, d) on the device, E‖x‖ = √d
            for run in runs:  # every sister run trains on this same batch
                run.step(x, step)
            last = step == cfg.steps - 1
            if (step + 1) % cfg.log_every == 0 or last or step in snapshot_steps:
                timing = window.take(step + 1, cfg.batch_size)
                for run in runs:
                    run.log(step, timing)
            if step in snapshot_steps or last:
                for run in runs:
                    run.save_snapshot(step, None if last else snapshot_steps[step], heldout)
            if step in snapshot_steps or last or (step + 1) % every == 0:
                for run in runs:
                    run.checkpoint(step + 1, window.bytes_read)
            progress.update(cfg.batch_size, window.reader.bytes_read)  # this process's reads
    finally:
        progress.close()


class _Window:
    """Throughput and data-wait fraction since the last metrics line, and the bytes read.

    All three are measurements of this process, not results: tokens/s and the wait are
    wall-clock, and bytes_read counts what the reader's threads have read, read-ahead
    included (it continues from the checkpoint a run resumed from, plus the chunks re-read)."""

    def __init__(self, reader, step: int, bytes_before: int = 0, device="cpu"):
        self.reader, self.bytes_before, self.device = reader, bytes_before, torch.device(device)
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.step, self.time, self.wait = step, time.perf_counter(), self.reader.wait_seconds

    @property
    def bytes_read(self) -> int:
        """Stored bytes of the chunks read by the run so far, over every process of it."""
        return self.bytes_before + self.reader.bytes_read

    def take(self, step: int, batch_size: int) -> dict:
        # The clock is read once the device has run every step queued: without the sync the
        # window would end while the GPU still works on its last steps (~10% high), and the
        # next window would be charged for them. The metrics line syncs right after anyway.
        synchronize(self.device)
        seconds = max(time.perf_counter() - self.time, 1e-9)
        out = {"tokens_per_s": (step - self.step) * batch_size / seconds,
               "data_wait_fraction": (self.reader.wait_seconds - self.wait) / seconds,
               "bytes_read": self.bytes_read}
        self._reset(step)
        return out


def synchronize(device: torch.device) -> None:
    """Wait until a CUDA device has run everything queued on it (other devices: nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
