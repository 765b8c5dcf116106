"""Stage two's settings: how a layer is read (ReaderConfig) and how its SAEs train (TrainConfig).

Each field's default, range and help are written here once; the command line is built from
them (saecache.core.options) and a config checks itself when made.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from saecache.core.devices import default_device
from saecache.core.settings import result_fields, setting, validate
from saecache.core.units import format_count, format_tokens
from saecache.sae.archs import ARCHS, arch_of
from saecache.sae.spec import RunSpec


@dataclass(frozen=True)
class ReaderConfig:
    """How stage two reads one layer of a cache; the batch order depends on nothing else."""

    batch_size: int = setting(4096, min=1)
    """Tokens per step."""
    seed: int = setting(0, min=0, max=2**32 - 1)
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


PRECISIONS = ("fp32", "tf32", "bf16")
AUTO_LR, AUTO_LR_FEATURES = 2e-4, 2**14
"""The default learning rate is AUTO_LR · √(AUTO_LR_FEATURES / F) (Gao et al. 2024)."""
CONVENTIONS = 2
"""Version of what --l1, --grad-clip and --lr mean and of the initialisation (docs/l1-units.md):
1 in saecache 0.1.0 (clip on the per-element loss, b_dec at 0, fixed lr); 2 since."""
SNAPSHOTS = (50_000_000, 100_000_000, 150_000_000, 200_000_000, 250_000_000)
"""The model card's snapshots; by default those below --tokens are saved."""


@dataclass
class TrainConfig:
    """Everything `saecache train` needs; its identity() is saved with every run in run.json."""

    cache: str = setting(result=False)
    """The cache to read (a folder or an fsspec URL)."""
    layers: tuple[int, ...] = setting(min=0, flag="--layer", result=False)
    """Layer to train (repeatable: layers train one after another in this process)."""
    out: str = setting("runs", result=False)
    """RUNS folder; one sub-folder per run."""
    arch: str = setting("relu", choices=tuple(ARCHS))
    """relu: L1 penalty weighted by decoder norms; topk: TopK with AuxK; batchtopk: BatchTopK (k per row on average over a batch); jumprelu: JumpReLU with an L0 penalty (--l1 gives its λ)."""
    expansion: int = setting(32, min=1)
    """F = expansion × d."""
    l1: tuple[str, ...] = setting(("3e-4",), result=False)
    """relu: one run per value: 3e-4 (fixed; λ_Anthropic = l1·d^1.5, docs/l1-units.md), anthropic:5 (λ in Anthropic/SAELens units) or adaptive:150[:start] (target L0)."""
    k: tuple[int, ...] = setting((), min=1, result=False)
    """topk, batchtopk: one run per k."""
    tokens: int = setting(300_000_000, min=1, count=True)
    """Training tokens per run."""
    snapshots: tuple[int, ...] | None = setting(
        None, min=1, count=True, separator=",", show="those of 50M,100M,150M,200M,250M below --tokens")
    """Token counts at which to save a snapshot; final is always saved."""
    lr: float | None = setting(None, min=0, min_open=True, show="2e-4 / √(F / 2^14)")
    """Adam learning rate."""
    lr_warmup: float = setting(0.01, min=0, max=1)
    """Fraction of steps of learning-rate warm-up."""
    lr_decay: float = setting(0.2, min=0, max=1)
    """Fraction of steps, at the end, of linear decay to 0."""
    l1_warmup: float = setting(0.05, min=0, max=1)
    """Fraction of steps over which the L1 coefficient ramps up."""
    l0_ramp: float = setting(0.5, min=0, max=1)
    """adaptive: fraction of steps, after the L1 warm-up, over which the target L0 approaches from the L0 reached."""
    grad_clip: float = setting(1.0, min=0, min_open=True)
    """Gradient-norm clipping threshold, in the units of the Anthropic/SAELens-standard loss (squared error summed over d)."""
    device: str = setting(factory=default_device, result=False)
    """torch device. [default: cuda if available, else cpu]"""
    precision: str = setting("tf32", choices=PRECISIONS)
    """fp32, tf32 matmuls, or bf16 autocast."""
    dead_window: int = setting(10_000_000, min=1, count=True)
    """Tokens without firing after which a feature counts as dead."""
    aux_k: int | None = setting(None, min=1, show="d // 2")
    """topk AuxK: dead features used to model the residual error."""
    aux_coeff: float = setting(1 / 32, min=0)
    """topk AuxK loss weight."""
    log_every: int = setting(100, min=1, result=False)
    """Steps per metrics line."""
    checkpoint_every: int = setting(10_000_000, min=1, count=True, result=False)
    """Tokens between checkpoints."""
    heldout_rows: int = setting(65536, min=1, result=False)
    """Held-out rows evaluated at each snapshot."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How the layer is read: batch size, seed, mixing, threads, held-out fraction."""
    storage_options: dict = setting(factory=dict, result=False)
    """fsspec options for a URL cache."""
    progress: bool | None = setting(None, result=False)
    """Progress bar [default: on a terminal]."""

    def __post_init__(self):
        validate(self)
        if "://" not in self.cache:  # run.json records where the cache is, from any directory
            self.cache = os.path.abspath(self.cache)
        self.layers = tuple(dict.fromkeys(self.layers))
        if self.snapshots is None:
            self.snapshots = tuple(s for s in SNAPSHOTS if s < self.tokens)
        self.run_specs(0, d=None)  # ValueError for --l1 values, or --k missing for topk
        if self.tokens < self.batch_size:
            raise ValueError(f"--tokens {self.tokens} is less than one batch ({self.batch_size})")
        bad = [s for s in self.snapshots if not 0 < s < self.tokens]
        if bad:
            raise ValueError(f"--snapshots {format_count(bad[0])} is not below --tokens "
                             f"{format_count(self.tokens)}")
        self.snapshots = tuple(sorted(set(self.snapshots)))

    @property
    def batch_size(self) -> int:
        return self.reader.batch_size

    @property
    def seed(self) -> int:
        return self.reader.seed

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def run_specs(self, layer: int, d: int | None) -> list[RunSpec]:
        """One run per --l1 (relu) or --k (topk) value, for a layer of width d (None: not known
        yet; the values are checked, but not against the SAE's width)."""
        n_features = None if d is None else self.expansion * d
        sparsities = arch_of(self.arch).sparsities(self.l1, self.k, d or 1, n_features)
        return [RunSpec(layer, self.arch, self.expansion, **s) for s in sparsities]

    def checkpoint_warning(self) -> str | None:
        """One line when no checkpoint falls inside the run (--checkpoint-every ≥ --tokens):
        an interrupted run would restart from its last snapshot, or from zero."""
        if self.checkpoint_every < self.tokens:
            return None
        since = "its last snapshot (--snapshots)" if self.snapshots else "zero"
        return (f"--checkpoint-every {format_tokens(self.checkpoint_every)} is not less than --tokens "
                f"{format_tokens(self.tokens)}: no checkpoint is saved before the end, so an "
                f"interrupted run restarts from {since}; pass a smaller --checkpoint-every to be "
                "able to resume mid-run")

    def logging(self) -> dict:
        """The settings of what a run measures, not of its weights: recorded in run.json (not
        compared when resuming) so that the model card's commands reproduce metrics.jsonl too."""
        return {"log_every": self.log_every, "heldout_rows": self.heldout_rows}

    def learning_rate(self, n_features: int) -> float:
        """--lr, or by default Gao et al.'s 2e-4 / √(F / 2^14) for F features."""
        return self.lr if self.lr is not None else AUTO_LR * math.sqrt(AUTO_LR_FEATURES / n_features)

    def identity(self) -> dict:
        """The settings that determine a run's result (compared when resuming), with the
        version of the loss conventions they are read in."""
        settings = {**result_fields(self), **result_fields(self.reader), "conventions": CONVENTIONS}
        return json.loads(json.dumps(settings))
