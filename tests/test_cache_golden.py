"""A cache written by saecache 0.1.0 still opens, describes itself and verifies the same.

tests/data/saecache-0.1.0/cache.zarr was harvested by 0.1.0 (make_fixture.py); golden/ holds
what 0.1.0's ``saecache info --json``, ``saecache info`` and ``saecache verify`` printed for
it, run from tests/data/saecache-0.1.0 (so its location reads ``cache.zarr``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from saecache.storage.cache import UNCHECKSUMMED, Cache
from tests.test_cli import run

FIXTURE = Path(__file__).parent / "data" / "saecache-0.1.0"
GOLDEN = FIXTURE / "golden"


@pytest.fixture
def old_cache(tmp_path) -> Path:
    """A copy of the 0.1.0 cache (commands must never change the fixture itself)."""
    return Path(shutil.copytree(FIXTURE / "cache.zarr", tmp_path / "cache.zarr"))


def test_it_opens_as_a_complete_cache(old_cache):
    cache = Cache.open(str(old_cache))
    assert cache.meta["format_version"] == UNCHECKSUMMED and cache.meta["saecache_version"] == "0.1.0"
    assert cache.complete and cache.committed().all() and cache.layout.n_blocks == 16
    assert cache.location == str(old_cache)


def test_info_json_is_what_0_1_0_printed_but_the_location(old_cache):
    result = run("info", old_cache, "--json")
    assert result.exit_code == 0, result.output
    info, golden = json.loads(result.output), json.loads((GOLDEN / "info.json").read_text())
    assert info.pop("location") == str(old_cache)
    assert golden.pop("location") == "cache.zarr"
    assert info == golden  # provenance, layout, progress, bytes on disk, statistics


def test_info_text_is_what_0_1_0_printed_but_the_location(old_cache):
    """…and token counts that no decimal suffix spells exactly, now in full (1,024: issue 12)."""
    result = run("info", old_cache)
    assert result.exit_code == 0, result.output
    golden = (GOLDEN / "info.txt").read_text()
    golden = golden.replace("1024 in", "1,024 in").replace("(budget 1024)", "(budget 1,024)")
    golden = golden.replace("blocks, 1024 tokens", "blocks, 1,024 tokens")
    assert result.output == golden.replace("cache        cache.zarr", f"cache        {old_cache}", 1)


def test_verify_says_ok_as_0_1_0_did(old_cache):
    result = run("verify", old_cache)
    assert result.exit_code == 0, result.output
    assert result.output == (GOLDEN / "verify.txt").read_text()
    assert result.output.splitlines()[-1] == "ok"
