"""Stage two's reader: the plan, the held-out split, and the fast reader against the plain one."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saecache.core.errors import SaecacheError
from saecache.harvest.loop import harvest
from saecache.storage.cache import Cache
from saecache.storage.chunks import chunk_file
from saecache.storage.layout import CacheLayout
from saecache.train.reader import (
    Plan,
    PlainReader,
    PrefetchReader,
    ReaderConfig,
    StagingRing,
    heldout_seqs,
    read_heldout,
    split_blocks,
)
from tests.conftest import harvest_config

LAYER = 1


def layout_of(n_seq: int, seqs_per_block: int = 8) -> CacheLayout:
    return CacheLayout(ctx=32, d=64, layers=(0, 1, 2), seqs_per_block=seqs_per_block, n_seq=n_seq)


def all_batches(reader, start_batch: int = 0) -> list[torch.Tensor]:
    return [b.cpu() for b in reader.iter(start_batch)]


def assert_same_batches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Bitwise equality (compared as int16, so a NaN equals itself)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype == torch.float16 and a.shape == b.shape, i
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"batch {i} differs"


def stored_bytes(reader, start_batch: int = 0) -> int:
    """Bytes on disk of the chunks a pass from ``start_batch`` must read, each once."""
    todo, _ = reader.plan.groups_from(start_batch)
    return sum(chunk_file(reader.arr, b).stat().st_size for g in todo for b in reader.plan.groups[g])


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def identity_path(cache_path, tmp_path_factory) -> Path:
    """A copy of the cache whose layer-1 row r holds (r // 64, r % 64, 0, …): rows say who they are."""
    path = copy_cache(cache_path, tmp_path_factory.mktemp("identity") / "cache.zarr")
    cache = Cache.open(str(path), writable=True)
    arr = cache.resid(LAYER)
    ids = np.zeros(arr.shape, dtype=np.float16)  # (n_rows, d)
    rows = np.arange(arr.shape[0])
    ids[:, 0], ids[:, 1] = rows // 64, rows % 64  # exact in float16
    arr[:] = ids
    return path


def row_ids(batch: torch.Tensor) -> np.ndarray:
    """(B,) int64: the row index each row of an identity-cache batch came from."""
    x = batch.float().numpy()
    return (x[:, 0] * 64 + x[:, 1]).astype(np.int64)


# ----------------------------------------------------------------------------- config and split


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("mix_chunks", 0), ("threads", 0),
                                          ("prefetch_groups", 0), ("seed", -1),
                                          ("holdout_fraction", 1.0), ("holdout_fraction", -0.1),
                                          ("holdout_fraction", float("nan")), ("batch_size", 1.5e300),
                                          ("seed", float("inf"))])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):  # names the option
        ReaderConfig(**{field: value})


@pytest.mark.parametrize("n_seq, fraction, n_held", [
    (64, 0.01, 1),     # 8 blocks: ceil(0.08) = 1
    (64, 0.0, 1),      # at least one block, always
    (64, 0.5, 4),
    (65, 0.01, 1),     # 9 blocks, the last one short (1 sequence): held out
    (800, 0.07, 7),    # 100 blocks: 100 * 0.07 is 7.000000000000001 in floats, still 7
    (16, 0.5, 1),      # 2 blocks
])
def test_split_blocks(n_seq, fraction, n_held):
    lay = layout_of(n_seq)
    train, held = split_blocks(lay, fraction)
    assert train.dtype == held.dtype == np.int64
    assert list(held) == list(range(lay.n_blocks - n_held, lay.n_blocks))
    assert list(train) == list(range(lay.n_blocks - n_held))
    seqs = heldout_seqs(lay, fraction)
    assert seqs == range((lay.n_blocks - n_held) * 8, n_seq)


@pytest.mark.parametrize("n_seq, fraction", [(8, 0.01), (5, 0.01), (64, 0.9)])
def test_split_blocks_refuses_no_training_block(n_seq, fraction):
    with pytest.raises(SaecacheError, match="no training block"):
        split_blocks(layout_of(n_seq), fraction)


# ----------------------------------------------------------------------------- the plan


def test_plan_is_deterministic_and_depends_on_layer_and_seed():
    lay = layout_of(64 * 8)  # 64 blocks: 63 to train on
    cfg = ReaderConfig(batch_size=100, mix_chunks=4)
    plan = Plan(lay, 1, cfg)
    assert plan.groups == Plan(lay, 1, cfg).groups
    assert np.array_equal(plan.permutation(3), Plan(lay, 1, cfg).permutation(3))
    for other in (Plan(lay, 2, cfg), Plan(lay, 1, ReaderConfig(batch_size=100, mix_chunks=4, seed=1))):
        assert other.groups != plan.groups
        assert not np.array_equal(other.permutation(0), plan.permutation(0))
    assert not np.array_equal(plan.permutation(0), plan.permutation(1))


def test_plan_covers_training_blocks_once():
    lay = layout_of(64)
    cfg = ReaderConfig(batch_size=100, mix_chunks=3)
    plan = Plan(lay, LAYER, cfg)
    train, _ = split_blocks(lay, cfg.holdout_fraction)
    assert sorted(b for g in plan.groups for b in g) == list(train)
    assert [len(g) for g in plan.groups] == [3, 3, 1]  # the last group may be smaller
    assert plan.group_rows == [768, 768, 256]
    assert plan.batches_per_group == [7, 7, 2]  # remainders (68, 68, 56 rows) dropped
    assert plan.n_batches == 16 and plan.n_tokens == 1600
    located = [plan.locate(i) for i in range(plan.n_batches)]
    assert located == [(g, o) for g, n in enumerate(plan.batches_per_group) for o in range(n)]
    with pytest.raises(IndexError):
        plan.locate(plan.n_batches)


def test_plan_skips_groups_too_small_for_a_batch():
    plan = Plan(layout_of(64), LAYER, ReaderConfig(batch_size=500, mix_chunks=3))
    assert plan.batches_per_group == [1, 1, 0]
    assert plan.locate(1) == (1, 0)
    assert plan.groups_from(0) == ([0, 1], 0)
    assert plan.groups_from(2) == ([], 0)  # the end of the pass


# ----------------------------------------------------------------------------- what a pass yields


def test_plain_reader_follows_the_plan_and_never_serves_heldout_rows(identity_path):
    cache = Cache.open(str(identity_path))
    cfg = ReaderConfig(batch_size=96, mix_chunks=3)
    reader = PlainReader(cache, LAYER, cfg)
    plan, lay = reader.plan, cache.layout
    seen = [row_ids(b) for b in all_batches(reader)]
    i = 0
    for g, group in enumerate(plan.groups):  # the rows are exactly the plan's, in its order
        ids = np.concatenate([np.arange(lay.n_tokens)[lay.block_rows(b)] for b in group])
        perm = plan.permutation(g)
        for o in range(plan.batches_per_group[g]):
            assert np.array_equal(seen[i], ids[perm[o * 96:(o + 1) * 96]])
            i += 1
    flat = np.concatenate(seen)
    assert len(flat) == plan.n_tokens == len(np.unique(flat))  # each training row at most once
    first_heldout = heldout_seqs(lay, cfg.holdout_fraction).start * lay.ctx
    assert flat.max() < first_heldout  # no held-out row, ever


def test_prefetch_reader_never_serves_heldout_rows(identity_path):
    cache = Cache.open(str(identity_path))
    with PrefetchReader(cache, LAYER, ReaderConfig(batch_size=64, mix_chunks=2, threads=2)) as reader:
        flat = np.concatenate([row_ids(b) for b in reader])
    assert len(flat) == len(np.unique(flat)) == reader.plan.n_tokens
    assert flat.max() < heldout_seqs(cache.layout).start * cache.layout.ctx


@pytest.mark.parametrize("batch_size, mix_chunks, threads, prefetch, start", [
    (64, 1, 1, 1, 0),
    (100, 3, 2, 2, 0),
    (100, 3, 2, 2, 9),    # resume in the middle of a group
    (256, 8, 4, 2, 0),    # one group holding every training chunk
    (96, 2, 8, 3, 7),
    (500, 3, 3, 1, 1),    # a group too small for a batch is skipped
])
def test_prefetch_reader_matches_plain_reader(cache_path, batch_size, mix_chunks, threads, prefetch, start):
    cache = Cache.open(str(cache_path))
    cfg = ReaderConfig(batch_size=batch_size, mix_chunks=mix_chunks, threads=threads,
                       prefetch_groups=prefetch)
    want = all_batches(PlainReader(cache, LAYER, cfg), start)
    assert want, "the case should yield batches"
    with PrefetchReader(cache, LAYER, cfg) as reader:
        assert reader.fast_path
        got = all_batches(reader, start)
        assert_same_batches(got, want)
        assert reader.batches == len(want) == reader.plan.n_batches - start
        assert reader.bytes_read == stored_bytes(reader, start)  # every chunk read once
        assert reader.wait_seconds >= 0.0


def test_zarr_fallback_matches_plain_reader(cache_path):
    cache = Cache.open(str(cache_path))
    cfg = ReaderConfig(batch_size=128, mix_chunks=3, threads=2)
    want = all_batches(PlainReader(cache, LAYER, cfg))
    with PrefetchReader(cache, LAYER, cfg, fast=False) as reader:
        assert not reader.fast_path
        assert_same_batches(all_batches(reader), want)
        assert reader.bytes_read == stored_bytes(reader)


def test_zstd_cache_reads_through_zarr_with_the_same_batches(cache_path, tiny_model, tmp_path):
    zstd = harvest(harvest_config(tmp_path / "zstd.zarr", tiny_model, compression="zstd")).cache
    cfg = ReaderConfig(batch_size=128, mix_chunks=2, threads=2)
    want = all_batches(PlainReader(Cache.open(str(cache_path)), LAYER, cfg))
    with PrefetchReader(zstd, LAYER, cfg) as reader:
        assert not reader.fast_path  # zstd chunks are not plain bytes
        assert_same_batches(all_batches(reader), want)  # same model, same data, same rows


def wait_for_bytes(reader, want: int, seconds: float = 5.0) -> int:
    deadline = time.perf_counter() + seconds
    while reader.bytes_read < want and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # long enough for a read beyond the bound to show up
    return reader.bytes_read


def test_reads_run_ahead_of_the_consumer_and_no_further(cache_path):
    cache = Cache.open(str(cache_path))
    cfg = ReaderConfig(batch_size=64, mix_chunks=1, threads=4, prefetch_groups=2)
    with PrefetchReader(cache, LAYER, cfg) as reader:
        chunk = chunk_file(reader.arr, 0).stat().st_size
        batches = reader.iter()
        assert wait_for_bytes(reader, 2 * chunk) == 2 * chunk  # before next(): prefetch_groups
        next(batches)
        assert wait_for_bytes(reader, 3 * chunk) == 3 * chunk  # and one more into the free slot


def test_restarting_a_pass_after_closing_it_early(cache_path):
    cache = Cache.open(str(cache_path))
    cfg = ReaderConfig(batch_size=32, mix_chunks=2, threads=2, prefetch_groups=2)
    want = all_batches(PlainReader(cache, LAYER, cfg))
    with PrefetchReader(cache, LAYER, cfg) as reader:
        first = reader.iter()
        next(first), next(first)
        again = all_batches(reader)  # closes the first pass, reuses its buffers
        assert_same_batches(again, want)
        with pytest.raises(StopIteration):
            next(first)  # the first pass was closed


def test_closing_a_partly_read_pass_does_not_hang(cache_path):
    cache = Cache.open(str(cache_path))
    reader = PrefetchReader(cache, LAYER, ReaderConfig(batch_size=32, mix_chunks=1, threads=2))
    batches = reader.iter()
    next(batches)
    t0 = time.perf_counter()
    reader.close()
    assert time.perf_counter() - t0 < 5
    unstarted = PrefetchReader(cache, LAYER, ReaderConfig(batch_size=32, threads=2))
    unstarted.iter(3)  # reads start before the first next()
    unstarted.close()


def test_start_at_the_end_and_beyond(cache_path):
    cache = Cache.open(str(cache_path))
    with PrefetchReader(cache, LAYER, ReaderConfig(batch_size=64, threads=1)) as reader:
        assert list(reader.iter(reader.plan.n_batches)) == []
        with pytest.raises(IndexError):
            reader.iter(reader.plan.n_batches + 1)


def test_staging_ring_cycles_its_slots_and_stages_a_group():
    ring = StagingRing(3, rows=8, d=4, device=torch.device("cpu"))
    slots = [ring.slot(i) for i in range(4)]
    assert [slot for slot, _, _ in slots] == [0, 1, 2, 0]
    assert slots[3][1] is slots[0][1]  # the ring comes round to the same buffer
    assert all(host.shape == (8, 4) and host.dtype == torch.float16 and reuse is None
               for _, host, reuse in slots)  # on the CPU there is no copy to wait for
    host = slots[1][1][:5]  # (group_rows, d): a group smaller than the buffer
    host[:] = torch.arange(20, dtype=torch.float16).view(5, 4)
    perm = torch.tensor([4, 0, 3, 1, 2])
    staged = ring.stage(7, 1, host, perm, ring.consumer_stream())
    assert staged.group == 7 and staged.ready is None
    assert torch.equal(staged.rows, host) and torch.equal(staged.perm, perm)
    ring.free()
    assert ring.slot(0)[1] is not slots[0][1]  # allocated again after free


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staging_ring_on_cuda_copies_from_pinned_memory_and_records_the_copy():
    ring = StagingRing(2, rows=8, d=4, device=torch.device("cuda"))
    slot, host, reuse = ring.slot(0)
    assert host.is_pinned() and reuse is None
    host[:] = torch.arange(32, dtype=torch.float16).view(8, 4)
    staged = ring.stage(0, slot, host, torch.arange(8).flip(0), ring.consumer_stream())
    ring.consumer_stream().wait_event(staged.ready)
    assert staged.rows.is_cuda and torch.equal(staged.rows.cpu(), host)
    assert torch.equal(staged.perm.cpu(), torch.arange(8).flip(0))
    assert ring.slot(2)[2] is staged.ready  # the next group in this buffer waits for the copy


# ----------------------------------------------------------------------------- damage


def flip_byte_in_training_chunk(path: Path) -> tuple[int, Path]:
    """Invert one byte of the first chunk the default plan reads; (block, chunk file)."""
    cache = Cache.open(str(path))
    block = Plan(cache.layout, LAYER, ReaderConfig(batch_size=64)).groups[0][0]
    file = chunk_file(cache.resid(LAYER), block)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    return block, file


@pytest.mark.parametrize("fast", [True, False])
def test_flipped_byte_is_an_error_naming_the_chunk(cache_path, tmp_path, fast):
    path = copy_cache(cache_path, tmp_path / "bad.zarr")
    block, _ = flip_byte_in_training_chunk(path)
    with PrefetchReader(Cache.open(str(path)), LAYER, ReaderConfig(batch_size=64, threads=2), fast=fast) as reader:
        with pytest.raises(SaecacheError, match=rf"resid/01 chunk \({block}, 0\).*(crc32c|could not be read)"):
            list(reader)


def test_plain_reader_also_refuses_a_flipped_byte(cache_path, tmp_path):
    path = copy_cache(cache_path, tmp_path / "bad.zarr")
    block, _ = flip_byte_in_training_chunk(path)
    with pytest.raises(SaecacheError, match=rf"resid/01 chunk \({block}, 0\)"):
        list(PlainReader(Cache.open(str(path)), LAYER, ReaderConfig(batch_size=64)))


def test_missing_chunk_is_an_error_naming_it(cache_path, tmp_path):
    path = copy_cache(cache_path, tmp_path / "missing.zarr")
    block, file = flip_byte_in_training_chunk(path)
    file.unlink()
    with PrefetchReader(Cache.open(str(path)), LAYER, ReaderConfig(batch_size=64, threads=2)) as reader:
        with pytest.raises(SaecacheError, match=rf"resid/01 chunk \({block}, 0\) is missing"):
            list(reader)


# ----------------------------------------------------------------------------- the rest


def test_unknown_layer_is_one_line_naming_the_layers(cache_path):
    cache = Cache.open(str(cache_path))
    for make in (lambda: PlainReader(cache, 7), lambda: PrefetchReader(cache, 7),
                 lambda: read_heldout(cache, 7, ReaderConfig(), 10)):
        with pytest.raises(SaecacheError, match="no layer 7: it holds layers 0, 1, 2") as err:
            make()
        assert "\n" not in str(err.value)


def test_read_heldout_is_the_heldout_rows_in_order(cache_path):
    cache = Cache.open(str(cache_path))
    cfg = ReaderConfig(holdout_fraction=0.25)  # the last 2 of 8 blocks
    arr = cache.resid(LAYER)
    first = heldout_seqs(cache.layout, 0.25).start * cache.layout.ctx
    assert first == 6 * 256
    some = read_heldout(cache, LAYER, cfg, max_rows=300)
    assert some.dtype == torch.float16 and some.shape == (300, 64)
    assert np.array_equal(some.numpy(), arr[first:first + 300])
    everything = read_heldout(cache, LAYER, cfg, max_rows=10_000)
    assert everything.shape == (512, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_reader_on_cuda_matches_plain_reader(cache_path):
    cache = Cache.open(str(cache_path))
    cfg = ReaderConfig(batch_size=100, mix_chunks=3, threads=4)
    want = all_batches(PlainReader(cache, LAYER, cfg), 2)
    with PrefetchReader(cache, LAYER, cfg, device="cuda") as reader:
        got = list(reader.iter(2))
        assert all(b.is_cuda for b in got)
        assert_same_batches([b.cpu() for b in got], want)
        assert reader.bytes_read == stored_bytes(reader, 2)
