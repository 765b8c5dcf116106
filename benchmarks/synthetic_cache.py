"""A complete one-layer cache of random residual-like data, for benchmarks (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saecache.storage.cache import Cache
from saecache.storage.layout import CacheLayout
from saecache.storage.provenance import Provenance
from saecache.storage.stats import sequence_sums

LAYER = 0


def make_cache(location: str | Path, n_blocks: int, chunk_rows: int, d: int, ctx: int = 2048) -> Cache:
    """A cache at ``location`` (folder or URL) of n_blocks blocks of chunk_rows random fp16 rows:
    per-dimension scales, three 50× outlier dimensions, real statistics."""
    seqs_per_block = max(1, chunk_rows // ctx)
    layout = CacheLayout(ctx=ctx, d=d, layers=(LAYER,), seqs_per_block=seqs_per_block, n_seq=0)
    provenance = Provenance(
        model="synthetic", revision=None, dtype="float16", architecture="none", blocks="none",
        n_layers=1, tokenizer="none", vocab_hash="", eos_token_id=0, dataset="random",
        dataset_config=None, split="train", dataset_revision=None, text_field="text",
        token_budget=n_blocks * seqs_per_block * ctx)
    cache = Cache.create(str(location), provenance, layout)
    cache.create_token_arrays(n_blocks * seqs_per_block)
    cache.finish_tokens(n_blocks * seqs_per_block)
    rng = np.random.default_rng(0)
    scales = rng.lognormal(0.0, 0.5, d).astype(np.float32)  # (d,)
    scales[:3] *= 50
    arr = cache.resid(LAYER)
    for block in range(n_blocks):
        rows = cache.layout.block_rows(block)
        x = (rng.standard_normal((rows.stop - rows.start, d), dtype=np.float32) * scales)
        x = x.astype(np.float16)  # (rows, d)
        arr[rows] = x
        sums = sequence_sums(torch.from_numpy(x).reshape(-1, ctx, d)).double().sum(0)  # (d + 4,)
        cache.commit_block(block, sums[None].numpy())
    cache.finalize()
    return cache
