"""Files that a crash can never leave half-written, and JSON read back with one-line errors.

A write goes to a temporary file beside its target (``.NAME.XXXX``) and is renamed into place,
as zarr's local store does, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from saecache.core.errors import SaecacheError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary files that :func:`atomic_write` leaves if killed."""
    return f".{path.name}."


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write(file_object)`` to a temporary file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) into ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON into ``path``, atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_jsonl(path: Path, lines: list[dict]) -> None:
    """One JSON object a line into ``path``, atomically (replacing what was there)."""
    write_text(path, "".join(json.dumps(line) + "\n" for line in lines))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing or malformed file is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaecacheError(f"cannot read {path}: {err}") from None


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSON-lines file; a half-written last line (a writer killed) is dropped."""
    lines = []
    for text in Path(path).read_text().splitlines():
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines
