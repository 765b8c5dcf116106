"""`saecache info`: what a cache is, how far its harvest got, what it costs on disk."""

from __future__ import annotations

import numpy as np

from saecache.storage import layout as names
from saecache.storage.cache import Cache
from saecache.storage.space import bytes_to_write, format_bytes
from saecache.storage.stats import per_layer
from saecache.core.units import format_layers, format_tokens


def describe(cache: Cache) -> dict:
    """A JSON-able description: provenance, layout, progress, storage and per-layer stats."""
    lay = cache.layout
    for name in lay.nodes() if cache.tokens_done else ():
        cache.array(name)  # each checked against the layout: a damaged one is one line, not a wrong size
    committed = cache.committed()
    done_seqs = sum(len(lay.block_seqs(int(b))) for b in np.flatnonzero(committed))
    resid_logical = done_seqs * lay.ctx * lay.d * 2 * len(lay.layers)
    resid_stored = sum(cache.where.size(names.resid_name(layer)) for layer in lay.layers)
    info = {
        "location": cache.location,
        "format_version": cache.meta["format_version"],
        "saecache_version": cache.meta["saecache_version"],
        "provenance": cache.provenance.to_json(),
        "layout": {**lay.to_json(), "rows_per_chunk": lay.rows_per_block, "n_tokens": lay.n_tokens,
                   "n_blocks": lay.n_blocks},
        "progress": {
            "tokens_done": cache.tokens_done,
            "blocks_committed": int(committed.sum()),
            "n_blocks": lay.n_blocks,
            "tokens_committed": done_seqs * lay.ctx,
            "complete": cache.complete,
        },
        "storage": {
            "bytes_on_disk": cache.where.size(),
            "resid_bytes_logical": resid_logical,
            "resid_bytes_stored": resid_stored,
            "compression_ratio": resid_logical / resid_stored if resid_stored else None,
        },
        "stats": _stats(cache, committed),
    }
    if not cache.complete:  # what finishing the harvest will still write (storage.space)
        info["bytes_to_write"] = bytes_to_write(lay, cache.provenance.token_budget,
                                                committed if cache.tokens_done else None)
    return info


def _stats(cache: Cache, committed: np.ndarray) -> dict:
    """Per-layer statistics: final ones when complete, else over the blocks committed so far."""
    if cache.complete:
        stats = {layer: cache.layer_stats(layer) for layer in cache.layout.layers}
    elif committed.any():
        stats = per_layer(cache.block_stats()[committed], cache.layout.layers)  # over committed blocks
    else:
        return {}
    return {f"{layer:02d}": {"mean_norm": s.mean_norm, "mean_sq_norm": s.mean_sq_norm,
                             "mean_abs_mean": float(np.abs(s.mean).mean()), "rows": s.rows,
                             "nonfinite": s.nonfinite} for layer, s in stats.items()}


def format_info(info: dict) -> str:
    """The human-readable form of :func:`describe`."""
    p, lay, prog, st = info["provenance"], info["layout"], info["progress"], info["storage"]
    gib = 2**30
    ratio = f"{st['compression_ratio']:.3f}×" if st["compression_ratio"] else "n/a"
    lines = [
        f"cache        {info['location']}  (format {info['format_version']}, saecache {info['saecache_version']})",
        f"model        {p['model']} @ {p['revision'] or 'default'}  [{p['architecture']}, {p['dtype']}, blocks {p['blocks']}]",
        f"dataset      {p['dataset']}  config={p['dataset_config']} split={p['split']} "
        f"revision={p['dataset_revision']} field={p['text_field']}",
        f"layout       ctx {lay['ctx']}, d {lay['d']}, layers {format_layers(lay['layers'])}, "
        f"{lay['rows_per_chunk']} rows/chunk, compression {lay['compression']}, crc32c",
        f"tokens       {format_tokens(lay['n_tokens'])} in {lay['n_seq']:,} sequences "
        f"(budget {format_tokens(p['token_budget'])})" if prog["tokens_done"] else
        "tokens       tokenisation not finished",
        f"progress     {prog['blocks_committed']}/{prog['n_blocks']} blocks, "
        f"{format_tokens(prog['tokens_committed'])} tokens" + ("  complete" if prog["complete"] else ""),
        f"on disk      {st['bytes_on_disk'] / gib:.3f} GiB; residuals {st['resid_bytes_stored'] / gib:.3f} GiB "
        f"stored for {st['resid_bytes_logical'] / gib:.3f} GiB ({ratio})",
    ]
    if "bytes_to_write" in info:
        lines.append(f"to write     {format_bytes(info['bytes_to_write'])} more to finish the harvest")
    if info["stats"]:
        lines.append("layer   E|x|      E|x|^2      rows  non-finite")
        for layer, s in info["stats"].items():
            lines.append(f"{layer:>5} {s['mean_norm']:8.3f} {s['mean_sq_norm']:11.3f} "
                         f"{s['rows']:9d} {s['nonfinite']:11d}")
    return "\n".join(lines)

