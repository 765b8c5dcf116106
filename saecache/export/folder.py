"""Writing an export folder: staged beside ``out``, then swapped in as a whole.

An export is written into a hidden sibling folder and renamed into place, so ``out`` holds the
previous export or the new one, never a mix. A non-empty ``out`` that is not a saecache export
is refused, never overwritten.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from saecache.core.atomic import check_folder
from saecache.core.errors import SaecacheError
from saecache.export.card import write_model_card
from saecache.export.layout import (CARD, CARD_MARKER, HOOK_FOLDER, SAELENS_CFG, SAELENS_WEIGHTS,
                                    ExportedFile)
from saecache.train.runfolder import Snapshot


def publish(out: Path, fmt: str, files: list[ExportedFile], repo_id: str | None,
            fill: Callable[[Path], None]) -> list[Path]:
    """Write the export (``fill`` a folder with ``files``, then the card) beside ``out``,
    then swap it in for ``out``. Returns every file written, README.md last."""
    out = out.absolute()  # "." has no parent to stage next to
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # honours the umask, unlike mkdtemp's 0700
    try:
        fill(staging)
        write_model_card(files, staging, fmt, repo_id or f"<user>/{out.name}")
        _swap(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise SaecacheError(f"could not write the export to {out}: {err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / f.name for f in files] + [out / CARD]


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that holds anything but a previous saecache export."""
    check_folder(out)
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries and not is_export(out):
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise SaecacheError(f"--out {out} is not empty and is not a saecache export (it holds "
                            f"{shown}): choose a new or empty folder")


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a saecache export and nothing else (so it may be replaced)."""
    card = folder / CARD
    if not card.is_file() or CARD_MARKER not in card.read_text(errors="replace"):
        return False
    return all(_is_export_entry(entry) for entry in folder.iterdir())


def _is_export_entry(entry: Path) -> bool:
    """README.md, a snapshot file, or a SAELens folder holding only its two files."""
    if entry.name == CARD or (entry.is_file() and Snapshot.parse(entry) is not None):
        return True
    if not (entry.is_dir() and HOOK_FOLDER.match(entry.name)):
        return False
    return all(p.name in (SAELENS_CFG, SAELENS_WEIGHTS) and p.is_file() for p in entry.iterdir())


def _swap(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; a previous export there is moved aside, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
