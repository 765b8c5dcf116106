"""Where a cache lives: a local folder or an fsspec URL, opened as a zarr v3 store.

Every other module goes through these few functions, so that a local path and an
object-store URL behave the same (zarr's ``LocalStore`` and ``FsspecStore`` share one
interface). zarr's store API is async; ``run`` drives it from synchronous code on zarr's
own event loop, the same way zarr's synchronous ``Array`` does.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

T = TypeVar("T")


def is_url(location: str) -> bool:
    """True for ``s3://bucket/path`` and other fsspec URLs, False for a local path."""
    return "://" in location and not location.startswith("file://")


def open_store(location: str, *, read_only: bool, storage_options: dict | None = None) -> Store:
    """The zarr store at ``location`` (a local folder is created when writing)."""
    if is_url(location):
        return FsspecStore.from_url(
            location, storage_options=storage_options or {}, read_only=read_only
        )
    path = location.removeprefix("file://")
    if not read_only:
        os.makedirs(path, exist_ok=True)
    return LocalStore(path, read_only=read_only)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one of a store's async methods to completion from synchronous code."""
    return sync(coro)


def exists(store: Store, key: str) -> bool:
    """Whether ``key`` (a chunk or metadata object) is present in the store."""
    return run(store.exists(key))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under ``prefix``: one listing, not one request per key."""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return run(collect())


def size_of(store: Store, prefix: str = "") -> int:
    """Bytes stored under ``prefix`` (the whole store for ``""``)."""
    return run(store.getsize_prefix(prefix))


def location_exists(location: str, storage_options: dict | None = None) -> bool:
    """Whether anything is at ``location`` already (a folder with entries, or objects)."""
    if not is_url(location):
        path = location.removeprefix("file://")
        return os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))
    store = open_store(location, read_only=True, storage_options=storage_options)
    return not run(store.is_empty(""))
