"""Stage two: train SAEs on one or more layers of a cache, every sister run sharing each batch.

    train(cfg)
      └─ for each --layer:
           runs = one Run per (layer, --l1 or --k)          resumed from their common checkpoint
           reader = PrefetchReader(cache, layer)             one read pass, batches on the device
           for each batch:  x' = x · √d / E‖x‖               (inputs normalised per layer)
               for run in runs: run.step(x')                 the same batch for every sister run
               log / snapshot (+ held-out metrics) / checkpoint
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace

import torch

from saecache.core.distributed import ranks
from saecache.core.errors import SaecacheError
from saecache.core.devices import default_device
from saecache.core.progress import Progress
from saecache.train.trainer import Run, RunIdentity
from saecache.train.runfolder import RunPaths, RunSpec, parse_l1
from saecache.storage.cache import Cache
from saecache.train.reader import Plan, PrefetchReader, ReaderConfig, read_heldout
from saecache.core.units import format_count

PRECISIONS = ("fp32", "tf32", "bf16")
SNAPSHOTS = (50_000_000, 100_000_000, 150_000_000, 200_000_000, 250_000_000)


@dataclass
class TrainConfig:
    """Everything `saecache train` needs; saved (in part) with every run as run.json."""

    cache: str
    """The cache to read (a folder or an fsspec URL)."""
    out: str
    """RUNS folder: one sub-folder per (layer, configuration)."""
    layers: tuple[int, ...]
    """Layers to train, one after the other in this process."""
    arch: str = "relu"
    """relu (L1 penalty weighted by decoder norms) or topk (with AuxK)."""
    expansion: int = 32
    """F = expansion × d."""
    l1: tuple[str, ...] = ("3e-4",)
    """relu: one run per value: 3e-4 (fixed) or adaptive:150[:start]."""
    k: tuple[int, ...] = ()
    """topk: one run per k."""
    tokens: int = 300_000_000
    """Training tokens per run."""
    snapshots: tuple[int, ...] = SNAPSHOTS
    """Token counts at which to save sae_layer{LL}_{SNAP}.pt (plus final)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 3e-4
    """Adam learning rate after warm-up."""
    lr_warmup: float = 0.01
    """Fraction of steps of linear learning-rate warm-up."""
    lr_decay: float = 0.2
    """Fraction of steps, at the end, of linear decay to 0."""
    l1_warmup: float = 0.05
    """Fraction of steps over which the L1 coefficient ramps up from 0."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    seed: int = 0
    """Seeds the SAE initialisation and the batch order."""
    device: str = field(default_factory=default_device)
    """torch device."""
    precision: str = "tf32"
    """fp32, tf32 (fp32 with TF32 matmuls on CUDA) or bf16 (autocast)."""
    dead_window: int = 10_000_000
    """A feature is dead if it has not fired in this many tokens."""
    aux_k: int | None = None
    """topk AuxK: dead features used to model the residual error (None: d // 2)."""
    aux_coeff: float = 1 / 32
    """topk AuxK loss weight."""
    log_every: int = 100
    """Steps between metrics lines."""
    checkpoint_every: int = 10_000_000
    """Tokens between checkpoints (also at every snapshot)."""
    heldout_rows: int = 65536
    """Held-out rows evaluated at each snapshot."""
    mix_chunks: int = 8
    """Chunks shuffled together by the reader."""
    reader_threads: int = 8
    """Threads reading chunks."""
    holdout_fraction: float = 0.01
    """Fraction of the cache's blocks (at its end) never trained on."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a URL cache."""
    progress: bool | None = None
    """Progress bar (None: when stderr is a terminal)."""

    def __post_init__(self):
        if self.arch not in ("relu", "topk"):
            raise ValueError(f"--arch {self.arch!r} is unknown: use relu or topk")
        if self.arch == "topk" and not self.k:
            raise ValueError("--arch topk needs at least one --k")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r} is unknown: use {', '.join(PRECISIONS)}")
        for l1 in self.l1:
            parse_l1(l1)  # raises ValueError naming the value
        for name in ("tokens", "batch_size", "expansion", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.tokens < self.batch_size:
            raise ValueError(f"--tokens {self.tokens} is less than one batch ({self.batch_size})")
        bad = [s for s in self.snapshots if not 0 < s < self.tokens]
        if bad:
            raise ValueError(f"--snapshots {format_count(bad[0])} is not below --tokens "
                             f"{format_count(self.tokens)}")
        self.snapshots = tuple(sorted(set(self.snapshots)))

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def run_specs(self, layer: int) -> list[RunSpec]:
        """One run per --l1 (relu) or --k (topk) value."""
        if self.arch == "topk":
            return [RunSpec(layer, "topk", self.expansion, k=k) for k in self.k]
        return [RunSpec(layer, "relu", self.expansion, *parse_l1(v)) for v in self.l1]

    def identity(self) -> dict:
        """The settings that determine a run's result (compared when resuming)."""
        skip = {"cache", "out", "layers", "l1", "k", "device", "log_every", "checkpoint_every",
                "reader_threads", "storage_options", "progress", "heldout_rows"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def reader_config(self) -> ReaderConfig:
        return ReaderConfig(batch_size=self.batch_size, seed=self.seed, mix_chunks=self.mix_chunks,
                            threads=self.reader_threads, holdout_fraction=self.holdout_fraction)


def train(cfg: TrainConfig) -> list[Run]:
    """Train every run of every requested layer; returns the finished runs.

    Under torchrun each rank takes a round-robin share of the layers and trains each of them
    with all its sister runs, from one read pass, on its own GPU.
    """
    group = ranks()
    cfg = replace(cfg, device=group.device(cfg.device))
    cache = Cache.open(cfg.cache, storage_options=cfg.storage_options)
    _check_cache(cache, cfg)
    _set_precision(cfg.precision)
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


def _set_precision(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def train_layer(cfg: TrainConfig, cache: Cache, layer: int) -> list[Run]:
    """Train all runs of one layer from one read pass of its residuals."""
    reader_cfg = cfg.reader_config()
    plan = Plan(cache.layout, layer, reader_cfg)
    if cfg.steps > plan.n_batches:
        raise SaecacheError(
            f"--tokens {format_count(cfg.tokens)} is more than the {format_count(plan.n_tokens)} "
            f"training tokens layer {layer} of {cache.location} holds (its last blocks are held "
            "out): lower --tokens or harvest more"
        )
    stats = cache.layer_stats(layer)
    scale = math.sqrt(cache.layout.d) / stats.mean_norm  # E‖x·scale‖ = √d
    identity = RunIdentity.of(cfg, cache, layer, scale)
    runs = [Run.open(RunPaths.of(cfg.out, spec), spec, identity, cfg, cache.layout.d)
            for spec in cfg.run_specs(layer)]
    start = Run.common_step(runs)
    for run in runs:
        run.resume(start)
    if start >= cfg.steps:
        return runs
    heldout = read_heldout(cache, layer, reader_cfg, cfg.heldout_rows)  # (H, d) fp16
    heldout = heldout.to(cfg.device).float() * scale
    with PrefetchReader(cache, layer, reader_cfg, cfg.device) as reader:
        _loop(cfg, runs, reader, heldout, start, scale)
    return runs


def _loop(cfg: TrainConfig, runs: list[Run], reader, heldout, start: int, scale: float) -> None:
    progress = Progress(cfg.tokens, f"layer {runs[0].spec.layer}", cfg.progress)
    progress.update(start * cfg.batch_size)
    snapshot_steps = {-(-s // cfg.batch_size) - 1: s for s in cfg.snapshots}  # step reaching s
    every = max(1, cfg.checkpoint_every // cfg.batch_size)
    window = _Window(reader, start)
    try:
        batches = reader.iter(start)
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
                    run.checkpoint(step + 1)
            progress.update(cfg.batch_size)
    finally:
        progress.close()


class _Window:
    """Throughput and data-wait fraction since the last metrics line."""

    def __init__(self, reader, step: int):
        self.reader = reader
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.step, self.time, self.wait = step, time.perf_counter(), self.reader.wait_seconds

    def take(self, step: int, batch_size: int) -> dict:
        seconds = max(time.perf_counter() - self.time, 1e-9)
        out = {"tokens_per_s": (step - self.step) * batch_size / seconds,
               "data_wait_fraction": (self.reader.wait_seconds - self.wait) / seconds,
               "bytes_read": self.reader.bytes_read}
        self._reset(step)
        return out
