"""`saecache demo`: the whole pipeline offline on the tiny built-in model and bundled text."""

from __future__ import annotations

from pathlib import Path

from saecache.corpus import DatasetSpec
from saecache.harvest import HarvestConfig, harvest
from saecache.storage.info import describe, format_info
from saecache.tiny import DEMO_TEXT, build_tiny_model

DEMO_CTX = 64
DEMO_TOKENS = 8192  # 128 sequences: the bundled text holds a little more
DEMO_CHUNK_ROWS = 1024  # 16 sequences per block, so the demo cache has several blocks


def demo_harvest_config(out: Path, device: str) -> HarvestConfig:
    """Harvest of the bundled text through the tiny model into ``out/cache.zarr``."""
    model = build_tiny_model(out / "model")
    return HarvestConfig(cache=str(out / "cache.zarr"), model=str(model),
                         dataset=DatasetSpec(str(DEMO_TEXT)), tokens=DEMO_TOKENS, ctx=DEMO_CTX,
                         batch_size=16, chunk_rows=DEMO_CHUNK_ROWS, device=device)


def run_demo(out: str | Path, device: str) -> str:
    """Run the demo pipeline into ``out``; returns the report to print."""
    out = Path(out)
    result = harvest(demo_harvest_config(out, device))
    return format_info(describe(result.cache))
