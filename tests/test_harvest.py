"""Stage one against plain references: hooks, the tokenizer, numpy statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM, AutoTokenizer

from saecache.harvest.loop import harvest, units_of
from saecache.storage.cache import Cache
from saecache.storage.layout import CacheLayout
from saecache.storage.stats import LayerStats
from saecache.demo.tiny import DEMO_TEXT
from tests.conftest import CTX, TOKENS, harvest_config

BATCH = 4  # harvest_config's batch size: the reference runs the same batches


def reference_outputs(model_path, tokens: np.ndarray, layers, dtype=torch.float16):
    """Each block's output via plain forward hooks, plus HF's hidden_states[-1]."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    captured = {layer: [] for layer in layers}
    hooks = [model.gpt_neox.layers[layer].register_forward_hook(
        lambda mod, args, out, layer=layer: captured[layer].append(
            (out[0] if isinstance(out, tuple) else out).detach().clone()))
        for layer in layers]
    final = []
    with torch.no_grad():
        for start in range(0, len(tokens), BATCH):
            out = model(torch.from_numpy(tokens[start:start + BATCH]).long(), output_hidden_states=True)
            final.append(out.hidden_states[-1])
    for hook in hooks:
        hook.remove()
    flat = {layer: torch.cat(c).reshape(-1, c[0].shape[-1]).half() for layer, c in captured.items()}
    return flat, torch.cat(final).reshape(-1, final[0].shape[-1]).half()


def test_every_layer_equals_a_forward_hook(cache_path, tiny_model):
    group = zarr.open_group(cache_path, mode="r")
    tokens = group["tokens"][:]
    reference, _ = reference_outputs(tiny_model, tokens, [0, 1, 2])
    for layer, expected in reference.items():
        stored = torch.from_numpy(group[f"resid/{layer:02d}"][:])  # (n_seq·ctx, d)
        assert stored.shape == expected.shape
        torch.testing.assert_close(stored, expected, atol=0, rtol=0)


def test_last_layer_is_not_the_final_layernorm_output(cache_path, tiny_model):
    group = zarr.open_group(cache_path, mode="r")
    _, final_ln = reference_outputs(tiny_model, group["tokens"][:], [2])
    stored_last = torch.from_numpy(group["resid/02"][:]).float()
    assert not torch.allclose(stored_last, final_ln.float(), atol=1e-2)


def test_tokens_are_the_tokenizer_on_the_packed_stream(cache_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = [p for p in DEMO_TEXT.read_text().split("\n\n") if p.strip()]
    # the stream by hand: each document's ids, then EOS
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_seq = TOKENS // CTX
    expected = np.array(stream[:n_seq * CTX], dtype=np.int32).reshape(n_seq, CTX)
    group = zarr.open_group(cache_path, mode="r")
    np.testing.assert_array_equal(group["tokens"][:], expected)


def test_source_points_at_each_sequences_first_token(cache_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = [p for p in DEMO_TEXT.read_text().split("\n\n") if p.strip()]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    group = zarr.open_group(cache_path, mode="r")
    for seq, (doc, offset) in enumerate(group["source"][:]):
        assert ids[doc][offset] == group["tokens"][seq, 0]


def test_statistics_match_numpy(cache_path):
    cache = Cache.open(str(cache_path))
    for layer in cache.layout.layers:
        x = cache.resid(layer)[:].astype(np.float64)  # (rows, d)
        stats = cache.layer_stats(layer)
        np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-5)
        np.testing.assert_allclose(stats.mean_sq_norm, (x ** 2).sum(1).mean(), rtol=1e-5)
        assert stats.rows == len(x) and stats.nonfinite == 0


def test_cache_layout_and_commit_record(cache_path):
    cache = Cache.open(str(cache_path))
    lay = cache.layout
    assert (lay.ctx, lay.d, lay.layers, lay.n_seq) == (CTX, 64, (0, 1, 2), TOKENS // CTX)
    assert cache.committed().all() and cache.complete
    arr = cache.resid(0)
    assert arr.chunks == (lay.rows_per_block, 64) and arr.dtype == np.float16
    assert [c.to_dict()["name"] for c in arr.metadata.codecs] == ["bytes", "crc32c"]
    assert cache.provenance.blocks == "gpt_neox.layers"


def test_a_layer_subset_stops_the_forward_early(tmp_path, tiny_model, cache_path):
    result = harvest(harvest_config(tmp_path / "c.zarr", tiny_model, layers="0,1"))
    assert result.cache.layout.layers == (0, 1)
    full = zarr.open_group(cache_path, mode="r")
    sub = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert set(sub["resid"].array_keys()) == {"00", "01"}
    np.testing.assert_array_equal(sub["resid/01"][:], full["resid/01"][:])


def test_float32_model_residuals_are_stored_as_float16(tmp_path, tiny_model):
    harvest(harvest_config(tmp_path / "c.zarr", tiny_model, dtype="float32", tokens=512))
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    tokens = group["tokens"][:]
    reference, _ = reference_outputs(tiny_model, tokens, [1], dtype=torch.float32)
    stored = torch.from_numpy(group["resid/01"][:])
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored, reference[1], atol=0, rtol=0)


@pytest.mark.parametrize("batch_size, expected", [(4, [[0], [2]]), (16, [[0, 1], [2, 3]]),
                                                  (24, [[0, 1, 2]])])
def test_units_are_fixed_by_layout_not_by_what_is_pending(batch_size, expected):
    layout = CacheLayout(ctx=4, d=2, layers=(0,), seqs_per_block=8, n_seq=30)  # 4 blocks
    assert units_of(layout, [0, 2], batch_size) == expected


def test_layer_stats_reduce_is_textbook():
    rows = np.array([[1.0, 2.0, 3.0, 5.0, 2.0, 0.0], [3.0, 0.0, 1.0, 1.0, 1.0, 7.0]])  # d=2
    stats = LayerStats.reduce(rows)
    np.testing.assert_allclose(stats.mean, [4 / 3, 2 / 3])
    assert (stats.mean_norm, stats.mean_sq_norm, stats.rows, stats.nonfinite) == (4 / 3, 2.0, 3, 7)
