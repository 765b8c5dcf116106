"""A run folder: one typed model of what `saecache train` writes, read by eval, report and export.

    RUNS/layer05-relu-x32-l1-0.0003/        one folder per (layer, configuration): RunSpec.name
        run.json                            RunRecord: spec, train settings, cache identity, scale
        metrics.jsonl                       one JSON object per metrics line or snapshot
        eval.json                           written by `saecache eval`
        sae_layer05_50M.pt … _final.pt      snapshots (Snapshot)
        checkpoints/step000012207.pt        the latest two checkpoints

Every path and file name of a run is computed here and nowhere else.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from saecache.core.atomic import read_json, read_jsonl, temporary_target, write_json
from saecache.core.errors import SaecacheError
from saecache.core.units import format_count, parse_count
from saecache.sae.archs import arch_of
from saecache.sae.spec import RunSpec
from saecache.storage.provenance import ancestors, resolve_recorded

RUN_FILE, METRICS_FILE, EVAL_FILE, CHECKPOINTS = "run.json", "metrics.jsonl", "eval.json", "checkpoints"
FINAL = "final"
_SNAPSHOT_FILE = re.compile(r"^sae_layer(\d{2,})_([0-9]+[KMBT]?|final)\.pt$")
_CHECKPOINT_FILE = re.compile(r"^step\d{9}\.pt$")


def snapshot_name(layer: int, tokens: int | None) -> str:
    """``sae_layer05_50M.pt``; ``tokens=None`` gives the ``final`` snapshot."""
    return f"sae_layer{layer:02d}_{FINAL if tokens is None else format_count(tokens)}.pt"


def snapshot_label(text: str) -> str:
    """A snapshot as a user names it (``16k``, ``16000``, ``final``, the file name) → its label."""
    text = str(text).strip()
    match = _SNAPSHOT_FILE.match(text)
    if match:
        return match.group(2)
    if text.lower() == FINAL:
        return FINAL
    try:
        return format_count(parse_count(text))
    except ValueError:
        return text


class Snapshot(NamedTuple):
    """One ``sae_layer{LL}_{SNAP}.pt`` file of a run."""

    layer: int
    label: str
    """``50M``, ``16K`` or ``final``."""
    path: Path

    @classmethod
    def parse(cls, path: Path) -> Snapshot | None:
        """The snapshot a file is, by its name (None for any other file)."""
        match = _SNAPSHOT_FILE.match(path.name)
        return cls(int(match.group(1)), match.group(2), path) if match else None

    @property
    def tokens(self) -> int | None:
        """Tokens seen when it was saved (None: the final snapshot)."""
        return None if self.label == FINAL else parse_count(self.label)

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: by tokens, the final snapshot last."""
        return (1, 0) if self.tokens is None else (0, self.tokens)


@dataclass(frozen=True)
class RunRecord:
    """run.json: what a run was trained from and with; a resumed run must match it exactly."""

    spec: RunSpec
    """Layer, architecture, expansion and sparsity."""
    train: dict
    """TrainConfig.identity(): hyper-parameters, seed, batch-order settings."""
    cache: dict
    """The cache's provenance identity and layout (storage.provenance.identity)."""
    scale: float
    """Input scale √d / E‖x‖ from the cache's statistics."""
    cache_location: str | None = None
    """Where the cache was when the run started, absolute when local (informative: caches
    move; relative to the working directory before saecache 0.3)."""
    logging: dict | None = None
    """TrainConfig.logging(): --log-every and --heldout-rows (informative; None before 0.3)."""

    @property
    def model(self) -> str:
        return self.cache["model"]

    def identity(self) -> dict:
        """Everything a resumed run must match (the cache's location aside)."""
        return {"spec": self.spec.to_json(), "train": self.train, "cache": self.cache,
                "scale": self.scale}

    @property
    def l1_anthropic(self) -> float | None:
        """The run's L1 coefficient as λ_Anthropic / SAELens standard (None without one)."""
        if self.spec.l1 is None or "d" not in self.cache:
            return None
        if self.train.get("conventions", 1) < 2:  # saecache 0.1.0's loss: λ_Anthropic = d·l1
            return self.spec.l1 * self.cache["d"]
        return arch_of(self.spec.arch).anthropic_lambda(self.spec.l1, self.cache["d"])

    def to_json(self) -> dict:
        """run.json: the identity, where the cache was, and λ_Anthropic (informative)."""
        data = {**self.identity(), "cache_location": self.cache_location,
                "l1_anthropic": self.l1_anthropic}
        return data if self.logging is None else {**data, "logging": self.logging}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> RunRecord:
        """The record in ``data`` (read from ``path``); one line when it is not one."""
        try:
            if not all(isinstance(data.get(key), dict) for key in ("spec", "train", "cache")):
                raise TypeError
            return cls(RunSpec.from_json(data["spec"]), data["train"], data["cache"],
                       float(data["scale"]), data.get("cache_location"), data.get("logging"))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise SaecacheError(f"{path} is not a saecache run record (spec, train, cache): was "
                                "this run written by saecache train?") from None


class RunFolder:
    """Where one run's files live, and their typed readers."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self.config = self.dir / RUN_FILE
        self.metrics = self.dir / METRICS_FILE
        self.eval = self.dir / EVAL_FILE
        self.checkpoints = self.dir / CHECKPOINTS

    @classmethod
    def of(cls, root: str | Path, spec: RunSpec) -> RunFolder:
        """The folder of ``spec`` under RUNS."""
        return cls(Path(root) / spec.name)

    @classmethod
    def open(cls, folder: str | Path) -> RunFolder:
        """An existing run folder; one line saying what ``folder`` is otherwise."""
        run = cls(folder)
        if not run.is_run:
            raise SaecacheError(_not_a_run(run.dir))
        return run

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def is_run(self) -> bool:
        return self.config.is_file()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.dir)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunFolder) and self.dir == other.dir

    def __hash__(self) -> int:
        return hash(self.dir)

    # ---- run.json ----------------------------------------------------------------------------

    def record(self) -> RunRecord:
        return RunRecord.from_json(read_json(self.config), self.config)

    def recorded_cache(self, record: RunRecord) -> str | None:
        """Where run.json says the run's cache is, from any working directory: a URL as it is,
        a local path absolute. A relative one (before saecache 0.3, relative to the working
        directory of the train) is looked for under the run folder's ancestors, nearest first
        (train's --out was given relative to that same directory), then the working directory;
        if found nowhere, it is returned absolute from the working directory."""
        location = record.cache_location
        if location is None or "://" in location:
            return location
        return resolve_recorded(location, ancestors(str(self.dir))) or os.path.abspath(location)

    def write_record(self, record: RunRecord) -> None:
        write_json(self.config, record.to_json())

    # ---- snapshots ---------------------------------------------------------------------------

    def snapshot_path(self, layer: int, tokens: int | None) -> Path:
        return self.dir / snapshot_name(layer, tokens)

    def snapshots(self) -> list[Snapshot]:
        """The run's snapshot files, by tokens, the final one last."""
        found = (Snapshot.parse(p) for p in self.dir.glob("sae_layer*_*.pt"))
        return sorted((s for s in found if s is not None), key=lambda s: (s.order, s.layer))

    def snapshot(self, which: str) -> Snapshot:
        """The snapshot called ``which`` (16k, 16K, 16000, final or its file name)."""
        snapshots = self._existing_snapshots()
        label = snapshot_label(which)
        chosen = [s for s in snapshots if s.label == label]
        if not chosen:
            raise SaecacheError(f"run {self.dir} has no snapshot {which!r} (it has "
                                f"{', '.join(s.label for s in snapshots)})")
        return chosen[-1]

    def select(self, which: str) -> list[Snapshot]:
        """``all`` snapshots, or the one called ``which``."""
        return self._existing_snapshots() if which == "all" else [self.snapshot(which)]

    def _existing_snapshots(self) -> list[Snapshot]:
        snapshots = self.snapshots()
        if not snapshots:
            raise SaecacheError(f"run {self.dir} has no snapshots: train it first")
        return snapshots

    # ---- metrics and evaluation ----------------------------------------------------------------

    def metrics_lines(self) -> list[dict]:
        """metrics.jsonl's lines ([] before the first)."""
        return read_jsonl(self.metrics) if self.metrics.is_file() else []

    def heldout_line(self, snapshot: Snapshot) -> dict | None:
        """The held-out metrics line written with ``snapshot``, if any."""
        found = [m for m in self.metrics_lines() if m.get("split") == "heldout"
                 and m.get("snapshot") == snapshot.path.name]
        return found[-1] if found else None

    def eval_results(self) -> dict:
        """eval.json's ``snapshots``: snapshot file name → results ({} before any eval)."""
        if not self.eval.is_file():
            return {}
        results = read_json(self.eval).get("snapshots")
        if not isinstance(results, dict):
            raise SaecacheError(f"{self.eval} has no 'snapshots' table: run saecache eval again")
        return results

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step{step:09d}.pt"

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.stem[4:]) for p in self.checkpoints.iterdir() if _CHECKPOINT_FILE.match(p.name))

    # ---- what a killed run leaves ------------------------------------------------------------

    def remove_temporaries(self) -> list[Path]:
        """Remove the temporaries (core.atomic) of the run's own files that a killed process
        left: ``.run.json.XXXXXXXX``, ``.sae_layer01_100K.pt.XXXXXXXX``, ``checkpoints/.step….pt.…``
        (a snapshot's is as large as the snapshot). Nothing else is touched; returns them."""
        own = {RUN_FILE, METRICS_FILE, EVAL_FILE}
        found = [p for p in _files(self.dir) if _is_own(temporary_target(p.name), own, _SNAPSHOT_FILE)]
        found += [p for p in _files(self.checkpoints)
                  if _is_own(temporary_target(p.name), set(), _CHECKPOINT_FILE)]
        for path in found:
            path.unlink(missing_ok=True)
        return found


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def _is_own(target: str | None, names: set[str], pattern: re.Pattern) -> bool:
    return target is not None and (target in names or pattern.match(target) is not None)


def find_runs(root: str | Path) -> list[RunFolder]:
    """The runs at ``root``: itself if it is a run folder, else its sub-folders holding run.json."""
    root = Path(root)
    if not root.is_dir():
        raise SaecacheError(f"{root} is not a folder: give a run folder or the RUNS folder of "
                            "`saecache train --out`")
    if RunFolder(root).is_run:
        return [RunFolder(root)]
    runs = sorted((RunFolder(p) for p in root.iterdir() if RunFolder(p).is_run), key=lambda r: r.name)
    if not runs:
        raise SaecacheError(f"no runs in {root}: expected a run folder or sub-folders holding "
                            f"{RUN_FILE} (the --out folder of `saecache train`)")
    return runs


def _not_a_run(path: Path) -> str:
    if not path.is_dir():
        return f"run folder {path} does not exist"
    inside = sorted(p.name for p in path.iterdir() if RunFolder(p).is_run)
    if inside:
        shown = ", ".join(inside[:4]) + (", …" if len(inside) > 4 else "")
        return f"{path} is a RUNS folder, not a run: pass its run folders ({shown})"
    return f"{path} is not a saecache run folder (no {RUN_FILE}): pass RUNS/<run> folders"

