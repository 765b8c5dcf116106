"""torchrun: two gloo ranks harvest and train exactly what one process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saecache.demo.tiny import DEMO_TEXT
from tests.conftest import tree_digest
from tests.test_resume import commits

HARVEST = ["--dataset", str(DEMO_TEXT), "--tokens", "4096", "--ctx", "32", "--chunk-rows", "64",
           "--batch-size", "2", "--device", "cpu", "--writer-threads", "2", "--no-progress"]
TRAIN = ["--layer", "0", "--layer", "1", "--l1", "3e-4", "--l1", "adaptive:32", "--expansion", "4",
         "--tokens", "3840", "--snapshots", "1920", "--batch-size", "64", "--device", "cpu",
         "--reader-threads", "2", "--mix-chunks", "2", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same math threads in one process and in two


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "saecache", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "saecache", *args]


def check(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("one") / "cache.zarr"
    check(single("harvest", str(cache), "--model", str(tiny_model), *HARVEST))
    return cache


def test_two_ranks_harvest_the_same_cache_as_one_process(one_process, tiny_model, tmp_path):
    cache = tmp_path / "cache.zarr"
    check(torchrun("harvest", str(cache), "--model", str(tiny_model), *HARVEST))
    assert tree_digest(cache) == tree_digest(one_process)


def test_a_rank_killed_mid_harvest_then_a_rerun_gives_the_same_cache(one_process, tiny_model, tmp_path):
    cache = tmp_path / "cache.zarr"
    proc = subprocess.Popen(torchrun("harvest", str(cache), "--model", str(tiny_model), *HARVEST),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while commits(cache) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert proc.poll() is None and workers, "the harvest ended before a rank could be killed"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert commits(cache) < 64
    check(torchrun("harvest", str(cache), "--model", str(tiny_model), *HARVEST))
    assert tree_digest(cache) == tree_digest(one_process)


def test_two_ranks_train_four_runs_as_one_process_does(one_process, tmp_path):
    check(single("train", str(one_process), "--out", str(tmp_path / "one"), *TRAIN))
    check(torchrun("train", str(one_process), "--out", str(tmp_path / "two"), *TRAIN))
    runs = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(runs) == 4 and runs == sorted(p.name for p in (tmp_path / "two").iterdir())
    for run in runs:
        snapshots = sorted(p.name for p in (tmp_path / "one" / run).glob("sae_layer*.pt"))
        assert len(snapshots) == 2
        assert snapshots == sorted(p.name for p in (tmp_path / "two" / run).glob("sae_layer*.pt"))
        for snap in snapshots:
            a, b = (torch.load(tmp_path / side / run / snap, weights_only=True) for side in ("one", "two"))
            assert all(torch.equal(a[k], b[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
