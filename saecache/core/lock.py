"""One writer at a time: an OS file lock (flock) on ``saecache.lock``, naming its holder.

A writer takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file and writes who it is into
it (host, pid, start time, command, as JSON); readers take ``LOCK_SH``, so any number of them
read together while no writer runs. The kernel drops a flock when its process dies, however
it dies, so a lock left by a ``kill -9`` is free at once: the next writer takes it and says in
a log line whose stale lock it took over (the file still names the dead holder, because only a
clean exit deletes it). The last holder deletes the file while it still holds it exclusively,
and whoever locks a file checks that it is still the one at the path (else opens the new one),
so a deleted file never lets two processes hold "the" lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator

from saecache.core.errors import SaecacheError

log = logging.getLogger(__name__)

LOCK_NAME = "saecache.lock"
"""The lock file's name, in a cache folder and in a run folder."""


def this_command() -> str:
    """The command line of this process, as the user typed it (``saecache harvest …``)."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("saecache", "__main__.py"):
        return shlex.join(["saecache", *argv[1:]])
    return shlex.join(argv)


@dataclass(frozen=True)
class Holder:
    """Who holds a writer's lock: what the lock file says."""

    host: str
    pid: int
    started: float
    """Unix time the lock was taken."""
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), this_command())

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a lock file names; None for an empty or unreadable one."""
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), float(data["started"]), str(data["command"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} since {since} ({self.command})"


class LockHeld(SaecacheError):
    """Someone else holds the lock; the message names them and says what to do."""


def refusal(what: str, holder: Holder | None, writing: bool) -> LockHeld:
    """The one line a refused process prints. ``writing``: the holder is a writer (else readers)."""
    if not writing:
        return LockHeld(f"{what} is in use by a reader (saecache train, eval or verify): wait for "
                        "it to finish or stop it")
    who = str(holder) if holder else "another process (it is just starting)"
    return LockHeld(f"{what} is being written by {who}: wait for it to finish or stop it")


class FileLock:
    """The lock file at ``path``; ``what`` names the thing it guards in messages
    (``cache at X``, ``run X``). The file exists while someone holds the lock (or after its
    holder was killed): the last one out deletes it."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the writer's lock for the ``with`` block; refuses in one line if anyone holds it.
        Folders made to hold the lock file are removed again if nothing else was put in them (a
        refused or failed run leaves no empty run folder or cache folder behind)."""
        made = missing_folders(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = self._acquire(fcntl.LOCK_EX, "a+")
            try:
                f.seek(0)
                if stale := Holder.parse(f.read()):
                    log.warning("%s: took over the stale lock of %s, which no longer runs", self.what, stale)
                _rewrite(f, json.dumps(Holder.me().to_json()) + "\n")
                yield
            finally:
                _release(f, self.path)
        finally:
            for folder in made:  # deepest first; one another process uses is not empty
                with contextlib.suppress(OSError):
                    folder.rmdir()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold a reader's lock for the ``with`` block; refused in one line while a writer holds
        the lock. Where the lock file cannot be opened (a read-only cache) it goes on without."""
        try:
            f = self._acquire(fcntl.LOCK_SH, "a+")
        except OSError:
            f = None
        if f is None and self.path.exists():  # read-only: lock the file that is there
            with contextlib.suppress(OSError):
                f = self._acquire(fcntl.LOCK_SH, "r")
        try:
            yield
        finally:
            if f is not None:
                _release(f, self.path)

    def _acquire(self, mode: int, how: str) -> IO[str]:
        """The lock file opened and flocked; the refusal when someone holds a conflicting lock.
        A file deleted by its last holder between our open and our flock is opened again."""
        while True:
            f = open(self.path, how)
            try:
                if not _try(f, mode):
                    raise self._why_busy(f) if mode == fcntl.LOCK_EX else \
                        refusal(self.what, _holder(f), writing=True)
                if _is_current(f, self.path):
                    return f
            except BaseException:
                f.close()
                raise
            f.close()

    def _why_busy(self, f: IO[str]) -> LockHeld:
        """A writer holds the lock exclusively, or readers share it: the refusal for each."""
        readers = _try(f, fcntl.LOCK_SH)  # succeeds only when no writer holds it
        if readers:
            fcntl.flock(f, fcntl.LOCK_UN)
        return refusal(self.what, None if readers else _holder(f), writing=not readers)


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _is_current(f: IO[str], path: Path) -> bool:
    """Whether ``f`` is still the file at ``path`` (not one its last holder deleted)."""
    try:
        now, mine = os.stat(path), os.fstat(f.fileno())
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _release(f: IO[str], path: Path) -> None:
    """Unlock; the last holder (the one that can take it exclusively) deletes the file first."""
    try:
        if _try(f, fcntl.LOCK_EX):  # a writer has it already; a reader only if it is the last
            with contextlib.suppress(OSError):  # a read-only folder keeps its file
                path.unlink()
    finally:
        f.close()  # closing drops the flock


def _try(f: IO[str], mode: int) -> bool:
    """Take a flock without waiting: False when another process holds a conflicting one."""
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise SaecacheError(f"cannot lock {f.name}: {err.strerror}") from None


def _holder(f: IO[str]) -> Holder | None:
    f.seek(0)
    return Holder.parse(f.read())


def _rewrite(f: IO[str], text: str) -> None:
    """Replace the lock file's contents in place (never a new file: the lock is on this inode)."""
    try:
        f.seek(0)
        f.truncate()
        f.write(text)
        f.flush()
    except OSError as err:
        raise SaecacheError(f"cannot write the lock file {f.name}: {err.strerror}") from None


