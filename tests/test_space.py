"""Disk space before a long job: a harvest or an import that cannot fit is refused before
anything is created, with both numbers; --no-space-check starts anyway; info shows what is left.
On a real 2 MB tmpfs (a private mount namespace, where unshare allows one): the refusal, and a
disk that fills up mid-harvest, then a re-run with more space that ends as a clean run."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from saecache.cli import cli
from saecache.demo.tiny import DEMO_TEXT
from saecache.storage.cache import Cache
from saecache.storage.layout import CacheLayout
from saecache.storage.space import bytes_to_write, format_bytes
from tests.conftest import tree_digest
from tests.test_cli import assert_one_line_error
from tests.test_identity import args, partial

D, LAYERS = 64, 3  # the tiny model
ADVICE = "free space, lower --tokens or --layers, choose another CACHE, or pass --no-space-check"


def layout(tokens_per_chunk: int = 256, ctx: int = 32) -> CacheLayout:
    return CacheLayout(ctx=ctx, d=D, layers=tuple(range(LAYERS)), n_seq=0, compression="none",
                       seqs_per_block=CacheLayout.seqs_per_block_for(ctx, tokens_per_chunk))


def with_tokens(argv: list[str], tokens: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--tokens") + 1] = tokens
    return argv


def test_the_projection_is_the_residuals_plus_a_little():
    tokens = 1_000_000  # 31250 sequences of 32
    needed = bytes_to_write(layout(), tokens, None)
    residuals = tokens * D * 2 * LAYERS
    assert residuals < needed < residuals * 1.03  # + tokens (4 B), source, stats, flags, crc
    card = CacheLayout(ctx=2048, d=1024, layers=tuple(range(24)), n_seq=0, compression="none",
                       seqs_per_block=8)
    assert format_bytes(bytes_to_write(card, 300_000_000, None)).endswith(" TB")
    assert 14.7e12 < bytes_to_write(card, 300_000_000, None) < 14.8e12


def test_a_harvest_larger_than_the_free_space_is_refused_with_both_numbers(tmp_path, tiny_model):
    cache = tmp_path / "new" / "cache.zarr"
    result = CliRunner().invoke(cli, with_tokens(args(cache, tiny_model), "100B"))
    needed = format_bytes(bytes_to_write(layout(), 100_000_000_000, None))
    assert_one_line_error(result, f"harvest needs {needed} at {cache} but ", ADVICE)
    number, unit = re.search(r"but ([\d.]+) (\w+) are free there", result.output).groups()
    free = shutil.disk_usage(tmp_path).free  # the nearest folder that exists
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
    assert float(number) * scale == pytest.approx(free, rel=0.01)
    assert not (tmp_path / "new").exists()  # nothing created, not even the folder


def free_space(monkeypatch, free: int) -> None:
    """The disk, as shutil.disk_usage tells it, has ``free`` bytes free."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))


@pytest.fixture
def little_free(monkeypatch):
    """The disk has one byte less free than the standard test harvest needs."""
    needed = bytes_to_write(layout(), 2048, None)
    free_space(monkeypatch, needed - 1)
    return needed


def test_no_space_check_starts_anyway(tmp_path, tiny_model, little_free):
    cache = tmp_path / "cache.zarr"
    assert_one_line_error(CliRunner().invoke(cli, args(cache, tiny_model)),
                          f"harvest needs {format_bytes(little_free)} at {cache} but "
                          f"{format_bytes(little_free - 1)} are free there")
    assert not cache.exists()
    result = CliRunner().invoke(cli, [*args(cache, tiny_model), "--no-space-check"])
    assert result.exit_code == 0, result.output
    assert Cache.open(str(cache)).complete


def test_import_checks_the_space_too(tmp_path, monkeypatch):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.ones((2048, D), dtype=np.float16))
    cache = tmp_path / "cache.zarr"
    argv = ["import", str(acts), str(cache), "--ctx", "32", "--chunk-rows", "256", "--no-progress"]
    needed = bytes_to_write(CacheLayout(ctx=32, d=D, layers=(0,), n_seq=0, compression="none",
                                        seqs_per_block=8), 2048, None)
    free_space(monkeypatch, needed - 1)
    assert_one_line_error(CliRunner().invoke(cli, argv), f"import needs {format_bytes(needed)} at {cache}",
                          "free space, choose another CACHE, or pass --no-space-check")
    assert not cache.exists()
    assert CliRunner().invoke(cli, [*argv, "--no-space-check"]).exit_code == 0


def test_info_shows_what_a_partial_cache_still_needs(tmp_path, tiny_model, monkeypatch):
    cache = tmp_path / "cache.zarr"
    partial(cache, tiny_model, monkeypatch)
    lay = Cache.open(str(cache)).layout
    left = int((~Cache.open(str(cache)).committed()).sum()) * lay.rows_per_block * D * 2 * LAYERS
    info = CliRunner().invoke(cli, ["info", str(cache), "--json"])
    projected = json.loads(info.output)["bytes_to_write"]
    assert left < projected < left * 1.1 + 70_000  # + stats, flags, crc, metadata
    text = CliRunner().invoke(cli, ["info", str(cache)]).output
    assert f"to write     {format_bytes(projected)} more to finish the harvest" in text.splitlines()
    assert CliRunner().invoke(cli, args(cache, tiny_model)).exit_code == 0
    assert "bytes_to_write" not in json.loads(CliRunner().invoke(cli, ["info", str(cache), "--json"]).output)


# ---- a real small filesystem ---------------------------------------------------------------


def _can_mount_tmpfs(folder: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {folder}"],
                           capture_output=True)
    return probe.returncode == 0


SCRIPT = """
mount -t tmpfs -o size=2m tmpfs "$MNT" || exit 90
"$PY" -m saecache harvest "$MNT/c.zarr" "$@" 2> "$OUT/refused.err"; echo $? > "$OUT/refused.rc"
ls -A "$MNT" > "$OUT/refused.ls"
"$PY" -m saecache harvest "$MNT/c.zarr" "$@" --no-space-check 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"
cp -a "$MNT/c.zarr" "$OUT/full.zarr"
mount -o remount,size=8m "$MNT"
"$PY" -m saecache harvest "$MNT/c.zarr" "$@" --no-space-check 2> "$OUT/rerun.err"; echo $? > "$OUT/rerun.rc"
cp -a "$MNT/c.zarr" "$OUT/rerun.zarr"
"""


@pytest.fixture(scope="module")
def tmpfs_runs(tmp_path_factory, tiny_model):
    """The harvests of SCRIPT on a 2 MB tmpfs (8 MB for the re-run), and a clean run's digest."""
    root = tmp_path_factory.mktemp("tmpfs")
    mnt, out = root / "mnt", root / "out"
    mnt.mkdir()
    out.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("no private tmpfs here (unshare -rm and mount need user namespaces)")
    text = root / "text.txt"
    text.write_text("\n\n".join([DEMO_TEXT.read_text().strip()] * 2))
    options = args(Path("unused"), tiny_model)[2:]  # the options after CACHE
    options[options.index("--dataset") + 1] = str(text)
    options = with_tokens(options, "8192")
    env = f"MNT={shlex.quote(str(mnt))} OUT={shlex.quote(str(out))} PY={shlex.quote(sys.executable)}"
    subprocess.run(["unshare", "-rm", "sh", "-c", f"{env}; export MNT OUT PY; {SCRIPT}", "sh", *options],
                   check=True, timeout=600)
    clean = root / "clean.zarr"
    assert CliRunner().invoke(cli, ["harvest", str(clean), *options]).exit_code == 0
    return mnt, out, tree_digest(clean)


def read(out: Path, name: str) -> str:
    return (out / name).read_text().strip()


def test_a_real_small_disk_is_refused_before_anything_is_written(tmpfs_runs):
    mnt, out, _ = tmpfs_runs
    needed = format_bytes(bytes_to_write(layout(), 8192, None))
    assert read(out, "refused.rc") == "1" and read(out, "refused.ls") == ""
    assert read(out, "refused.err") == (f"saecache: error: harvest needs {needed} at {mnt}/c.zarr but "
                                        f"{format_bytes(2 * 2**20)} are free there: {ADVICE}")


def test_a_disk_full_mid_harvest_loses_nothing_and_the_rerun_is_clean(tmpfs_runs):
    _, out, clean = tmpfs_runs
    lines = read(out, "full.err").splitlines()
    assert read(out, "full.rc") == "1" and len(lines) == 1, lines
    assert lines[0].startswith("saecache: error: ") and "No space left on device" in lines[0]
    full, rerun = Cache.open(str(out / "full.zarr")), Cache.open(str(out / "rerun.zarr"))
    done = np.flatnonzero(full.committed())
    assert 0 < len(done) < full.layout.n_blocks
    for block in done:  # every block committed before the disk filled is there, unchanged
        for layer in full.layout.layers:
            rows = full.layout.block_rows(int(block))
            assert np.array_equal(full.resid(layer)[rows], rerun.resid(layer)[rows])
    assert read(out, "rerun.rc") == "0", read(out, "rerun.err")
    assert tree_digest(out / "rerun.zarr") == clean
