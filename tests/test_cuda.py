"""The CUDA path, where CUDA is present (skipped cleanly otherwise): what benchmarks/gpu_check.py
checks, as tests a developer with a GPU gets from pytest.

- harvest with --buffers 1 and --buffers 3 (pinned host buffers, the side copy stream, the
  writer threads waiting on events) writes the same bytes, equal to a synchronous hook loop;
- the whole train() loop, every architecture, tf32 and bf16: no step after the first makes a
  hidden host sync (sync debug mode "warn"; the metrics lines, checkpoints and snapshots, which
  read values on the host by design, and the reader's threads are not counted; the first step
  is not counted either: Adam creates its state lazily there).

The recorder those tests use is itself checked on the CPU, so that a pass means something.
"""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

from saecache.harvest.loop import harvest  # noqa: E402
from saecache.sae.archs import ARCHS  # noqa: E402
from saecache.storage.cache import Cache  # noqa: E402
from saecache.train.config import ReaderConfig, TrainConfig  # noqa: E402
from saecache.train.loop import train  # noqa: E402
from saecache.train.trainer import SAETrainer  # noqa: E402
from tests.conftest import harvest_config, tree_digest  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_harvest_with_1_and_3_buffers_writes_the_bytes_of_a_synchronous_hook_loop(tiny_model, tmp_path):
    paths = {}
    for buffers in (1, 3):
        paths[buffers] = tmp_path / f"buffers{buffers}" / "cache.zarr"
        harvest(harvest_config(paths[buffers], tiny_model, device="cuda", buffers=buffers))
    assert tree_digest(paths[1]) == tree_digest(paths[3])
    cache = Cache.open(str(paths[3]))
    reference = gpu_check.hook_reference(cache, tiny_model, "cuda", batch_size=4)  # conftest's batch
    assert gpu_check.reference_mismatches(cache, reference) == {}


def record_syncs_in_steps(monkeypatch) -> list[str]:
    """Patch SAETrainer.step so that sync warnings raised on the calling thread inside a step
    after the first are collected (filename:line: message) into the returned list."""
    found, inside, main = [], threading.local(), threading.get_ident()
    original = SAETrainer.step

    def step(self, x, step_index):
        inside.on = step_index > 0
        try:
            original(self, x, step_index)
        finally:
            inside.on = False

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(inside, "on", False) and threading.get_ident() == main and "synchroniz" in str(message):
            found.append(f"{filename}:{lineno}: {message}")

    monkeypatch.setattr(SAETrainer, "step", step)
    monkeypatch.setattr(warnings, "showwarning", show)
    return found


@needs_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_train_loop_steps_make_no_hidden_syncs(train_cache, tmp_path, monkeypatch, arch, precision):
    k = () if ARCHS[arch].penalised else (16,)  # penalised archs take --l1, the others --k
    cfg = TrainConfig(cache=str(train_cache), out=str(tmp_path / "runs"), layers=(1,), arch=arch, k=k,
                      expansion=4, tokens=12 * 256, snapshots=(1024,), log_every=3,
                      checkpoint_every=2048, device="cuda", precision=precision, dead_window=256,
                      progress=False, reader=ReaderConfig(batch_size=256, mix_chunks=2, threads=2))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        found = record_syncs_in_steps(monkeypatch)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runs = train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(runs) == 1 and runs[0].folder.metrics.exists()
    assert found == []


def test_cuda_sync_recorder_counts_warnings_of_later_steps_on_the_calling_thread_only(monkeypatch):
    """The recorder above, on the CPU: it can see a sync, and sees only the ones it should."""
    def fake_step(self, x, step_index):
        warnings.warn(f"called a synchronizing CUDA operation (step {step_index})")
        other = threading.Thread(target=warnings.warn, args=("synchronizing, another thread",))
        other.start()
        other.join()

    monkeypatch.setattr(SAETrainer, "step", fake_step)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        found = record_syncs_in_steps(monkeypatch)
        for step_index in range(3):
            SAETrainer.step(None, None, step_index)
        warnings.warn("called a synchronizing CUDA operation (between steps)")
    assert [f.split(": ", 1)[1] for f in found] == [
        "called a synchronizing CUDA operation (step 1)", "called a synchronizing CUDA operation (step 2)"]
