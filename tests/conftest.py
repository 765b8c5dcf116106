"""Shared fixtures: the tiny GPT-NeoX built locally, and one harvested cache to read from."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Weight fingerprints are kept per user (saecache.harvest.identity); tests keep theirs apart.
os.environ.setdefault("SAECACHE_CACHE_DIR", tempfile.mkdtemp(prefix="saecache-test-cache-"))
# torch's default (one thread per core, for every process) oversubscribes a busy machine;
# subprocesses started by tests inherit these.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from saecache.harvest.corpus import DatasetSpec  # noqa: E402
from saecache.harvest.config import HarvestConfig
from saecache.harvest.loop import harvest  # noqa: E402
from saecache.demo.tiny import DEMO_TEXT, TinyModelConfig, build_tiny_model  # noqa: E402

CTX = 32
TOKENS = 2048  # 64 sequences
CHUNK_ROWS = 256  # 8 sequences per block → 8 blocks


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 3-block GPT-NeoX (d=64) with random weights, saved and loaded by path."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelConfig())


def harvest_config(cache: Path, model: Path, **overrides) -> HarvestConfig:
    """The tests' standard harvest: the bundled text, ctx 32, 8 blocks of 8 sequences."""
    options = dict(cache=str(cache), model=str(model), dataset=DatasetSpec(str(DEMO_TEXT)),
                   tokens=TOKENS, ctx=CTX, chunk_rows=CHUNK_ROWS, batch_size=4, device="cpu",
                   writer_threads=2, buffers=2, progress=False)
    return HarvestConfig(**{**options, **overrides})


@pytest.fixture(scope="session")
def cache_path(tmp_path_factory, tiny_model) -> Path:
    """One complete cache of the tiny model; tests must not modify it (copy it first)."""
    path = tmp_path_factory.mktemp("cache") / "cache.zarr"
    harvest(harvest_config(path, tiny_model))
    return path


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative name and bytes: equal digests, identical trees (the
    lock file, which names its last holder, aside)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != "saecache.lock"):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, tiny_model) -> Path:
    """A 64K-token cache (the bundled text, repeated) for training: ctx 64, 32 blocks."""
    folder = tmp_path_factory.mktemp("train-cache")
    text = folder / "text.txt"
    text.write_text("\n\n".join([DEMO_TEXT.read_text().strip()] * 9))
    path = folder / "cache.zarr"
    harvest(harvest_config(path, tiny_model, dataset=DatasetSpec(str(text)), tokens=65536, ctx=64,
                           chunk_rows=2048, batch_size=32, dtype="float32"))
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`saecache demo` run once through the CLI: (its folder, the click result)."""
    from click.testing import CliRunner

    from saecache.cli import cli

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, CliRunner().invoke(cli, ["demo", "--out", str(out), "--device", "cpu"])
