"""Where a cache lives: a local folder or an fsspec URL, behind one small interface.

:func:`location_of` makes the :class:`Location` for the CACHE text of the command line (and
its ``--storage-option`` values): a :class:`LocalFolder` for a path or ``file://`` URL, a
:class:`UrlLocation` for ``s3://bucket/path`` and every other fsspec URL. Both answer the
same questions (is anything there, what is under a prefix and how big, remove it all, clean
up after a killed writer, lock it for one writer: :meth:`Location.lock`) and open the same kind of zarr v3 store (zarr's ``LocalStore`` and
``FsspecStore`` share one interface), so no other module asks which kind it has.

zarr's store API is async; :func:`run` drives it from synchronous code on zarr's own event
loop, the same way zarr's synchronous ``Array`` does.
"""

from __future__ import annotations

import asyncio
import shutil
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from saecache.core.errors import SaecacheError
from saecache.core.lock import LOCK_NAME, FileLock
from saecache.storage import objectstore

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one of a store's async methods to completion from synchronous code."""
    return sync(coro)


def settle(timeout: float = 5.0) -> None:
    """Let zarr's reads still in flight finish (at most ``timeout`` seconds) and collect their
    errors. A read refused part-way — one of zarr's concurrent chunk reads raised on a missing
    or corrupt chunk — returns while the others still run on zarr's event loop; a process that
    ends under them makes asyncio print tracebacks after its one-line error."""
    from zarr.core import sync as zarr_sync

    if zarr_sync.loop[0] is None:  # zarr never ran anything
        return

    async def others() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: asyncio logs no "exception was never retrieved"

    run(others())


def is_url(location: str) -> bool:
    """True for ``s3://bucket/path`` and other fsspec URLs, False for a local path."""
    return "://" in location and not location.startswith("file://")


def location_of(text: str, storage_options: dict | None = None) -> Location:
    """The location CACHE names: a local folder, or an fsspec URL reached with
    ``storage_options`` (``--storage-option`` strings, parsed here: a bad one is refused now)."""
    if is_url(text):
        return UrlLocation(text, storage_options or {})
    return LocalFolder(text)


def local_file(store: Store, key: str) -> Path | None:
    """The file holding ``key`` when ``store`` keeps its keys as files in a local folder, else
    None (an object store): where plain reads can stand in for the store's."""
    return Path(store.root) / key if isinstance(store, LocalStore) else None


class Location(ABC):
    """A place a cache can be: one folder or one URL prefix. ``str()`` is the text it was
    made from, as messages and ``saecache info`` show it."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"

    @abstractmethod
    def exists(self) -> bool:
        """Whether anything is there already (a folder with entries, a file, or objects)."""

    @abstractmethod
    def store(self, read_only: bool) -> Store:
        """The zarr v3 store at this location (created, when writing, where that means anything)."""

    @abstractmethod
    def remove(self) -> None:
        """Delete everything at this location but a lock that names its holder (the
        ``--overwrite`` that is removing holds it); an empty, released lock file goes too."""

    @abstractmethod
    def lock(self, exclusive: bool = True) -> AbstractContextManager[None]:
        """Hold the cache's lock for a ``with`` block: a writer's (``exclusive``), refused in one
        line naming the holder while anyone else writes or reads, or a reader's, refused while
        someone writes. Take a writer's before anything is created, cleaned or removed."""

    def check_removable(self) -> None:
        """Refuse, before anything is touched, what ``--overwrite`` must not delete."""

    def free_bytes(self) -> int | None:
        """Bytes free where the cache goes (None: not known, as for an object store)."""
        return None

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``: one listing, not one request per key."""
        store = self.store(read_only=True)

        async def collect() -> list[str]:
            return [key async for key in store.list_prefix(prefix)]

        return run(collect())

    def size(self, prefix: str = "") -> int:
        """Bytes stored under ``prefix`` (everything for ``""``)."""
        return run(self.store(read_only=True).getsize_prefix(prefix))

    def clean_partials(self) -> int:
        """Delete what a killed writer left half-written; returns how many. Call only while no
        other process writes. Nothing to do unless a subclass says otherwise."""
        return 0


class LocalFolder(Location):
    """A folder on this machine (``path`` or ``file://path``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.path = Path(text.removeprefix("file://"))

    def exists(self) -> bool:
        """A folder holding nothing but the lock file counts as empty."""
        if not self.path.is_dir():
            return self.path.exists()
        return any(entry.name != LOCK_NAME for entry in self.path.iterdir())

    def store(self, read_only: bool) -> LocalStore:
        if not read_only:
            self.path.mkdir(parents=True, exist_ok=True)
        return LocalStore(self.path, read_only=read_only)

    def remove(self) -> None:
        self.check_removable()
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != LOCK_NAME or not entry.stat().st_size:
                entry.unlink()

    def check_removable(self) -> None:
        if self.path.is_symlink():
            raise SaecacheError(f"CACHE {self.text} is a symbolic link (to {self.path.resolve()}): "
                                "--overwrite deletes only real folders; give the folder it points "
                                "to, or another CACHE")

    def free_bytes(self) -> int:
        """Free space on the filesystem of the nearest folder that exists (CACHE may not yet)."""
        path = self.path.absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    @contextmanager
    def lock(self, exclusive: bool = True) -> Iterator[None]:
        if self.path.exists() and not self.path.is_dir():  # not even a folder to lock in
            raise SaecacheError(f"{self.text} is not a saecache cache (it is a file, not a folder): "
                                "choose a new or empty path")
        lock = FileLock(self.path / LOCK_NAME, f"cache at {self.text}")
        with lock.exclusive() if exclusive else lock.shared():
            yield

    def clean_partials(self) -> int:
        """zarr's local store writes ``KEY.<uuid>.partial`` and renames it to ``KEY``; a kill
        in between leaves the temporary file, which these remove."""
        leftovers = list(self.path.rglob("*.partial"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)


class UrlLocation(Location):
    """A prefix on an object store (``s3://bucket/path``, any fsspec URL). An object appears
    whole or not at all, so a killed writer leaves nothing to clean up."""

    def __init__(self, text: str, storage_options: dict):
        super().__init__(text)
        self.options = objectstore.parse_storage_options(text, storage_options)
        """The fsspec options, typed."""

    def exists(self) -> bool:
        """For a URL this is the first request a command makes, so here an unreachable
        endpoint, refused credentials or a missing bucket become one-line errors."""
        store = self.store(read_only=True)
        with objectstore.errors(self.text, self.options):
            if run(store.exists("zarr.json")):  # a cache or another zarr group: one HEAD request
                return True
            try:
                keys = run(_first_keys(store, 2))  # lists the prefix; fails on a missing bucket
            except FileNotFoundError as err:
                raise objectstore.missing_bucket(self.text, self.options, err) from None
            return any(key != LOCK_NAME for key in keys)  # a lease alone is not a cache

    def store(self, read_only: bool) -> FsspecStore:
        return objectstore.fsspec_store(self.text, self.options).with_read_only(read_only)

    def remove(self) -> None:
        store = self.store(read_only=False)

        async def delete_all_but_the_lease() -> None:
            async for key in store.list_prefix(""):
                if key != LOCK_NAME or not await store.getsize(key):
                    await store.delete(key)

        run(delete_all_but_the_lease())

    def lock(self, exclusive: bool = True) -> AbstractContextManager[None]:
        from saecache.storage.lock import Lease  # it drives the store the same way

        self.exists()  # the first request: a missing bucket or bad credentials are one line
        lease = Lease(self.store(read_only=False), f"cache at {self.text}")
        return lease.exclusive() if exclusive else lease.shared()

    def size(self, prefix: str = "") -> int:
        store = self.store(read_only=True)
        # One paginated listing carries every object's size; zarr's getsize_prefix would
        # ask for each object's size separately (a HEAD request per chunk on S3).
        path = f"{store.path}/{prefix}".rstrip("/")
        found = run(store.fs._find(path, detail=True, withdirs=False))  # {name: info}
        sizes = [info.get("size") for info in found.values()]
        if all(size is not None for size in sizes):
            return sum(int(size) for size in sizes)
        return super().size(prefix)


async def _first_keys(store: Store, n: int) -> list[str]:
    """Up to ``n`` keys under the store's root: enough to tell a lone lease from a cache."""
    keys = []
    async for key in store.list_prefix(""):
        keys.append(key)
        if len(keys) >= n:
            break
    return keys
