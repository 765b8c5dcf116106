"""One writer at a time, with real processes: a second harvest or train is refused in one line
naming the holder and changes nothing; a lock left by kill -9 is taken over; readers and
writers exclude each other.

A running holder is paused with SIGSTOP once its lock file names it, so the second process
always meets a live holder (no sleeps, no race with the first one finishing).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from saecache.cli import cli
from saecache.core.lock import LOCK_NAME, Holder
from saecache.demo.tiny import DEMO_TEXT
from tests.conftest import tree_digest
from tests.s3 import s3_fixture, s3_server_fixture  # noqa: F401
from tests.test_cli import assert_one_line_error
from tests.test_resume import commits

# One sequence per block (64 blocks): long enough to be paused in the middle.
HARVEST = ["--dataset", str(DEMO_TEXT), "--tokens", "2048", "--ctx", "32", "--chunk-rows", "32",
           "--batch-size", "1", "--device", "cpu", "--writer-threads", "2", "--no-progress"]


def harvest_args(model: Path, cache: Path, *extra: str) -> list[str]:
    return ["harvest", str(cache), "--model", str(model), *HARVEST, *extra]


def saecache(*args: str) -> list[str]:
    return [sys.executable, "-m", "saecache", *args]


def holder_pid(lock: Path) -> int | None:
    """The pid the lock file names, if any."""
    try:
        holder = Holder.parse(lock.read_text())
    except OSError:
        return None
    return holder.pid if holder else None


def wait_until(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the holder exited ({proc.returncode}) before it was ready"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@contextmanager
def paused(proc: subprocess.Popen):
    """The process stopped (its locks still held) for the block, then continued. SIGSTOP is
    delivered asynchronously: wait until the kernel reports the process stopped, so that no
    write of it lands while the block looks at its files."""
    os.kill(proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and time.monotonic() < deadline:
        if stat.read_text().rpartition(")")[2].split()[0] == "T":  # state, after "pid (comm)"
            break
        time.sleep(0.001)
    else:
        time.sleep(0.5)  # no /proc: give the signal time to land
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def one_line(completed: subprocess.CompletedProcess) -> str:
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 1 and len(lines) == 1, completed.stderr
    assert lines[0].startswith("saecache: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model) -> str:
    """The digest of an uninterrupted harvest with the same arguments."""
    cache = tmp_path_factory.mktemp("clean") / "cache.zarr"
    assert CliRunner().invoke(cli, harvest_args(tiny_model, cache)).exit_code == 0
    return tree_digest(cache)


def test_a_second_harvest_and_readers_are_refused_and_the_first_ends_as_a_clean_run(
        tmp_path, tiny_model, clean):
    cache = tmp_path / "cache.zarr"
    first = subprocess.Popen(saecache(*harvest_args(tiny_model, cache)), stderr=subprocess.PIPE)
    wait_until(first, lambda: holder_pid(cache / LOCK_NAME) == first.pid and commits(cache) >= 2)
    with paused(first):
        before = tree_digest(cache)
        second = subprocess.run(saecache(*harvest_args(tiny_model, cache)), capture_output=True, text=True)
        line = one_line(second)
        assert f"cache at {cache} is being written by pid {first.pid} on host " in line
        assert "saecache harvest" in line and line.endswith("wait for it to finish or stop it")
        assert_one_line_error(CliRunner().invoke(cli, ["verify", str(cache)]), f"pid {first.pid}")
        train = CliRunner().invoke(cli, ["train", str(cache), "--layer", "1", "--out",
                                         str(tmp_path / "runs"), "--device", "cpu"])
        assert_one_line_error(train, f"cache at {cache} is being written by pid {first.pid}")
        assert tree_digest(cache) == before  # nothing created, cleaned or overwritten
    assert first.wait() == 0, first.stderr.read()
    assert tree_digest(cache) == clean


def test_a_harvest_started_while_the_first_tokenises_changes_nothing(tmp_path, tiny_model):
    text = tmp_path / "long.txt"  # tokens written one block at a time: a long tokenising phase
    # 1024 blocks of one sequence, each written on its own: seconds of tokenising, so that the
    # pause below lands inside it even on a loaded machine (the process is killed after it)
    text.write_text("\n\n".join([DEMO_TEXT.read_text().strip()] * 8))
    args = ["harvest", str(tmp_path / "cache.zarr"), "--model", str(tiny_model), "--dataset",
            str(text), "--tokens", "32768", "--ctx", "32", "--chunk-rows", "32", "--device", "cpu",
            "--no-progress"]
    cache = tmp_path / "cache.zarr"
    first = subprocess.Popen(saecache(*args), stderr=subprocess.DEVNULL)
    try:
        wait_until(first, lambda: holder_pid(cache / LOCK_NAME) == first.pid
                   and (cache / "tokens" / "c").exists())
        with paused(first):
            assert not (cache / "blocks").exists(), "tokenising ended before the pause"
            before = tree_digest(cache)
            for extra in ([], ["--overwrite"]):
                assert_one_line_error(CliRunner().invoke(cli, [*args, *extra]),
                                      f"is being written by pid {first.pid}")
            assert tree_digest(cache) == before and (cache / "tokens" / "zarr.json").exists()
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_kill_9_is_taken_over_and_the_rerun_is_clean(tmp_path, tiny_model, clean, caplog):
    cache = tmp_path / "cache.zarr"
    first = subprocess.Popen(saecache(*harvest_args(tiny_model, cache)), stderr=subprocess.DEVNULL)
    wait_until(first, lambda: holder_pid(cache / LOCK_NAME) == first.pid and commits(cache) >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert holder_pid(cache / LOCK_NAME) == first.pid  # the dead holder is still named
    with caplog.at_level(logging.WARNING, logger="saecache.core.lock"):
        assert CliRunner().invoke(cli, harvest_args(tiny_model, cache)).exit_code == 0
    assert f"took over the stale lock of pid {first.pid}" in caplog.text
    assert tree_digest(cache) == clean
    assert not (cache / LOCK_NAME).exists()  # released: the last holder deletes it


def train_args(cache: Path, out: Path) -> list[str]:
    return ["train", str(cache), "--layer", "1", "--out", str(out), "--expansion", "4", "--l1", "3e-4",
            "--tokens", "30000", "--snapshots", "10K", "--batch-size", "128", "--lr", "1e-3",
            "--device", "cpu", "--reader-threads", "2", "--log-every", "20", "--no-progress"]


def test_a_second_train_on_one_out_and_a_writer_are_refused_while_a_train_reads(
        tmp_path, train_cache, tiny_model):
    cache = Path(shutil.copytree(train_cache, tmp_path / "cache.zarr"))
    out = tmp_path / "runs"
    first = subprocess.Popen(saecache(*train_args(cache, out)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    run_lock = lambda: next(iter(out.glob(f"*/{LOCK_NAME}")), Path("/nonexistent"))
    wait_until(first, lambda: holder_pid(run_lock()) == first.pid)
    with paused(first):
        run = run_lock().parent
        before = tree_digest(cache)
        second = subprocess.run(saecache(*train_args(cache, out)), capture_output=True, text=True)
        line = one_line(second)
        assert f"run {run} is being written by pid {first.pid}" in line, line
        overwrite = CliRunner().invoke(cli, ["harvest", str(cache), "--model", str(tiny_model),
                                             "--dataset", str(DEMO_TEXT), "--ctx", "64", "--overwrite"])
        assert_one_line_error(overwrite, f"cache at {cache} is in use by a reader")
        assert tree_digest(cache) == before
    assert first.wait() == 0, first.stderr.read()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert metrics and len(metrics) == len(set(metrics))  # every line once
    assert json.loads(metrics[-1])["snapshot"] == "sae_layer01_final.pt"


# ---- object storage: a lease object ---------------------------------------------------------


def test_a_lease_on_object_storage_refuses_a_second_writer_and_stale_ones_are_taken_over(s3, caplog):
    from saecache.core.errors import SaecacheError
    from saecache.storage.location import location_of
    from zarr.core.sync import sync

    from saecache.storage.lock import Lease

    url = f"s3://{s3.make_bucket()}/cache.zarr"
    where = location_of(url)
    store = where.store(read_only=False)
    lease_key = f"{store.path}/{LOCK_NAME}"
    lease = lambda: json.loads(sync(store.fs._cat_file(lease_key)))  # the object, as JSON
    with where.lock():
        assert lease()["pid"] == os.getpid()
        assert not where.exists()  # a lease alone is not a cache
        for second in (where.lock(), where.lock(exclusive=False)):
            with pytest.raises(SaecacheError, match=f"cache at {url} is being written by pid {os.getpid()}"):
                with second:
                    pass
    assert not sync(store.fs._exists(lease_key))  # released
    dead = {**Holder(host="elsewhere", pid=999999, started=time.time() - 7200, command="saecache harvest").to_json(),
            "renewed": time.time() - 3600}
    sync(store.fs._pipe_file(lease_key, json.dumps(dead).encode()))
    with caplog.at_level(logging.WARNING, logger="saecache.storage.lock"), where.lock():
        assert lease()["pid"] == os.getpid()
    assert "took over the stale lease of pid 999999 on host elsewhere" in caplog.text
    beat = Lease(store, url, expire_s=60, renew_s=0.05)  # the heartbeat renews a held lease
    with beat.exclusive():
        first = lease()["renewed"]
        wait = time.monotonic() + 30
        while lease()["renewed"] == first:
            assert time.monotonic() < wait, "the lease was never renewed"
            time.sleep(0.02)


def test_overwrite_through_a_symbolic_link_is_refused_touching_nothing(tmp_path, tiny_model, cache_path):
    target = Path(shutil.copytree(cache_path, tmp_path / "real.zarr"))
    link = tmp_path / "link.zarr"
    link.symlink_to(target)
    before = tree_digest(target)
    result = CliRunner().invoke(cli, [*harvest_args(tiny_model, link), "--overwrite"])
    assert_one_line_error(result, f"CACHE {link} is a symbolic link (to {target})", "--overwrite")
    assert link.is_symlink() and tree_digest(target) == before and not (target / LOCK_NAME).exists()
