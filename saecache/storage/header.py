"""The cache's ``saecache`` group attribute: format version, checksum, and checking it on read.

The attribute holds what the cache is (provenance), how it is shaped (layout), how far its
harvest got (``tokens_done``, ``complete``) and the per-layer statistics training normalises
with. Format 2 adds ``checksum``: ``sha256:`` of the canonical JSON (sorted keys, no spaces)
of every other field, rewritten with each update, so that an edit by hand or a damaged file
is refused by every command instead of silently changing what training does. Format 1
(saecache 0.1.0) is the same cache without a checksum: it is still read, with every check but
that one.

Whatever the checksum says, a header is parsed defensively (types, plausible sizes: see
``CacheLayout.implausible``) before anything is computed from it: nothing in it is executed,
unpickled or allocated blindly.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np

from saecache import __version__
from saecache.core.errors import SaecacheError, first_line
from saecache.storage.layout import CacheLayout
from saecache.storage.provenance import Provenance
from saecache.storage.stats import LayerStats

ATTR = "saecache"
FORMAT_VERSION = 2
"""What this saecache writes: format 1 plus the header checksum."""
UNCHECKSUMMED = 1
"""saecache 0.1.0's format: the same arrays and header, without a checksum; still read."""
CHECKSUM = "checksum"
_FIELDS = (("provenance", dict), ("layout", dict), ("tokens_done", bool), ("complete", bool),
           ("stats", dict), ("saecache_version", str))
_REDO = "harvest it again with --overwrite"


class Header(NamedTuple):
    """A header that passed every check, parsed."""

    meta: dict
    """The attribute as stored."""
    provenance: Provenance
    layout: CacheLayout


def checksum(meta: dict) -> str:
    """``sha256:HEX`` of the canonical JSON of every field but the checksum itself."""
    body = {key: value for key, value in meta.items() if key != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def signed(meta: dict) -> dict:
    """``meta`` with its checksum, for every format that has one (format 1 stays as it was)."""
    if meta.get("format_version") == UNCHECKSUMMED:
        return meta
    return {**meta, CHECKSUM: checksum(meta)}


def new_header(provenance: Provenance, layout: CacheLayout) -> dict:
    """The attribute of a new cache: its format, what it is made from, its layout, no progress."""
    return signed({"format_version": FORMAT_VERSION, "saecache_version": __version__,
                   "provenance": provenance.to_json(), "layout": layout.to_json(),
                   "tokens_done": False, "complete": False, "stats": {}})


def raw_header(location: str, attrs: dict) -> dict:
    """The attribute, unchecked; refuses a group that is not a saecache cache at all."""
    meta = attrs.get(ATTR)
    if not isinstance(meta, dict):
        raise SaecacheError(f"{location} is a zarr group but not a saecache cache: "
                            "choose a new or empty path")
    return meta


def read_header(location: str, attrs: dict) -> Header:
    """The checked header of the group attributes ``attrs``; one line for anything wrong."""
    meta = raw_header(location, attrs)
    version = meta.get("format_version")
    if version not in (UNCHECKSUMMED, FORMAT_VERSION):
        raise SaecacheError(f"cache at {location} has format version {version!r}, this saecache "
                            f"reads versions {UNCHECKSUMMED} and {FORMAT_VERSION}: {_REDO}")
    stored = meta.get(CHECKSUM)
    if version != UNCHECKSUMMED and stored != (computed := checksum(meta)):
        shown = f"{stored[:19]}…" if isinstance(stored, str) else "none"
        raise SaecacheError(f"the metadata of cache {location} fails its checksum (edited or damaged): "
                            f"stored {shown}, computed {computed[:19]}…; {_REDO}")
    try:
        return _parse(meta)
    except (ValueError, TypeError, KeyError) as err:
        raise SaecacheError(f"the metadata of cache {location} is damaged ({first_line(err)}): "
                            f"{_REDO}") from None


def _parse(meta: dict) -> Header:
    """Types, plausible sizes and statistics that fit the layout; ValueError naming the field."""
    for key, kind in _FIELDS:
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{key} {meta.get(key)!r} is not a {kind.__name__}")
    layout = CacheLayout.from_json(meta["layout"])
    if meta["complete"] and not meta["tokens_done"]:
        raise ValueError("complete is true but tokens_done is false")
    stats = meta["stats"]
    wanted = {f"{layer:02d}" for layer in layout.layers}
    if set(stats) - wanted or (meta["complete"] and set(stats) != wanted):
        raise ValueError(f"statistics for layers {sorted(stats)}, the layout has {sorted(wanted)}")
    for key, value in stats.items():
        parsed = LayerStats.from_json(value)
        if parsed.mean.shape != (layout.d,) or min(parsed.rows, parsed.nonfinite) < 0 \
                or not np.isfinite([parsed.mean_norm, parsed.mean_sq_norm]).all():
            raise ValueError(f"statistics of layer {key} do not fit a d {layout.d} layout")
    return Header(meta, Provenance.from_json(meta["provenance"]), layout)
