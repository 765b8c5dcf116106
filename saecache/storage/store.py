"""Where a cache lives: a local folder or an fsspec URL, opened as a zarr v3 store.

Every other module goes through these few functions, so that a local path and an
object-store URL behave the same (zarr's ``LocalStore`` and ``FsspecStore`` share one
interface). zarr's store API is async; ``run`` drives it from synchronous code on zarr's
own event loop, the same way zarr's synchronous ``Array`` does.

For a URL (``s3://bucket/path``) the endpoint and credentials come from the usual
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ...) or from ``storage_options``, which the
command line gives as ``--storage-option key=value`` strings: :func:`parse_storage_options`
turns those into the types fsspec expects. Failures to reach or use the object store when a
cache is opened become one-line :class:`SaecacheError` messages (:func:`object_store_errors`).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from saecache.core.errors import SaecacheError, first_line

T = TypeVar("T")

# Option names whose values are always kept as strings (a secret may look like a number).
VERBATIM_OPTIONS = {"key", "secret", "token", "password", "username", "profile", "ak",
                    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                    "account_name", "account_key", "sas_token"}
# Defaults for every URL store: no directory-listing cache (another process may be writing
# the same cache, and a stale listing would hide its chunks), and a file system of our own
# (fsspec's instance cache would keep the credentials of the first open for the process).
URL_DEFAULTS = {"use_listings_cache": False, "skip_instance_cache": True}
CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectionError", "ConnectTimeoutError",
                     "ReadTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                     "ProxyConnectionError", "TimeoutError"}

_stores: dict[tuple, FsspecStore] = {}  # one file system per (URL, options, environment)
_stores_lock = threading.Lock()


def is_url(location: str) -> bool:
    """True for ``s3://bucket/path`` and other fsspec URLs, False for a local path."""
    return "://" in location and not location.startswith("file://")


def open_store(location: str, *, read_only: bool, storage_options: dict | None = None) -> Store:
    """The zarr store at ``location`` (a local folder is created when writing)."""
    if is_url(location):
        return _url_store(location, storage_options or {}).with_read_only(read_only)
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
    if isinstance(store, FsspecStore):
        # One paginated listing carries every object's size; zarr's getsize_prefix would
        # ask for each object's size separately (a HEAD request per chunk on S3).
        path = f"{store.path}/{prefix}".rstrip("/")
        found = run(store.fs._find(path, detail=True, withdirs=False))  # {name: info}
        sizes = [info.get("size") for info in found.values()]
        if all(size is not None for size in sizes):
            return sum(int(size) for size in sizes)
    return run(store.getsize_prefix(prefix))


def remove_partial_writes(location: str) -> int:
    """Delete what a killed writer left behind: zarr's local store writes ``KEY.<uuid>.partial``
    and renames it to ``KEY``; a kill in between leaves the temporary file. Object stores have
    no such files. Call only while no other process writes. Returns the number removed."""
    if is_url(location):
        return 0
    leftovers = list(Path(location.removeprefix("file://")).rglob("*.partial"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def location_exists(location: str, storage_options: dict | None = None) -> bool:
    """Whether anything is at ``location`` already (a folder with entries, or objects).

    For a URL this is the first request a command makes, so here an unreachable endpoint,
    refused credentials or a missing bucket become one-line errors.
    """
    if not is_url(location):
        path = location.removeprefix("file://")
        return os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))
    options = storage_options or {}
    store = open_store(location, read_only=True, storage_options=options)
    with object_store_errors(location, options):
        if exists(store, "zarr.json"):  # a cache or another zarr group: one HEAD request
            return True
        try:
            return not run(store.is_empty(""))  # lists the prefix; fails on a missing bucket
        except FileNotFoundError as err:
            raise SaecacheError(
                f"{_container(location)} of {location} does not exist{_at(location, options)} "
                f"({first_line(err)}): create it first, or check the URL and the endpoint"
            ) from None


# ---- URL stores --------------------------------------------------------------------------


def _url_store(location: str, storage_options: dict) -> FsspecStore:
    """The read-only FsspecStore of a URL, made once per (URL, options, environment)."""
    options = parse_storage_options(location, storage_options)
    key = (location, json.dumps(options, sort_keys=True, default=repr), _environment())
    with _stores_lock:
        if key not in _stores:
            with object_store_errors(location, options):
                _stores[key] = FsspecStore.from_url(
                    location, storage_options={**URL_DEFAULTS, **options}, read_only=True)
        return _stores[key]


def _environment() -> tuple:
    """The environment variables object-store clients read credentials and endpoints from."""
    prefixes = ("AWS_", "GOOGLE_", "GCS", "AZURE_", "FSSPEC_")
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes)))


def parse_storage_options(location: str, options: dict) -> dict:
    """fsspec options from ``--storage-option key=value`` strings (other values pass as they are).

    - ``a.b.c=v`` nests: ``client_kwargs.region_name=eu-west-1`` gives
      ``{"client_kwargs": {"region_name": "eu-west-1"}}``.
    - A value is converted to the type of the file system's default for that option
      (``anon=false`` → False, ``max_concurrency=32`` → 32); other values: ``true``/``false``
      → bool, ``none``/``null`` → None, integers and decimals → numbers, ``{…}``/``[…]`` → JSON.
      Credentials (``key``, ``secret``, ``token``, …) always stay strings.
    """
    defaults = _option_defaults(location)
    out: dict = {}
    for name, value in options.items():
        *parents, leaf = str(name).split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise _given_twice(name, parent)
        default = defaults.get(leaf, inspect.Parameter.empty) if not parents else None
        new = _convert(name, leaf, value, default) if isinstance(value, str) else copy.deepcopy(value)
        if isinstance(node.get(leaf), dict):  # a group already given, e.g. by a dotted name
            if not isinstance(new, dict):
                raise _given_twice(name, leaf)
            new = {**node[leaf], **new}
        node[leaf] = new
    return out


def _given_twice(name: str, part: str) -> SaecacheError:
    return SaecacheError(f"--storage-option {name}: {part} is given as a value and as a group of "
                         "options; give it one way")


def _option_defaults(location: str) -> dict:
    """Option name → default value, from the signature of the URL's file system class."""
    try:
        import fsspec

        cls = fsspec.get_filesystem_class(location.split("://", 1)[0])
        params = inspect.signature(cls.__init__).parameters.values()
    except Exception:  # unknown or uninstalled backend: reported when the store is opened
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _convert(name: str, leaf: str, value: str, default: Any) -> Any:
    """One option value from its string form (see :func:`parse_storage_options`)."""
    text = value.strip()
    if isinstance(default, bool):
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
        raise SaecacheError(f"--storage-option {name}={value!r} is not true or false")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise SaecacheError(f"--storage-option {name}={value!r} is not "
                                f"{'an integer' if isinstance(default, int) else 'a number'}") from None
    if isinstance(default, str) or leaf.lower() in VERBATIM_OPTIONS:
        return value
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", text):
        return float(text)
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SaecacheError(f"--storage-option {name}: {value!r} is not valid JSON ({err})") from None
    return value


# ---- errors ------------------------------------------------------------------------------


@contextmanager
def object_store_errors(location: str, storage_options: dict | None = None) -> Iterator[None]:
    """Turn what an object store raises while a cache is opened into one SaecacheError line
    saying what to check; local paths and saecache's own errors pass through unchanged."""
    try:
        yield
    except SaecacheError:
        raise
    except Exception as err:
        if not is_url(location):
            raise
        raise SaecacheError(_explain(location, storage_options or {}, err)) from None


def _explain(location: str, options: dict, err: Exception) -> str:
    names = {cls.__name__ for cls in type(err).__mro__}
    what = f"{type(err).__name__}: {first_line(err)}"
    if isinstance(err, ImportError):
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                   "abfs": "adlfs"}.get(_protocol(location), "the fsspec backend for it")
        return f"{location} needs {package}, which is not installed ({what}): pip install {package}"
    if isinstance(err, ValueError) and "protocol" in str(err).lower():
        return f"{location}: {first_line(err)}; CACHE must be a local path or an fsspec URL such as s3://bucket/path"
    if isinstance(err, PermissionError):
        return (f"access to {location} was refused{_at(location, options)} ({what}): check the "
                f"credentials ({_credential_hint(location)}) and that they may read and write "
                f"{_container(location)}")
    if "NoCredentialsError" in names:
        return (f"no credentials found for {location} ({what}): set {_credential_hint(location)}, "
                "or --storage-option anon=true for a public bucket")
    if names & CONNECTION_ERRORS:
        return (f"cannot reach the object store for {location}{_at(location, options)} ({what}): "
                f"check {_endpoint_hint(location)} and that the server is up")
    return (f"cannot open {location}{_at(location, options)} ({what}): check the URL, "
            f"--storage-option values, {_endpoint_hint(location)} and the credentials")


def _protocol(location: str) -> str:
    return location.split("://", 1)[0].split("::")[-1].lower()


def _is_s3(location: str) -> bool:
    return _protocol(location) in ("s3", "s3a")


def _container(location: str) -> str:
    """``bucket 'name'`` for an object store URL."""
    return f"bucket {urlparse(location).netloc!r}"


def _endpoint(options: dict) -> str | None:
    """The S3 endpoint the client will use, as far as the options and environment say."""
    return (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _at(location: str, options: dict) -> str:
    if not _is_s3(location):
        return ""
    return f" at endpoint {_endpoint(options) or 'AWS (the default; no endpoint_url given)'}"


def _credential_hint(location: str) -> str:
    if _is_s3(location):
        return ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --storage-option key=… "
                "--storage-option secret=…")
    return "the credentials the fsspec backend reads, or --storage-option"


def _endpoint_hint(location: str) -> str:
    if _is_s3(location):
        return "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 or --storage-option endpoint_url=…"
    return "the endpoint"

