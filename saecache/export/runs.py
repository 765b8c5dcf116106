"""The runs an export reads: run folders of one base model, at most one per layer.

Runs are read through :class:`saecache.train.runfolder.RunFolder` only; this module adds what
an export asks of them (its snapshots, CE loss recovered) and the checks that keep the files
of one export from colliding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from saecache.core.errors import SaecacheError
from saecache.sae.spec import RunSpec
from saecache.train.runfolder import RunFolder, RunRecord, Snapshot, find_runs


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per run read
class ExportRun:
    """A run folder written by ``saecache train``, read for export."""

    folder: RunFolder
    """Where the run's files are (run.json, metrics.jsonl, eval.json, snapshots)."""
    record: RunRecord
    """run.json: spec, train settings, cache provenance, input scale."""
    snapshots: tuple[Snapshot, ...]
    """Its snapshot files in token order, final last (at least one)."""

    @classmethod
    def read(cls, path: str | Path) -> ExportRun:
        """The run at ``path``; one line when it is not a run or has no snapshots."""
        folder = RunFolder.open(path)
        record = folder.record()
        return cls(folder, record, tuple(folder.select("all")))

    @property
    def path(self) -> Path:
        return self.folder.dir

    @property
    def spec(self) -> RunSpec:
        """Layer, arch, expansion, L1 / target L0 / k, from run.json."""
        return self.record.spec

    def snapshot(self, which: str) -> Snapshot:
        """The snapshot called ``which`` (16k, 16K, 16000 and final are accepted) or an error."""
        return self.folder.snapshot(which)

    def ce_loss_recovered(self, snapshot: Snapshot) -> float | None:
        """From eval.json when the snapshot was evaluated (None otherwise, or if unreadable)."""
        try:
            value = self.folder.eval_results()[snapshot.path.name]["ce_loss_recovered"]
        except (SaecacheError, AttributeError, KeyError, TypeError):
            return None  # not evaluated (or not readable): the card shows "—"
        return value if isinstance(value, (int, float)) else None


def read_runs(paths: Iterable[str | Path]) -> list[ExportRun]:
    """The runs to export into one folder, by layer, refusing sets whose files would collide.

    One export holds one base model, and at most one run per layer: two families (say L1
    3e-4 and 8e-5) of the same layer would both write sae_layer05_final.pt.
    """
    runs, seen = [], set()
    for path in paths:
        run = ExportRun.read(path)
        if run.path.resolve() not in seen:
            seen.add(run.path.resolve())
            runs.append(run)
    if not runs:
        raise SaecacheError("no runs to export: pass one or more RUNS/<run> folders")
    _check_one_model(runs)
    _check_one_run_per_layer(runs)
    return sorted(runs, key=lambda r: r.spec.layer)


def _check_one_model(runs: list[ExportRun]) -> None:
    models = sorted({run.record.model for run in runs})
    if len(models) > 1:
        raise SaecacheError(f"the runs come from different models ({', '.join(models)}): "
                            "export each model's runs to its own folder")


def _check_one_run_per_layer(runs: list[ExportRun]) -> None:
    by_layer: dict[int, ExportRun] = {}
    for run in runs:
        other = by_layer.setdefault(run.spec.layer, run)
        if other is not run:
            raise SaecacheError(
                f"runs {other.path} and {run.path} both hold layer {run.spec.layer} "
                f"({other.spec.family} and {run.spec.family}): their files would collide; "
                "export each family to its own folder")


def sister_families(parents: Iterable[Path]) -> dict[str, list[ExportRun]]:
    """Family → its runs, over every readable run folder in ``parents`` (the RUNS folders)."""
    families: dict[str, list[ExportRun]] = {}
    for parent in sorted(set(parents)):
        for run in _readable_runs(parent):
            families.setdefault(run.spec.family, []).append(run)
    return families


def _readable_runs(parent: Path) -> Iterator[ExportRun]:
    """The runs in ``parent`` that can be read: an unfinished or broken sister is skipped,
    it is not worth failing the export."""
    try:
        folders = find_runs(parent)
    except SaecacheError:
        return
    for folder in folders:
        try:
            yield ExportRun.read(folder.dir)
        except SaecacheError:
            continue
