"""What the report knows about one run: RunData, read through saecache.train.runfolder.

A *family* is the runs that differ only in layer (RunSpec.family, e.g. relu-x32-l1-0.0003);
when run.json is unreadable it is the folder name without its ``layerLL-``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from saecache.core.errors import SaecacheError
from saecache.report.formatting import number
from saecache.report.lossfloor import FitOptions, LossFloorFit, fit_loss_floor, train_curve
from saecache.train.runfolder import EVAL_FILE, METRICS_FILE, RUN_FILE, RunFolder, snapshot_name

EVAL_HINT = "run `saecache eval RUNS` to add it"
_LAYER_PREFIX = re.compile(r"^layer(\d+)-(.+)$")
_UNREADABLE = (SaecacheError, KeyError, TypeError, ValueError, AttributeError)


class FinalMetrics(NamedTuple):
    """A run's end-of-training numbers as the heatmap shows them."""

    fvu: float
    l0: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    """NaN without eval.json (held-out lines do not measure it)."""
    ce_loss_recovered: float
    """NaN without eval.json."""
    kl: float
    """NaN without eval.json."""
    source: str
    """Where they come from: ``eval.json (sae_layer05_final.pt)`` or ``held-out``."""


class RunData(NamedTuple):
    """What the report knows about one run folder."""

    name: str
    """Folder name, e.g. layer05-relu-x32-l1-0.0003."""
    dir: Path
    family: str
    """The sister-run family: RunSpec.family (the folder name without layerLL- if unreadable)."""
    layer: int
    """Layer from run.json (from the folder name if run.json is unreadable; -1 if neither)."""
    model: str | None
    """The model whose residuals the SAE was trained on (run.json's cache.model)."""
    n_features: int | None
    """F = expansion × d (run.json's spec and cache); None if unreadable."""
    target_l0: float | None
    """The adaptive L1's target L0 (``--l1 adaptive:T``), None for a fixed coefficient."""
    lr_decay: float | None
    """Fraction of steps, at the end, over which the learning rate decays to 0."""
    l1_anthropic: float | None
    """The L1 coefficient as λ_Anthropic: the last metrics line's (adaptive runs move), else
    run.json's; None without one (docs/l1-units.md)."""
    train: list[dict]
    """metrics.jsonl lines with split == train, by tokens."""
    heldout: list[dict]
    """metrics.jsonl lines with split == heldout, by tokens."""
    eval_snapshot: str | None
    """The eval.json snapshot used (the final one if evaluated), or None."""
    eval: dict | None
    """Its eval.json record: ce_loss_recovered, fvu, l0, mse, dead_fraction, …"""
    fit: LossFloorFit | None
    """Loss-floor fit of the train loss, or None (see notes)."""
    notes: tuple[str, ...]
    """Why something is missing, for the reader of the report."""

    @property
    def has_metrics(self) -> bool:
        return bool(self.train or self.heldout)

    @property
    def tokens(self) -> int | None:
        """Tokens trained so far (the last metrics line), None without metrics."""
        lines = self.train + self.heldout
        return max(line["tokens"] for line in lines) if lines else None

    @property
    def final_heldout(self) -> dict:
        """The last held-out metrics line ({} if none)."""
        return self.heldout[-1] if self.heldout else {}

    def final_metrics(self) -> FinalMetrics:
        """eval.json's values when present, else the last held-out line's; NaN where neither."""
        if self.eval is not None:
            source, values = f"eval.json ({self.eval_snapshot})", self.eval
        else:
            source, values = "held-out", self.final_heldout
        return FinalMetrics(*(number(values.get(key)) for key in FinalMetrics._fields[:-1]), source)


def load_run(folder: RunFolder, options: FitOptions = FitOptions()) -> RunData:
    """Read run.json, metrics.jsonl and eval.json of one run and fit its loss floor."""
    notes: list[str] = []
    family, layer, model, features, target, lr_decay, lam = _read_record(folder, notes)
    train, heldout = _read_lines(folder, notes)
    eval_snapshot, record = _read_eval(folder, layer, notes)
    fit = _fit(folder.name, train, options, notes)
    lam = train[-1].get("l1_anthropic", lam) if train else lam
    return RunData(folder.name, folder.dir, family, layer, model, features, target, lr_decay, lam,
                   train, heldout, eval_snapshot, record, fit, tuple(notes))


def _read_record(folder: RunFolder, notes: list[str]) -> tuple:
    """(family, layer, model, F, target L0, lr_decay, λ_Anthropic) from run.json; family and
    layer from the folder name (the rest None) if unreadable."""
    try:
        record = folder.record()
        spec = record.spec
        d = record.cache.get("d")
        features = int(spec.expansion) * int(d) if isinstance(d, int) else None
        return (spec.family, int(spec.layer), record.cache.get("model"), features, spec.target_l0,
                record.train.get("lr_decay"), record.l1_anthropic)
    except _UNREADABLE as err:
        notes.append(f"{RUN_FILE} unreadable ({err}); layer taken from the folder name")
    match = _LAYER_PREFIX.match(folder.name)
    family, layer = (match.group(2), int(match.group(1))) if match else (folder.name, -1)
    return family, layer, None, None, None, None, None


def _read_lines(folder: RunFolder, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """(train, held-out) metrics lines, each by tokens; lines without tokens are ignored."""
    lines = [line for line in folder.metrics_lines() if isinstance(line.get("tokens"), (int, float))]
    train = sorted((l for l in lines if l.get("split") == "train"), key=lambda l: l["tokens"])
    heldout = sorted((l for l in lines if l.get("split") == "heldout"), key=lambda l: l["tokens"])
    if not lines:
        notes.append(f"no metrics yet ({METRICS_FILE} missing or empty): left out of the plots")
    elif not heldout:
        notes.append("no held-out snapshot yet")
    return train, heldout


def _read_eval(folder: RunFolder, layer: int, notes: list[str]) -> tuple[str | None, dict | None]:
    """(snapshot name, record) of the final snapshot in eval.json, else of its latest one."""
    if not folder.eval.is_file():
        return None, None
    try:
        snapshots = folder.eval_results()
        name = snapshot_name(layer, None)
        if name not in snapshots:
            name = max(snapshots, key=lambda n: snapshots[n].get("tokens_seen", 0))
            notes.append(f"{EVAL_FILE} has no final snapshot; showing {name}")
        return name, snapshots[name]
    except _UNREADABLE as err:
        notes.append(f"{EVAL_FILE} unreadable ({err}); {EVAL_HINT}")
        return None, None


def _fit(name: str, train: list[dict], options: FitOptions, notes: list[str]) -> LossFloorFit | None:
    """The loss-floor fit of the train curve; None, with a note, when there is none to trust."""
    if not train:
        return None
    try:
        fit = fit_loss_floor(*train_curve(train, options.metric), skip=options.skip,
                             cutoff=options.cutoff, run=name, metric=options.metric)
    except ValueError as err:
        notes.append(f"no loss-floor fit: {str(err).removeprefix(name + ': ')}")
        return None
    if fit.unusable:
        notes.append(f"loss-floor fit unusable: {fit.unusable}")
    return fit


def families(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs with metrics grouped by family (sorted), each family's runs by layer."""
    groups: dict[str, list[RunData]] = {}
    for run in sorted(runs, key=lambda r: (r.family, r.layer)):
        if run.has_metrics:
            groups.setdefault(run.family, []).append(run)
    return groups
