"""An object store through fsspec: ``--storage-option`` strings, the file system, its failures.

For a URL (``s3://bucket/path``) the endpoint and credentials come from the usual
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ...) or from storage options, which the
command line gives as ``--storage-option key=value`` strings: :func:`parse_storage_options`
turns those into the types fsspec expects. Failures to reach or use the object store when a
cache is opened become one-line :class:`SaecacheError` messages (:func:`errors`) saying what to
check. Only :class:`saecache.storage.location.UrlLocation` uses this module.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from zarr.storage import FsspecStore

from saecache.core.errors import SaecacheError, first_line

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
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
            "false": False, "no": False, "off": False, "0": False}
BACKEND_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                    "abfs": "adlfs"}

_stores: dict[tuple, FsspecStore] = {}  # one file system per (URL, options, environment)
_stores_lock = threading.Lock()


# ---- --storage-option strings --------------------------------------------------------------


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
    """One option value from its string form, as the type of the option's default."""
    text = value.strip()
    if isinstance(default, bool):
        if text.lower() not in BOOLEANS:
            raise SaecacheError(f"--storage-option {name}={value!r} is not true or false")
        return BOOLEANS[text.lower()]
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise SaecacheError(f"--storage-option {name}={value!r} is not "
                                f"{'an integer' if isinstance(default, int) else 'a number'}") from None
    if isinstance(default, str) or leaf.lower() in VERBATIM_OPTIONS:
        return value
    return _guess(name, value, text)


def _guess(name: str, value: str, text: str) -> Any:
    """An option value of no known type: a bool, None, a number or JSON if it reads as one."""
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


# ---- the file system -----------------------------------------------------------------------


def fsspec_store(location: str, options: dict) -> FsspecStore:
    """The read-only FsspecStore of a URL (``options`` parsed), made once per (URL, options,
    environment)."""
    key = (location, json.dumps(options, sort_keys=True, default=repr), _environment())
    with _stores_lock:
        if key not in _stores:
            with errors(location, options):
                _stores[key] = FsspecStore.from_url(
                    location, storage_options={**URL_DEFAULTS, **options}, read_only=True)
        return _stores[key]


def _environment() -> tuple:
    """The environment variables object-store clients read credentials and endpoints from."""
    prefixes = ("AWS_", "GOOGLE_", "GCS", "AZURE_", "FSSPEC_")
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes)))


# ---- errors ------------------------------------------------------------------------------


@contextmanager
def errors(location: str, options: dict) -> Iterator[None]:
    """Turn what the object store at ``location`` raises into one SaecacheError line saying
    what to check; saecache's own errors pass through unchanged."""
    try:
        yield
    except SaecacheError:
        raise
    except Exception as err:
        raise SaecacheError(_explain(location, options, err)) from None


def missing_bucket(location: str, options: dict, err: Exception) -> SaecacheError:
    """The error for a URL whose bucket is not there (listing it raised FileNotFoundError)."""
    return SaecacheError(f"{_container(location)} of {location} does not exist{_at(location, options)} "
                         f"({first_line(err)}): create it first, or check the URL and the endpoint")


def _explain(location: str, options: dict, err: Exception) -> str:
    names = {cls.__name__ for cls in type(err).__mro__}
    what = f"{type(err).__name__}: {first_line(err)}"
    credentials, endpoint = _hints(location)
    if isinstance(err, ImportError):
        package = BACKEND_PACKAGES.get(_protocol(location), "the fsspec backend for it")
        extra = " (saecache's [s3] extra: pip install 'saecache[s3]')" if package == "s3fs" else ""
        return f"{location} needs {package}, which is not installed ({what}): pip install {package}{extra}"
    if isinstance(err, ValueError) and "protocol" in str(err).lower():
        return f"{location}: {first_line(err)}; CACHE must be a local path or an fsspec URL such as s3://bucket/path"
    if isinstance(err, PermissionError):
        return (f"access to {location} was refused{_at(location, options)} ({what}): check the "
                f"credentials ({credentials}) and that they may read and write {_container(location)}")
    if "NoCredentialsError" in names:
        return (f"no credentials found for {location} ({what}): set {credentials}, "
                "or --storage-option anon=true for a public bucket")
    if names & CONNECTION_ERRORS:
        return (f"cannot reach the object store for {location}{_at(location, options)} ({what}): "
                f"check {endpoint} and that the server is up")
    return (f"cannot open {location}{_at(location, options)} ({what}): check the URL, "
            f"--storage-option values, {endpoint} and the credentials")


def _protocol(location: str) -> str:
    return location.split("://", 1)[0].split("::")[-1].lower()


def _is_s3(location: str) -> bool:
    return _protocol(location) in ("s3", "s3a")


def _container(location: str) -> str:
    """``bucket 'name'`` for an object store URL."""
    return f"bucket {urlparse(location).netloc!r}"


def _at(location: str, options: dict) -> str:
    """`` at endpoint URL`` for S3, where the client will send its requests; else nothing."""
    if not _is_s3(location):
        return ""
    endpoint = (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    return f" at endpoint {endpoint or 'AWS (the default; no endpoint_url given)'}"


def _hints(location: str) -> tuple[str, str]:
    """(where the credentials come from, where the endpoint comes from) for the URL's backend."""
    if _is_s3(location):
        return ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --storage-option key=… "
                "--storage-option secret=…",
                "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 or --storage-option endpoint_url=…")
    return "the credentials the fsspec backend reads, or --storage-option", "the endpoint"
