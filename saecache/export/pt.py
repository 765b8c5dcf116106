"""The ``pt`` export: the runs' snapshot files, copied byte for byte, with a model card.

    out/sae_layer{LL}_{SNAP}.pt     every snapshot (or one), named as the run folder names it
    out/README.md
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from saecache.export.folder import publish
from saecache.export.layout import ExportedFile
from saecache.export.runs import read_runs


def export_pt(runs: Iterable[str | Path], out: str | Path, snapshot: str | None = None,
              repo_id: str | None = None) -> list[Path]:
    """Copy the runs' snapshots (all of them, or only ``snapshot``) into ``out`` with a card.

    Files keep the model card's naming, sae_layer{LL}_{SNAP}.pt, and their bytes. Returns
    every file written, README.md last.
    """
    files = [ExportedFile(run, snap, snap.path.name) for run in read_runs(runs)
             for snap in ([run.snapshot(snapshot)] if snapshot else run.snapshots)]

    def fill(folder: Path) -> None:
        for f in files:
            shutil.copyfile(f.snapshot.path, folder / f.name)

    return publish(Path(out), "pt", files, repo_id, fill)
