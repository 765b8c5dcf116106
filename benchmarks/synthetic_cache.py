"""A complete one-layer cache of random residual-like data, for benchmarks (no model needed)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

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


# ----------------------------------------------------------------------------- ground truth


class GroundTruth(NamedTuple):
    """A cache of activations built from known feature directions, and those directions."""

    cache: Cache
    directions: np.ndarray
    """(n_true, d) float32 unit rows: the true features."""
    frequencies: np.ndarray
    """(n_true,) float64: the probability that each true feature fires on a token."""
    info: dict
    """The generator's settings and the measured energy split (mean, signal, noise)."""


def _ground_truth_sampler(d: int, n_true: int, mean_l0: float, alpha: float, seed: int):
    """(directions, frequencies, draw(rng, rows) → (rows, d) float32 signal without mean or noise)."""
    rng = np.random.default_rng([seed, 1])
    directions = rng.standard_normal((n_true, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)  # (n_true, d) unit rows
    ranks = np.arange(1, n_true + 1, dtype=np.float64)
    frequencies = ranks ** -alpha
    frequencies *= mean_l0 / frequencies.sum()  # power law, E[active per token] = mean_l0
    if frequencies.max() >= 1:
        raise ValueError(f"mean_l0={mean_l0} with alpha={alpha} asks a feature to fire on every token")
    directions32 = directions.astype(np.float32)

    def draw(block_rng, rows: int) -> np.ndarray:
        active = block_rng.random((rows, n_true)) < frequencies  # (rows, n_true)
        magnitudes = block_rng.lognormal(0.0, 0.5, (rows, n_true)).astype(np.float32)
        return (magnitudes * active) @ directions32  # (rows, d): non-negative sparse codes

    return directions32, frequencies, draw


def make_ground_truth_cache(location: str | Path, *, d: int, n_true: int, blocks: int,
                            chunk_rows: int, ctx: int = 64, mean_l0: float = 8.0,
                            alpha: float = 0.8, mean_fraction: float = 0.5,
                            noise_fraction: float = 0.01, seed: int = 0) -> GroundTruth:
    """A complete one-layer cache (layer ``LAYER``) of ``blocks`` blocks of ``chunk_rows`` rows

        x = Σ_i a_i f_i + m + ε

    with ``n_true`` random unit directions f_i in d dimensions, i.i.d. per token: feature i
    fires with probability p_i ∝ (i+1)^-alpha (Σ p_i = mean_l0, a power law of firing
    frequencies) with a log-normal magnitude a_i (median 1, σ = 0.5, non-negative); a fixed
    mean offset m with ‖m‖² = mean_fraction · E‖x‖²; Gaussian noise ε holding noise_fraction
    of the signal's energy. Stored as fp16 with real statistics, like a harvested cache.
    """
    if not 0 <= mean_fraction < 1:
        raise ValueError(f"mean_fraction must be in [0, 1), got {mean_fraction}")
    seqs_per_block = max(1, chunk_rows // ctx)
    rows_per_block = seqs_per_block * ctx
    directions, frequencies, draw = _ground_truth_sampler(d, n_true, mean_l0, alpha, seed)
    rng = np.random.default_rng([seed, 2])
    signal_energy = float((draw(rng, 16384) ** 2).sum(axis=1).mean())  # E‖Σ a_i f_i‖²
    offset = rng.standard_normal(d)
    # ‖m‖² = f · (‖m‖² + E‖s‖² + noise): the mean holds mean_fraction of E‖x‖²
    total = signal_energy * (1 + noise_fraction) / (1 - mean_fraction)
    offset *= np.sqrt(mean_fraction * total) / np.linalg.norm(offset)
    noise_sigma = np.sqrt(noise_fraction * signal_energy / d)
    layout = CacheLayout(ctx=ctx, d=d, layers=(LAYER,), seqs_per_block=seqs_per_block, n_seq=0)
    provenance = Provenance(
        model="synthetic-ground-truth", revision=None, dtype="float16", architecture="none",
        blocks="none", n_layers=1, tokenizer="none", vocab_hash="", eos_token_id=0,
        dataset=f"ground-truth features (d={d}, n_true={n_true}, seed={seed})",
        dataset_config=None, split="train", dataset_revision=None, text_field="text",
        token_budget=blocks * rows_per_block)
    cache = Cache.create(str(location), provenance, layout)
    cache.create_token_arrays(blocks * seqs_per_block)
    cache.finish_tokens(blocks * seqs_per_block)
    arr = cache.resid(LAYER)
    offset32, noise32 = offset.astype(np.float32), np.float32(noise_sigma)
    for block in range(blocks):
        block_rng = np.random.default_rng([seed, 3, block])
        rows = cache.layout.block_rows(block)
        n = rows.stop - rows.start
        x = draw(block_rng, n) + offset32 + noise32 * block_rng.standard_normal((n, d), dtype=np.float32)
        x = x.astype(np.float16)  # (rows, d)
        arr[rows] = x
        sums = sequence_sums(torch.from_numpy(x).reshape(-1, ctx, d)).double().sum(0)  # (d + 4,)
        cache.commit_block(block, sums[None].numpy())
    cache.finalize()
    info = dict(d=d, n_true=n_true, mean_l0=mean_l0, alpha=alpha, mean_fraction=mean_fraction,
                noise_fraction=noise_fraction, seed=seed, signal_energy=signal_energy,
                mean_energy=float(offset @ offset), noise_energy=float(d * noise_sigma ** 2),
                min_frequency=float(frequencies.min()), max_frequency=float(frequencies.max()))
    return GroundTruth(cache, directions, frequencies, info)
