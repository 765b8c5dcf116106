"""Storage integrity (issue 10): a damaged chunk, array or attribute of a cache is found by
`saecache verify` and refused, in one line naming it, by every command that would read it.

Every case damages a copy of a session fixture (never the fixture): a byte flipped, a chunk
truncated or deleted, the ``saecache`` attribute edited (with its checksum left stale, or
recomputed as a forger would), a node's zarr.json removed or made invalid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from saecache.cli import cli
from saecache.storage import layout as names
from saecache.storage.cache import FORMAT_VERSION, Cache
from saecache.storage.chunks import CheckedStore, ChunkError, chunk_file
from saecache.storage.header import checksum
from saecache.storage.layout import CacheLayout
from saecache.train.config import ReaderConfig
from saecache.train.reader import Plan, split_blocks
from tests.test_cli import harvest_args

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "saecache-0.1.0"
TRAIN = ["--layer", "1", "--expansion", "2", "--tokens", "512", "--snapshots", "256", "--batch-size", "64",
         "--device", "cpu", "--reader-threads", "2", "--no-progress"]
MODES = ["flip", "truncate", "delete"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def damage(cache: Path, key: str, how: str) -> None:
    """Flip one byte in the middle of a chunk file, cut it in half, or delete it."""
    file = cache / key
    data = bytearray(file.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    elif how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        file.unlink()


def edit_header(cache: Path, change, resign: bool) -> None:
    """Edit the ``saecache`` attribute in the group's zarr.json; ``resign`` recomputes its
    checksum (what only a deliberate forger would do)."""
    path = cache / "zarr.json"
    doc = json.loads(path.read_text())
    header = doc["attributes"]["saecache"]
    change(header)
    if resign:
        header["checksum"] = checksum(header)
    path.write_text(json.dumps(doc))


def failed(result, *needles: str) -> list[str]:
    """Exit 1, no traceback, the last line ``saecache: error: ...``; each needle on some line."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("saecache: error: "), result.output
    for needle in needles:
        assert any(needle in line for line in lines), (needle, result.output)
    return lines


def one_line(result, *needles: str) -> str:
    lines = failed(result, *needles)
    assert len(lines) == 1, result.output
    return lines[0]


def verify_failed(result, *needles: str) -> list[str]:
    """verify: one ``BAD`` line per problem, the summary of what was read, the error last (or
    the error alone, when the cache cannot be opened at all)."""
    lines = failed(result, *needles)
    assert all(line.startswith(("BAD ", "read ")) for line in lines[:-1]), result.output
    assert len(lines) == 1 or sum(line.startswith("BAD ") for line in lines) >= 1
    return lines


@pytest.fixture
def cache(cache_path, tmp_path) -> Path:
    """A copy of the 8-block session cache (ctx 32, layers 0-2, 8 sequences per block)."""
    return copy(cache_path, tmp_path / "cache.zarr")


# ---- the intact cache -----------------------------------------------------------------------


def test_an_intact_copy_verifies_ok_and_carries_its_checksum(cache):
    result = run("verify", cache)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "ok"
    meta = Cache.open(str(cache)).meta
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["checksum"] == checksum(meta) and meta["checksum"].startswith("sha256:")


def test_a_stray_lock_file_at_the_top_trips_nothing(cache, train_cache, tmp_path):
    """Engineer B's ``saecache.lock`` sits beside zarr.json: not a zarr key."""
    (cache / "saecache.lock").write_text('{"pid": 1234, "host": "elsewhere"}')
    result = run("verify", cache)
    assert result.exit_code == 0 and result.output.splitlines()[-1] == "ok", result.output
    plain = json.loads(run("info", cache, "--json").output)
    assert plain["storage"]["bytes_on_disk"] > plain["storage"]["resid_bytes_stored"]
    assert run("info", cache).exit_code == 0
    trained = copy(train_cache, tmp_path / "train.zarr")
    (trained / "saecache.lock").write_text("locked")
    result = run("train", trained, *TRAIN, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "layer01-relu-x2-l1-0.0003" / "sae_layer01_final.pt").exists()


# ---- the chunk matrix: verify ---------------------------------------------------------------

# array → (key of the chunk damaged, how verify names it); all of committed block 3 (tokens 2)
CHUNKS = {
    "tokens": ("tokens/c/2/0", "tokens chunk (2, 0)"),
    "source": ("source/c/2/0", "source chunk (2, 0)"),
    "resid/01": ("resid/01/c/3/0", "resid/01 chunk (3, 0)"),
    "blocks/stats": ("blocks/stats/c/3/0/0", "blocks/stats chunk (3, 0, 0)"),
    "blocks/committed": ("blocks/committed/c/3", "blocks/committed chunk (3,)"),
}


@pytest.mark.parametrize("how", MODES)
@pytest.mark.parametrize("array", list(CHUNKS))
def test_verify_finds_every_damaged_chunk(cache, array, how):
    key, name = CHUNKS[array]
    damage(cache, key, how)
    if (array, how) == ("blocks/committed", "delete"):  # by design: block 3 is not committed
        name = "blocks/committed: 1 of 8 blocks are not committed (first: block 3), yet the cache is marked complete"
    lines = verify_failed(run("verify", cache), name)
    reason = {"flip": "corrupt (crc32c checksum", "truncate": "the wrong size", "delete": ": missing"}[how]
    assert any(reason in line for line in lines) or array == "blocks/committed" and how == "delete"


def test_a_corrupt_commit_record_is_a_bad_line_not_uncommitted(cache):
    damage(cache, "blocks/committed/c/5", "flip")
    lines = verify_failed(run("verify", cache))
    assert "BAD blocks/committed chunk (5,): corrupt (crc32c checksum" in lines[0]
    assert "1 of 8 blocks are not committed (first: block 5)" in lines[1]


# ---- the chunk matrix: the commands that read them ------------------------------------------


@pytest.mark.parametrize("how", MODES)
@pytest.mark.parametrize("which", ["training", "held-out"])
def test_train_refuses_a_damaged_residual_chunk(train_cache, tmp_path, which, how):
    path = copy(train_cache, tmp_path / "cache.zarr")
    layout = Cache.open(str(path)).layout
    train_blocks, held = split_blocks(layout, ReaderConfig().holdout_fraction)
    first = Plan(layout, 1, ReaderConfig(batch_size=64)).groups[0][0]  # the first chunk trained on
    block = int(held[0]) if which == "held-out" else first
    damage(path, f"resid/01/c/{block}/0", how)
    line = one_line(run("train", path, *TRAIN, "--out", tmp_path / "runs"))
    assert f"resid/01 chunk ({block}, 0) is " in line and f"run saecache verify {path}" in line
    assert {"flip": "corrupt", "truncate": "the wrong size", "delete": "is missing"}[how] in line


@pytest.mark.parametrize("how", MODES)
def test_eval_refuses_a_damaged_heldout_tokens_chunk(tmp_path, how):
    """The 0.1.0 fixture's runs and cache: its last block (always held out) loses its tokens."""
    for name in ("model", "cache.zarr", "runs"):
        copy(FIXTURE / name, tmp_path / name)
    last = Cache.open(str(tmp_path / "cache.zarr")).layout.n_blocks - 1
    damage(tmp_path / "cache.zarr", f"tokens/c/{last}/0", how)
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    line = one_line(run("eval", tmp_path / "runs", "--model", tmp_path / "model", "--cache",
                        tmp_path / "cache.zarr", "--device", "cpu"))
    assert f"tokens chunk ({last}, 0) is " in line
    after = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before  # no figures computed on zeros


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_info_and_harvest_refuse_a_damaged_commit_record(cache, tiny_model, how):
    damage(cache, "blocks/committed/c/3", how)
    for args in (["info", cache], ["info", cache, "--json"], [*harvest_args(cache, tiny_model), "--no-progress"]):
        one_line(run(*args), "blocks/committed chunk (3,) is ")


def test_a_deleted_commit_chunk_only_means_not_committed(cache):
    damage(cache, "blocks/committed/c/3", "delete")
    info = json.loads(run("info", cache, "--json").output)
    assert info["progress"]["blocks_committed"] == 7


def partial(cache: Path) -> None:
    """The state a kill leaves: blocks 6 and 7 not committed, the cache not complete."""
    for block in (6, 7):
        (cache / "blocks" / "committed" / "c" / str(block)).unlink()
    Cache.open(str(cache), writable=True)._update(complete=False, stats={})


@pytest.mark.parametrize("how", MODES)
def test_harvest_resume_refuses_a_damaged_tokens_chunk(cache, tiny_model, how):
    partial(cache)
    damage(cache, "tokens/c/7/0", how)
    # a deleted chunk is found by the resume's listing of the commit record, a damaged one by
    # the checked store when the unit is read: both name the chunk
    one_line(run(*harvest_args(cache, tiny_model), "--no-progress"), "tokens chunk (7, 0)")
    cache_now = Cache.open(str(cache))
    assert not cache_now.complete and not cache_now.committed()[7]  # nothing forwarded from zeros


# ---- the attribute matrix -------------------------------------------------------------------


def _scale_mean_norm(h):
    h["stats"]["01"]["mean_norm"] *= 1.37


# edit → what a command says once the checksum is recomputed to match it
EDITS = {
    "mean_norm x 1.37": (_scale_mean_norm, "layer 1 statistics: mean_norm is"),
    "n_seq + 1": (lambda h: h["layout"].update(n_seq=h["layout"]["n_seq"] + 1), "the layout says"),
    "n_seq - 1": (lambda h: h["layout"].update(n_seq=h["layout"]["n_seq"] - 1), "the layout says"),
    "d + 1": (lambda h: h["layout"].update(d=h["layout"]["d"] + 1), "do not fit a d 65 layout"),
    "seqs_per_block 0": (lambda h: h["layout"].update(seqs_per_block=0), "seqs_per_block 0 is outside"),
    "n_seq 1e13": (lambda h: h["layout"].update(n_seq=10**13), "n_seq 10000000000000 is outside"),
    "n_seq 1e13 (a float)": (lambda h: h["layout"].update(n_seq=1e13), "n_seq 10000000000000.0 is not an integer"),
    "d 1e7": (lambda h: h["layout"].update(d=10**7), "d 10000000 is outside"),
    "complete, a string": (lambda h: h.update(complete="yes"), "complete 'yes' is not a bool"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_attribute_fails_its_checksum_everywhere(cache, tmp_path, edit):
    edit_header(cache, EDITS[edit][0], resign=False)
    needle = f"the metadata of cache {cache} fails its checksum (edited or damaged)"
    one_line(run("verify", cache), needle, "harvest it again with --overwrite")
    one_line(run("info", cache), needle)
    one_line(run("train", cache, *TRAIN, "--out", tmp_path / "runs"), needle)


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_forged_attribute_is_still_caught(cache, tmp_path, edit):
    """Checksum recomputed: the values themselves are refused (implausible, or not what the
    arrays or blocks/stats say)."""
    change, needle = EDITS[edit]
    edit_header(cache, change, resign=True)
    verify_failed(run("verify", cache), needle)
    if edit == "mean_norm x 1.37":
        return  # consistent with every array: only verify's recomputation can tell
    one_line(run("info", cache), needle)
    one_line(run("train", cache, *TRAIN, "--out", tmp_path / "runs"), needle)


def test_a_0_1_0_cache_without_a_checksum_still_has_its_statistics_checked(tmp_path):
    old = copy(FIXTURE / "cache.zarr", tmp_path / "cache.zarr")
    edit_header(old, _scale_mean_norm, resign=False)  # format 1 has no checksum to fail
    verify_failed(run("verify", old), "BAD metadata: layer 1 statistics: mean_norm is")


NODES = {
    "the group's zarr.json is invalid JSON": ("zarr.json", "is not valid JSON"),
    "resid/01's zarr.json is invalid JSON": ("resid/01/zarr.json", "resid/01 of cache {} is unreadable ("),
    "resid/01's zarr.json is missing": ("resid/01/zarr.json", "resid/01 of cache {} is missing (no zarr.json)"),
}


@pytest.mark.parametrize("case", list(NODES))
def test_a_damaged_zarr_json_is_one_line(cache, tmp_path, tiny_model, case):
    key, needle = NODES[case]
    needle = needle.format(cache)
    if "missing" in case:
        (cache / key).unlink()
    else:
        (cache / key).write_text('{"zarr_format": 3, "node_type": ')
    if key == "zarr.json":  # every command that opens a cache
        one_line(run("verify", cache), needle)
        one_line(run(*harvest_args(cache, tiny_model)), needle)
        runs = copy(FIXTURE / "runs", tmp_path / "runs")
        one_line(run("eval", runs, "--model", FIXTURE / "model", "--cache", cache, "--device", "cpu"), needle)
    else:  # the other arrays are still checked
        lines = verify_failed(run("verify", cache), needle.split(" is ")[1].split(" (")[0])
        assert lines[0].startswith("BAD resid/01: ") and lines[1].startswith("read ")
    one_line(run("info", cache), needle)
    one_line(run("train", cache, *TRAIN, "--out", tmp_path / "runs"), needle)


def test_an_array_stripped_of_its_crc32c_is_refused(cache, tmp_path):
    path = cache / "resid" / "01" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]
    path.write_text(json.dumps(meta))
    needle = "resid/01 of cache {} is stored without a crc32c checksum (codecs ['bytes'])".format(cache)
    one_line(run("train", cache, *TRAIN, "--out", tmp_path / "runs"), needle)
    verify_failed(run("verify", cache), "BAD resid/01: stored without a crc32c checksum")


def test_a_cache_path_that_is_a_regular_file_is_one_line(tmp_path, tiny_model):
    file = tmp_path / "cache.zarr"
    file.write_text("not a cache")
    for args in (["verify", file], ["info", file], ["train", file, *TRAIN, "--out", tmp_path / "runs"],
                 harvest_args(file, tiny_model)):
        one_line(run(*args), f"{file} is not a saecache cache")
    assert file.read_text() == "not a cache"


# ---- below the commands ---------------------------------------------------------------------


def test_every_zarr_read_path_refuses_a_missing_chunk(cache):
    (cache / "resid" / "02" / "c" / "4" / "0").unlink()
    arr = Cache.open(str(cache)).resid(2)
    rows = slice(4 * 256, 5 * 256)
    for read in (lambda: arr[:], lambda: arr[rows], lambda: arr.blocks[4], lambda: arr.oindex[[1100], :],
                 lambda: arr.get_block_selection((slice(3, 6), 0))):
        with pytest.raises(ChunkError, match=r"resid/02 chunk \(4, 0\) is missing in "):
            read()
    assert arr.blocks[3].shape == (256, 64)  # the others read as before


def test_a_damaged_header_can_still_be_overwritten(cache, tiny_model):
    """What every metadata error says to do (harvest it again with --overwrite) works."""
    edit_header(cache, lambda h: h["layout"].update(d=10**7), resign=False)
    one_line(run("info", cache), "fails its checksum", "harvest it again with --overwrite")
    result = run(*harvest_args(cache, tiny_model), "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert run("verify", cache).output.splitlines()[-1] == "ok"


def test_the_readers_fast_path_still_reads_plain_files(cache):
    """The checked store wraps zarr's local store; plain reads of chunk files still find them."""
    arr = Cache.open(str(cache)).resid(1)
    assert isinstance(arr.store, CheckedStore)
    assert chunk_file(arr, 3) == cache / "resid" / "01" / "c" / "3" / "0"


def test_block_stats_read_only_committed_blocks(cache):
    (cache / "blocks" / "committed" / "c" / "6").unlink()
    (cache / "blocks" / "stats" / "c" / "6" / "0" / "0").unlink()  # uncommitted: never read
    sums = Cache.open(str(cache)).block_stats()
    assert not sums[6].any() and sums[5].any()


@pytest.mark.parametrize("change", [dict(seqs_per_block=0), dict(n_seq=-1), dict(d=10**7), dict(ctx=0),
                                    dict(n_seq=2**40), dict(layers=[2, 1]), dict(layers=[]),
                                    dict(compression="lz4"), dict(ctx=True), dict(extra=1)])
def test_implausible_layouts_are_refused_before_any_size_is_computed(change):
    good = dict(ctx=32, d=64, layers=[0, 1], seqs_per_block=8, n_seq=64, compression="none")
    assert CacheLayout.from_json(good).n_blocks == 8
    with pytest.raises(ValueError, match="^layout"):
        CacheLayout.from_json({**good, **change})


# ---- real processes -------------------------------------------------------------------------


def saecache(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "saecache", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def assert_process_failed(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("saecache: error: ") and needle in proc.stderr, proc.stderr


def test_train_in_a_real_process_refuses_a_missing_heldout_chunk(train_cache, tmp_path):
    path = copy(train_cache, tmp_path / "cache.zarr")
    held = split_blocks(Cache.open(str(path)).layout)[1][0]
    damage(path, f"resid/01/c/{held}/0", "delete")
    proc = saecache("train", path, *TRAIN, "--out", tmp_path / "runs")
    assert_process_failed(proc, f"resid/01 chunk ({held}, 0) is missing in {path}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_harvest_resume_in_a_real_process(cache, tiny_model):
    partial(cache)
    damage(cache, "tokens/c/6/0", "flip")  # (a deleted one is found by the resume's listing)
    proc = saecache(*harvest_args(cache, tiny_model), "--no-progress")
    assert_process_failed(proc, "tokens chunk (6, 0) is corrupt")
    assert np.count_nonzero(Cache.open(str(cache)).committed()) == 6
    assert names.TOKENS in proc.stderr


def test_a_refused_read_leaves_nothing_in_flight_once_settled(cache):
    """One corrupt chunk fails a read of many while zarr's other chunk reads still run: the CLI
    settles them before it exits, so nothing prints after its one line."""
    import asyncio

    from saecache.storage.location import run as run_on_zarr_loop
    from saecache.storage.location import settle

    damage(cache, "resid/00/c/0/0", "flip")
    with pytest.raises(ChunkError):
        Cache.open(str(cache)).resid(0)[:]  # 8 chunks read concurrently, the first one refused
    settle()

    async def others() -> int:
        return sum(not t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())
    assert run_on_zarr_loop(others()) == 0
