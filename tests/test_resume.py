"""kill -9 at any moment, then the same command again: the cache ends byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saecache.harvest.loop import harvest
from saecache.storage.cache import Cache
from saecache.demo.tiny import DEMO_TEXT
from tests.conftest import tree_digest, harvest_config

# One sequence per block, so the harvest runs long enough to be killed in the middle.
ARGS = ["--dataset", str(DEMO_TEXT), "--tokens", "4096", "--ctx", "32", "--chunk-rows", "32",
        "--batch-size", "1", "--device", "cpu", "--writer-threads", "2", "--no-progress"]


def command(model: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "saecache", "harvest", str(cache), "--model", str(model), *ARGS]


def commits(cache: Path) -> int:
    folder = cache / "blocks" / "committed" / "c"
    return len(os.listdir(folder)) if folder.exists() else 0


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model) -> str:
    cache = tmp_path_factory.mktemp("whole") / "cache.zarr"
    subprocess.run(command(tiny_model, cache), check=True, capture_output=True)
    return tree_digest(cache)


@pytest.mark.parametrize("moment", ["tokenising", "first blocks", "mid-harvest"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_model, uninterrupted, moment):
    cache = tmp_path / "cache.zarr"
    ready = {
        "tokenising": lambda: (cache / "tokens" / "zarr.json").exists(),
        "first blocks": lambda: commits(cache) >= 2,
        "mid-harvest": lambda: commits(cache) >= 60,
    }[moment]
    proc = subprocess.Popen(command(tiny_model, cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert kill_when(proc, ready), "the harvest finished before it could be killed"
    assert not Cache.open(str(cache)).complete
    rerun = subprocess.run(command(tiny_model, cache), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_digest(cache) == uninterrupted


def test_rerunning_a_complete_cache_changes_nothing(tmp_path, tiny_model):
    cfg = harvest_config(tmp_path / "c.zarr", tiny_model)
    harvest(cfg)
    before = tree_digest(tmp_path / "c.zarr")
    result = harvest(cfg)
    assert result.tokens_harvested == 0
    assert tree_digest(tmp_path / "c.zarr") == before


def test_a_partial_chunk_left_by_a_kill_is_cleaned_up_on_resume(tmp_path, tiny_model):
    cfg = harvest_config(tmp_path / "c.zarr", tiny_model)
    harvest(cfg)
    before = tree_digest(tmp_path / "c.zarr")
    leftover = tmp_path / "c.zarr" / "resid" / "01" / "c" / "3" / "0.4f2a9c.partial"
    leftover.write_bytes(b"half a chunk")  # what zarr's temporary file looks like after kill -9
    harvest(cfg)
    assert not leftover.exists() and tree_digest(tmp_path / "c.zarr") == before


def test_a_full_disk_is_one_line_and_the_rerun_finishes_identically(tmp_path, tiny_model, monkeypatch):
    import errno

    from click.testing import CliRunner
    from zarr.storage import LocalStore

    from saecache.cli import cli

    whole = tmp_path / "whole.zarr"
    harvest(harvest_config(whole, tiny_model))
    real_set, calls = LocalStore.set, {"n": 0}

    async def set_until_full(self, key, value, *args, **kwargs):
        calls["n"] += 1
        if "resid/" in key and calls["n"] > 40:  # the disk fills up in the middle of the harvest
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *args, **kwargs)

    cache = tmp_path / "cache.zarr"
    args = ["harvest", str(cache), "--model", str(tiny_model), "--dataset", str(DEMO_TEXT),
            "--tokens", "2048", "--ctx", "32", "--chunk-rows", "256", "--batch-size", "4",
            "--device", "cpu", "--writer-threads", "2", "--buffers", "2", "--no-progress"]
    monkeypatch.setattr(LocalStore, "set", set_until_full)
    # zarr's path, where LocalStore.set fails (the direct writer's: tests/test_chunk_writer.py)
    monkeypatch.setattr("saecache.harvest.writer.DIRECT", False)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "re-run" in lines[0], lines
    assert 0 < Cache.open(str(cache)).committed().sum() < 8
    monkeypatch.setattr(LocalStore, "set", real_set)  # space freed
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert tree_digest(cache) == tree_digest(whole)
