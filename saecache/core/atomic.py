"""Files that a crash can never leave half-written, and JSON read back with one-line errors.

A write goes to a temporary file beside its target (``.NAME.XXXX``) and is renamed into place,
as zarr's local store does, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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


_TEMPORARY = re.compile(r"^\.(.+)\.[a-z0-9_]{8}$")  # mkstemp adds 8 of [a-z0-9_] to the prefix


def temporary_target(name: str) -> str | None:
    """The file name whose :func:`atomic_write` temporary is called ``name`` (None: not one)."""
    match = _TEMPORARY.match(name)
    return match.group(1) if match else None


class _Recorder:
    """A file object that remembers the first error raised in its writes: torch.save's zip
    writer turns whatever a write raises into a RuntimeError ("unexpected pos"), and the
    reason must not be lost: a full disk (OSError) or Ctrl-C / SIGTERM arriving while a
    checkpoint is written (KeyboardInterrupt, raised by the signal handler inside write)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except (OSError, KeyboardInterrupt) as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except (OSError, KeyboardInterrupt) as err:
            self.error = self.error or err
            raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write(file_object)`` to a temporary file, then rename it into place.

    Any failure removes the temporary; an OSError of the file system (a full disk, a read-only
    one) is raised as an OSError naming ``path``, whatever ``write`` made of it."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            try:
                write(recorder)
            except Exception as err:  # the writer's own error, or one it made of ours
                if recorder.error is None:
                    raise
                raise recorder.error from err
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_folder(path: Path | str, option: str = "--out") -> Path:
    """``path`` as a folder to write into (made later if missing): one line, before anything
    is written, when it or a folder above it is a file."""
    path = Path(path)
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            what = "is a file" if above == path else f"cannot be a folder: {above} is a file"
            raise SaecacheError(f"{option} {path} {what}: give a folder (made if missing)")
    return path


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
NOT_A_FOLDER = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EEXIST})


def write_failure(err: OSError, path: Path | str | None = None, safe: str = "",
                  todo: str = "re-run the same command") -> SaecacheError | None:
    """One line for an OSError of the file system while writing ``path`` (its own filename by
    default), saying what is still ``safe`` and what to do; None for other errors."""
    where = path or err.filename or "a file"
    reason, safe = err.strerror or str(err), f": {safe}" if safe else ""
    if err.errno in NO_SPACE:
        return SaecacheError(f"no space left writing {where} ({reason}){safe}; free space and "
                             f"{todo}")
    if err.errno in NOT_WRITABLE:
        return SaecacheError(f"cannot write {where} ({reason}){safe}; make it writable or write "
                             f"elsewhere, then {todo}")
    if err.errno in NOT_A_FOLDER:
        return SaecacheError(f"cannot write {where} ({reason}): a file is where a folder should "
                             "be, or the reverse; move it or write elsewhere")
    return None


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
