"""Transitional: for harvest/ until it uses :mod:`saecache.storage.location`.

saecache/harvest/loop.py still asks these two questions by the location's text; everything
in saecache/storage asks its :class:`~saecache.storage.location.Location` instead. Delete
this module once nothing imports it.
"""

from __future__ import annotations

from saecache.storage.location import location_of


def location_exists(location: str, storage_options: dict | None = None) -> bool:
    """Transitional: for harvest/ until it uses Location. ``location_of(...).exists()``."""
    return location_of(location, storage_options).exists()


def remove_partial_writes(location: str) -> int:
    """Transitional: for harvest/ until it uses Location. ``location_of(...).clean_partials()``."""
    return location_of(location).clean_partials()
