"""Before the model runs: check the request, open or create the cache, tokenise once.

The model's config and tokenizer (no weights) say whether the request is possible; the
cache's provenance and layout are derived from them and compared with an existing cache, which
is resumed, or a new one is created and filled with `tokens` and `source`. All of it runs
under the cache's writer lock (harvest.loop), and nothing is created, cleaned or removed
before the space check has passed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from saecache import __version__
from saecache.core.errors import SaecacheError
from saecache.core.units import parse_layers
from saecache.harvest.config import HarvestConfig
from saecache.harvest.corpus import iter_texts
from saecache.harvest.identity import model_fingerprint, tokenizer_hash
from saecache.harvest.models import find_blocks, max_ctx_of, n_layers_of, vocab_hash
from saecache.harvest.packing import Sequence, pack, tokenize_documents
from saecache.storage.cache import Cache
from saecache.storage.layout import CacheLayout
from saecache.storage.verify import missing_chunks
from saecache.storage.location import location_of
from saecache.storage.provenance import Provenance, ancestors, resolve_model
from saecache.storage.space import bytes_to_write, check_space

log = logging.getLogger(__name__)


def describe(cfg: HarvestConfig, config, tokenizer) -> tuple[Provenance, CacheLayout]:
    """Provenance and layout of the requested cache; one-line errors for impossible requests."""
    n_layers = n_layers_of(config)
    try:
        layers = parse_layers(cfg.layers, n_layers)
    except ValueError as err:
        raise SaecacheError(f"{err} in {cfg.model}") from None
    max_ctx = max_ctx_of(config)
    if max_ctx is not None and cfg.ctx > max_ctx:
        raise SaecacheError(f"--ctx {cfg.ctx} is longer than {cfg.model} allows ({max_ctx}): "
                            f"use --ctx {max_ctx} or less")
    architecture = (config.architectures or [type(config).__name__])[0]
    model = resolve_model(cfg.model)  # a local folder as an absolute path: caches move, cwd changes
    provenance = Provenance(
        model=model, revision=cfg.revision, dtype=cfg.dtype, architecture=architecture,
        blocks=blocks_path_of(config, n_layers), n_layers=n_layers, tokenizer=model, vocab_hash=vocab_hash(tokenizer),
        eos_token_id=int(tokenizer.eos_token_id), dataset=cfg.dataset.canonical_id(),
        dataset_config=cfg.dataset.config, split=cfg.dataset.split,
        dataset_revision=cfg.dataset.revision, text_field=cfg.dataset.text_field,
        token_budget=cfg.tokens, model_commit=getattr(config, "_commit_hash", None),
        saecache_version=__version__, model_fingerprint=model_fingerprint(cfg.model, config),
        tokenizer_hash=tokenizer_hash(tokenizer),
    )
    layout = CacheLayout(ctx=cfg.ctx, d=int(config.hidden_size), layers=layers,
                         seqs_per_block=CacheLayout.seqs_per_block_for(cfg.ctx, cfg.chunk_rows),
                         n_seq=0, compression=cfg.compression)
    return provenance, layout


def blocks_path_of(config, n_layers: int) -> str:
    """Where the blocks sit, read off a weightless copy of the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return find_blocks(skeleton, n_layers)[0]


def open_or_create(cfg: HarvestConfig, provenance: Provenance, layout: CacheLayout,
                    tokenizer) -> Cache:
    """The cache to fill: the existing one if it matches (returned untouched when complete),
    else a new one with its tokens. Call with the cache's writer lock held."""
    where = location_of(cfg.cache, cfg.storage_options)
    exists = where.exists()
    cache = None
    if exists and not cfg.overwrite:
        cache = Cache.open(cfg.cache, writable=True, storage_options=cfg.storage_options)
        check_resumable(cache, as_recorded(cache, provenance), layout)
        if not cache.complete:
            committed = cache.committed() if cache.tokens_done else None
            _check_space(cfg, bytes_to_write(cache.layout, cfg.tokens, committed))
        if removed := where.clean_partials():  # before any rank writes again
            log.info("removed %d partial chunk files left by an interrupted harvest", removed)
        if cache.tokens_done:
            return cache
    else:
        reclaimed = where.size() if exists else 0  # --overwrite deletes the old cache first
        _check_space(cfg, bytes_to_write(layout, cfg.tokens, None), reclaimed)
    sequences = _sequences(cfg, tokenizer)  # fails on missing or empty data before any change
    if cache is None:
        if exists:
            Cache.remove(cfg.cache, cfg.storage_options)
        cache = Cache.create(cfg.cache, provenance, layout, storage_options=cfg.storage_options)
    _write_tokens(cache, sequences, cfg.tokens // cfg.ctx)
    return cache


def _check_space(cfg: HarvestConfig, needed: int, reclaimed: int = 0) -> None:
    if not cfg.no_space_check:
        check_space(location_of(cfg.cache, cfg.storage_options), needed, "harvest", reclaimed)


def as_recorded(cache: Cache, provenance: Provenance) -> Provenance:
    """``provenance`` naming its model as ``cache`` does when both name the same folder: a
    cache from before saecache 0.3 recorded a local model relative to the working directory."""
    recorded = cache.provenance.model
    if recorded != provenance.model and resolve_model(recorded, ancestors(cache.location)) == provenance.model:
        return replace(provenance, model=recorded, tokenizer=cache.provenance.tokenizer)
    return provenance


def check_resumable(cache: Cache, provenance: Provenance, layout: CacheLayout) -> None:
    """Refuse, in one line, a cache made from other weights or settings, or one whose commit
    record names chunks that are not there."""
    if change := cache.provenance.weights_change(provenance):
        raise SaecacheError(
            f"cache at {cache.location} was harvested from {change}: its activations are not this "
            "model's; harvest into another CACHE, or --overwrite")
    cache.check_matches(provenance, layout)
    check_commit_record(cache)


def check_commit_record(cache: Cache) -> None:
    """Every chunk of the token arrays and of every committed block is present (one listing),
    and a complete cache has every block committed; a problem is one line pointing to verify."""
    if not cache.tokens_done:
        return
    committed = cache.committed()  # (n_blocks,) bool
    if cache.complete and not committed.all():
        _damaged(cache, f"{int((~committed).sum())} of its {len(committed)} blocks are not committed")
    for name, coords in missing_chunks(cache, committed)[:1]:
        _damaged(cache, f"{name} chunk {coords} of block {coords[0]} is missing")


def _damaged(cache: Cache, problem: str) -> None:
    raise SaecacheError(f"cache at {cache.location} is damaged: {problem}; run saecache verify "
                        f"{cache.location}, then --overwrite or harvest into another CACHE")


def _sequences(cfg: HarvestConfig, tokenizer) -> Iterator[Sequence]:
    """The packed sequences, with the first one already read (so empty data fails now)."""
    docs = tokenize_documents(tokenizer, iter_texts(cfg.dataset))
    stream = pack(docs, cfg.ctx, int(tokenizer.eos_token_id), cfg.tokens // cfg.ctx)
    first = next(stream, None)
    if first is None:
        raise SaecacheError(f"dataset {cfg.dataset.id} holds fewer than --ctx {cfg.ctx} tokens: "
                            "give more text or a smaller --ctx")
    return itertools.chain([first], stream)


def _write_tokens(cache: Cache, sequences: Iterator[Sequence], max_seqs: int) -> None:
    """Fill `tokens` and `source` one block at a time, then fix the sequence count."""
    tokens, source = cache.create_token_arrays(max_seqs)
    per_block = cache.layout.seqs_per_block
    n = 0
    while batch := list(itertools.islice(sequences, per_block)):
        tokens[n:n + len(batch)] = np.stack([s.ids for s in batch])  # (s, ctx) int32
        source[n:n + len(batch)] = np.array([(s.doc, s.offset) for s in batch], dtype=np.int64)
        n += len(batch)
    if n < max_seqs:
        log.warning("the dataset ran out after %d sequences (%d tokens) of the %d asked for",
                    n, n * cache.layout.ctx, max_seqs)
    cache.finish_tokens(n)
