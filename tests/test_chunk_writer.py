"""The direct chunk writer (storage.chunkfile) and the GIL-free crc32c (storage.checksum),
each against the plain path: google_crc32c (what zarr's codec uses) and zarr's own encoder."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from zarr.storage import LocalStore

from saecache.cli import cli
from saecache.harvest import writer as writer_module
from saecache.harvest.capture import HostBuffer
from saecache.harvest.loop import harvest
from saecache.harvest.writer import BlockWriter
from saecache.storage import checksum, chunkfile
from saecache.storage.cache import Cache
from saecache.storage.chunks import chunk_file
from saecache.storage.layout import CacheLayout
from saecache.storage.provenance import Provenance
from saecache.storage.verify import verify
from tests.conftest import harvest_config, tree_digest
from tests.test_cli import assert_one_line_error
from tests.test_identity import args as harvest_args
from tests.test_space import _can_mount_tmpfs

CTX, D, LAYERS, SEQS = 8, 16, (0, 2), 4  # 32 rows (1 KiB) a chunk


# ---- crc32c ---------------------------------------------------------------------------------

def _buffers():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 3 * 2**20 + 7, dtype=np.uint8)  # odd length, above 1 MiB
    half = rng.standard_normal((33, 17)).astype(np.float16)
    return {"empty bytes": b"", "one byte": b"\x01", "bytes": bytes(data[:1001]),
            "odd uint8": data, "unaligned slice": data[3:], "empty array": data[:0],
            "fp16 2-D": half, "memoryview": memoryview(half),
            "torch view": torch.from_numpy(half.astype(np.float32)).half()[5:].numpy()}


BUFFERS = _buffers()


@pytest.mark.parametrize("name", list(BUFFERS))
def test_crc32c_is_the_value_zarr_computes(name):
    buffer = BUFFERS[name]
    assert checksum.crc32c(buffer) == google_crc32c.value(bytes(memoryview(buffer).cast("B")))
    assert checksum.GIL_FREE  # the crc32c package is a declared dependency


def test_crc32c_continues_from_a_value():
    data = BUFFERS["odd uint8"]
    assert checksum.crc32c(data[12345:], checksum.crc32c(data[:12345])) == checksum.crc32c(data)


def test_without_the_crc32c_package_it_falls_back_warning_once(monkeypatch, caplog):
    monkeypatch.setattr(checksum, "_ICRAR", None)
    monkeypatch.setattr(checksum, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=checksum.__name__):
        for name, buffer in BUFFERS.items():
            expected = google_crc32c.value(bytes(memoryview(buffer).cast("B")))
            assert checksum.crc32c(buffer) == expected, name
        data = BUFFERS["odd uint8"]
        assert checksum.crc32c(data[7:], checksum.crc32c(data[:7])) == google_crc32c.value(data)
    warnings = [r for r in caplog.records if "crc32c package is not installed" in r.message]
    assert len(warnings) == 1


# ---- one block written both ways --------------------------------------------------------------

def new_cache(path: Path, n_seq: int, compression: str = "none") -> Cache:
    layout = CacheLayout(ctx=CTX, d=D, layers=LAYERS, seqs_per_block=SEQS, n_seq=0,
                         compression=compression)
    provenance = Provenance(
        model="synthetic", revision=None, dtype="float16", architecture="none", blocks="none",
        n_layers=3, tokenizer="none", vocab_hash="", eos_token_id=0, dataset="random",
        dataset_config=None, split="train", dataset_revision=None, text_field="text",
        token_budget=n_seq * CTX)
    cache = Cache.create(str(path), provenance, layout)
    tokens, source = cache.create_token_arrays(n_seq)
    tokens[...], source[...] = 1, 2  # every token chunk exists, as after tokenisation
    cache.finish_tokens(n_seq)
    return cache


def unit(seed: int) -> HostBuffer:
    """One block's buffer of random fp16 (finite statistics)."""
    buffer = HostBuffer.allocate(len(LAYERS), SEQS, CTX, D, pin=False)
    buffer.resid.copy_(torch.randn(buffer.resid.shape, generator=torch.Generator().manual_seed(seed)))
    buffer.sums.zero_()
    return buffer


@pytest.fixture
def zarr_sets(monkeypatch) -> list[str]:
    """The residual keys zarr's LocalStore writes (the direct writer bypasses it)."""
    keys, real = [], LocalStore.set

    async def spy(self, key, value, *args, **kwargs):
        if key.startswith("resid/") and "/c/" in key:  # chunks, not metadata
            keys.append(key)
        return await real(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", spy)
    return keys


def write_both_ways(tmp_path: Path, n_seq: int, zarr_sets: list[str]) -> tuple[Cache, Cache, list]:
    """The same blocks written by the direct writer and through zarr: (direct, zarr, buffers)."""
    buffers = [unit(block) for block in range(-(-n_seq // SEQS))]
    caches, keys = {}, {}
    for direct in (True, False):
        zarr_sets.clear()
        caches[direct] = cache = new_cache(tmp_path / f"direct-{direct}.zarr", n_seq)
        with BlockWriter(cache, list(buffers), threads=2, direct=direct) as writer:
            for block in range(len(buffers)):
                writer.submit(writer.acquire(), block, [block])
        keys[direct] = sorted(zarr_sets)
    assert len(keys[False]) == len(buffers) * len(LAYERS)  # the zarr path: every chunk through zarr
    short = n_seq % SEQS != 0  # zarr pads a short last block: it keeps the zarr path
    assert keys[True] == ([f"resid/{layer:02d}/c/{len(buffers) - 1}/0" for layer in LAYERS]
                          if short else [])
    return caches[True], caches[False], buffers


@pytest.mark.parametrize("n_seq", [12, 10], ids=["whole blocks", "short last block"])
def test_a_directly_written_chunk_is_the_file_zarr_writes(tmp_path, zarr_sets, n_seq):
    direct, via_zarr, buffers = write_both_ways(tmp_path, n_seq, zarr_sets)
    for block in range(len(buffers)):
        for layer in LAYERS:
            mine = chunk_file(direct.resid(layer), block)
            theirs = chunk_file(via_zarr.resid(layer), block)
            assert mine.read_bytes() == theirs.read_bytes(), (layer, block)
            assert mine.stat().st_mode == theirs.stat().st_mode
    assert tree_digest(direct.where.path) == tree_digest(via_zarr.where.path)
    assert not list(direct.where.path.rglob("*.partial"))


def test_plain_zarr_reads_a_directly_written_cache(tmp_path, zarr_sets):
    direct, _, buffers = write_both_ways(tmp_path, 12, zarr_sets)
    expected = torch.cat([b.resid for b in buffers], dim=1).numpy()  # (layers, rows, d)
    for i, layer in enumerate(LAYERS):
        arr = zarr.open_array(LocalStore(direct.where.path, read_only=True), path=f"resid/{layer:02d}")
        assert np.array_equal(arr[...], expected[i])
    assert direct.committed().all()
    assert verify(Cache.open(str(direct.where.path))).ok


@pytest.mark.parametrize("piece", [chunkfile.PIECE, 1000], ids=["1 MiB pieces", "odd pieces"])
def test_a_chunk_of_many_pieces_is_its_bytes_then_their_crc32c(tmp_path, monkeypatch, piece):
    monkeypatch.setattr(chunkfile, "PIECE", piece)
    data = np.random.default_rng(1).standard_normal((1280 + 3, 1024)).astype(np.float16)  # ~2.5 MiB
    path = tmp_path / "resid" / "00" / "c" / "0" / "0"
    assert chunkfile.write_chunk_file(path, data) == data.nbytes + 4
    expected = data.tobytes() + google_crc32c.value(data.tobytes()).to_bytes(4, "little")
    assert path.read_bytes() == expected and os.listdir(path.parent) == ["0"]


def test_only_whole_plain_local_chunks_are_written_directly(tmp_path):
    cache = new_cache(tmp_path / "plain.zarr", 12)
    arr = cache.resid(0)
    rows = np.zeros((SEQS * CTX, D), dtype=np.float16)
    assert chunkfile.direct_file(arr, 1, rows) == chunk_file(arr, 1) is not None
    assert chunkfile.direct_file(arr, 1, rows[:-CTX]) is None  # a short block: zarr pads it
    assert chunkfile.direct_file(arr, 1, rows.astype(np.float32)) is None
    assert chunkfile.direct_file(arr, 1, np.zeros((SEQS * CTX, 2 * D), np.float16)[:, ::2]) is None
    zstd = new_cache(tmp_path / "zstd.zarr", 12, compression="zstd")
    assert chunkfile.direct_file(zstd.resid(0), 1, rows) is None  # another codec: zarr encodes


# ---- a harvest both ways ------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [2048, 1952], ids=["whole blocks", "short last block"])
def test_a_harvest_through_the_direct_writer_equals_one_through_zarr(tmp_path, tiny_model, monkeypatch,
                                                                      zarr_sets, tokens):
    digests, keys = {}, {}
    for direct in (True, False):
        zarr_sets.clear()
        monkeypatch.setattr(writer_module, "DIRECT", direct)
        path = tmp_path / f"direct-{direct}.zarr"
        harvest(harvest_config(path, tiny_model, tokens=tokens))
        digests[direct], keys[direct] = tree_digest(path), sorted(zarr_sets)
        assert verify(Cache.open(str(path))).ok
    short_block = [] if tokens % 256 == 0 else ["resid/00/c/7/0", "resid/01/c/7/0", "resid/02/c/7/0"]
    assert keys[True] == short_block and len(keys[False]) == 3 * 8  # 3 layers, 8 blocks
    assert digests[True] == digests[False]


# ---- failures -------------------------------------------------------------------------------------

def test_a_failed_write_leaves_nothing_under_the_chunks_name(tmp_path, monkeypatch):
    real = os.pwrite

    def half_then_full(fd, data, offset):
        real(fd, memoryview(data)[:100], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_full)
    path = tmp_path / "resid" / "00" / "c" / "3" / "0"
    with pytest.raises(OSError) as caught:
        chunkfile.write_chunk_file(path, np.ones((64, 16), np.float16))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert os.listdir(path.parent) == []


def test_a_disk_full_mid_harvest_is_one_line_and_the_resume_is_identical(tmp_path, tiny_model,
                                                                         cache_path, monkeypatch):
    real, written, failed = os.pwrite, [], []

    def fills_up(fd, data, offset):
        if failed or len(written) >= 20:  # the disk is full from the 11th chunk on (2 writes each)
            failed.append(os.readlink(f"/proc/self/fd/{fd}"))  # the temporary's path
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(fd)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fills_up)
    cache = tmp_path / "c.zarr"
    result = CliRunner().invoke(cli, harvest_args(cache, tiny_model))
    assert_one_line_error(result, "No space left on device", str(cache), "re-run the same command")
    committed = Cache.open(str(cache)).committed()
    assert 0 < committed.sum() < len(committed) and failed
    for temporary in failed:  # "resid/LL/c/B/0.<uuid>.partial": gone, and its block uncommitted
        assert not Path(temporary).exists() and not committed[int(Path(temporary).parts[-2])]
    assert not list(cache.rglob("*.partial"))
    monkeypatch.setattr(os, "pwrite", real)  # space freed
    assert CliRunner().invoke(cli, harvest_args(cache, tiny_model)).exit_code == 0
    assert tree_digest(cache) == tree_digest(cache_path)


TMPFS_WRITE = """
mount -t tmpfs -o size=1m tmpfs "$MNT" || exit 90
"$PY" -c "$CODE" "$MNT/resid/00/c/0/0"
ls -A "$MNT/resid/00/c/0"; echo listed
"""
CODE = textwrap.dedent("""
    import sys; from pathlib import Path; import numpy as np
    from saecache.storage.chunkfile import write_chunk_file
    try:
        write_chunk_file(Path(sys.argv[1]), np.ones((2**20, 1), np.float16))  # 2 MiB on 1 MiB
    except OSError as err:
        print(err.errno, err.filename)
""")


def test_a_real_full_disk_leaves_no_chunk_file(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("no private tmpfs here (unshare -rm and mount need user namespaces)")
    env = {**os.environ, "MNT": str(mnt), "PY": sys.executable, "CODE": CODE}
    out = subprocess.run(["unshare", "-rm", "sh", "-c", TMPFS_WRITE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{errno.ENOSPC} {mnt}/resid/00/c/0/0", "listed"]


HANG = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from saecache.storage.chunkfile import write_chunk_file
    real = os.pwrite
    def stuck(fd, data, offset):  # part of the chunk written, then stuck until killed
        real(fd, memoryview(data)[:1000], offset)
        print("stuck", flush=True)
        time.sleep(600)
    os.pwrite = stuck
    write_chunk_file(Path(sys.argv[1]), np.full((256, 64), 7, np.float16))
""")


def test_a_killed_writers_temporary_is_ignored_by_verify_and_removed_on_resume(tmp_path, tiny_model,
                                                                               cache_path):
    cache = Path(shutil.copytree(cache_path, tmp_path / "c.zarr"))
    chunk = cache / "resid" / "01" / "c" / "3" / "0"  # rewritten, as a resumed harvest would
    before = chunk.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", HANG, str(chunk)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stuck"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = list(chunk.parent.glob("0.*.partial"))
    assert len(left) == 1 and left[0].stat().st_size == 1000
    assert chunk.read_bytes() == before  # the old chunk or the new one under its name, never a mix
    assert verify(Cache.open(str(cache))).ok  # a stray temporary is no chunk key
    rerun = CliRunner().invoke(cli, harvest_args(cache, tiny_model))
    assert rerun.exit_code == 0, rerun.output
    assert not left[0].exists() and tree_digest(cache) == tree_digest(cache_path)


def test_bench_writer_runs_and_ends_with_its_ratio(tmp_path):
    """benchmarks/bench_writer.py at a toy size: the figures are meaningless, the script is not."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_writer.py"
    done = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path), "--layers", "2",
                           "--d", "64", "--rows", "2048", "--blocks", "2", "--repeats", "1", "--zarr"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"writer/raw \d+\.\d\d", lines[-1]) and float(lines[-1].split()[1]) > 0
    assert any(line.startswith("zarr/raw ") for line in lines)
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
