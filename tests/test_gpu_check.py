"""benchmarks/gpu_check.py: run end to end on the CPU in a real process (tiny shapes), its budget,
and the pieces that decide ok or fail, each shown able to fail."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

from saecache.sae.archs import ARCHS  # noqa: E402
from saecache.storage.cache import Cache  # noqa: E402
from saecache.train.config import PRECISIONS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                           "--out", str(out), "--disk-dir", str(disk)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert report["ok"] is True and report["machine"]["device"] == "cpu"
    for name in gpu_check.SECTIONS:
        assert name in proc.stdout  # the table has a line per section
        assert sections[name]["seconds"] >= 0
    identity = sections["harvest_identity"]
    assert identity["status"] == "ok" and identity["files"] > 10
    assert identity["differing_files"] == [] and identity["reference_mismatches"] == {}
    assert sections["cuda_tests"]["status"] == "skipped" and "cpu" in sections["cuda_tests"]["reason"]
    sync = sections["sync_debug"]
    assert sync["status"] == "ok" and sync["syncs_checked"] is False
    assert len(sync["steps"]) == len(ARCHS) * len(PRECISIONS) and set(sync["steps"].values()) == {"ok"}
    rows = sections["train"]["rows"]
    assert [(r["precision"], r["runs"]) for r in rows] == list(gpu_check.QUICK.train_rows)
    for row in rows:
        assert row["status"] == "ok" and 0 <= row["data_wait_fraction"] <= 1
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("ratio", "limit_tok_s", "train_tok_s"))
    measured = ("harvest_ram", "harvest_disk") if gpu_check.ram_folder(quick=True) else ("harvest_disk",)
    if len(measured) == 1:  # a small or missing /dev/shm (a container's 64 MiB, say)
        assert sections["harvest_ram"] == {**sections["harvest_ram"], "status": "skipped",
                                           "reason": "no writable /dev/shm with room for the check on this machine"}
    for name in measured:
        r = sections[name]
        assert r["status"] == "ok" and r["bound"] in ("forward", "write")
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ratio", "forward_tok_s", "raw_write_bytes_s"))
        assert r["bytes_written"] >= r["tokens"] * 3 * 64 * 2  # every layer of the tiny model
        assert r["ratio"] == r["harvest_tok_s"] / r["limit_tok_s"]
    assert sections["harvest_disk"]["dir"].startswith(str(disk))
    statistics = sections["harvest_stats"]
    assert statistics["status"] == "ok" and statistics["calls_per_batch"] == 3
    assert math.isfinite(statistics["share_of_forward"]) and statistics["share_of_forward"] > 0
    assert list(disk.iterdir()) == []  # its temporary folder is removed


def test_gpu_check_skips_each_section_with_its_reason_when_the_budget_is_spent(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # main() points it at its folder
    monkeypatch.setattr(gpu_check, "START", time.perf_counter() - 100)  # imports took 100 s
    exits, watchdog = [], gpu_check.start_watchdog
    monkeypatch.setattr(gpu_check, "start_watchdog", lambda *a, **k: watchdog(*a, exit=exits.append, **k))
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget", "0", "--out", str(out),
                           "--disk-dir", str(tmp_path)]) == 0
    assert exits == []  # a spent budget skips everything before the watchdog's grace is up
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "skipped" and s["reason"].startswith("budget: needs ~")
               for s in sections.values())


@pytest.mark.parametrize("argv, message", [
    (["--out", "/no/such/folder/x.json"], "--out /no/such/folder/x.json: folder /no/such/folder does not exist"),
    (["--disk-dir", "/no/such/folder"], "--disk-dir /no/such/folder is not a folder: give an existing"),
    pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA device here; check the script itself",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
])
def test_gpu_check_refuses_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        gpu_check.parse_args(["--device", "cpu", *argv] if "--device" not in argv else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and err[-1].startswith(f"gpu_check.py: error: {message}")


def test_watchdog_records_the_running_section_as_stopped_writes_the_json_and_exits_3(tmp_path):
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path / "gpu_check.json")])
    report, budget, exits, cleaned = gpu_check.Report(Path(args.out), args), gpu_check.Budget(0), [], []
    report.running = "train"
    timer = gpu_check.start_watchdog(report, budget, lambda: cleaned.append(True), grace=0, exit=exits.append)
    timer.join(10)
    assert exits == [3] and cleaned == [True]
    sections = json.loads(Path(args.out).read_text())["sections"]
    assert sections["train"]["status"] == "error" and "stopped by the watchdog" in sections["train"]["reason"]
    assert sections["harvest_identity"] == {"status": "skipped", "reason": "not reached"}


def test_hook_reference_equals_the_harvest_and_a_changed_bit_is_found(cache_path, tiny_model):
    cache = Cache.open(str(cache_path))  # the tests' standard harvest: float16, batch 4, CPU
    reference = gpu_check.hook_reference(cache, tiny_model, "cpu", batch_size=4)
    assert sorted(reference) == list(cache.layout.layers)
    assert gpu_check.reference_mismatches(cache, reference) == {}
    layer = cache.layout.layers[1]
    reference[layer].view(np.uint16)[5, 3] ^= 1  # one bit of one element
    bad = gpu_check.reference_mismatches(cache, reference)
    assert list(bad) == [str(layer)] and bad[str(layer)]["elements"] == 1
    assert bad[str(layer)]["max_abs_diff"] > 0


def test_differing_files_names_a_changed_chunk_and_a_missing_one(cache_path, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(cache_path, a)
    shutil.copytree(cache_path, b)
    n_files, differ = gpu_check.differing_files(a, b)
    assert n_files > 10 and differ == []
    chunk = next(p for p in sorted((b / "resid").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 1
    chunk.write_bytes(bytes(data))
    (b / "tokens" / "zarr.json").unlink()
    assert gpu_check.differing_files(a, b) == (n_files, sorted([str(chunk.relative_to(b)),
                                                                "tokens/zarr.json"]))


def test_cuda_tests_section_reads_what_pytest_reports(tmp_path_factory, monkeypatch):
    # -k cuda matches the names of the test, its module and (newer pytest) its folders: the
    # stub's folder must not be named after this test, as tmp_path is
    tests = tmp_path_factory.mktemp("stub") / "test_stub.py"
    monkeypatch.setattr(gpu_check, "CUDA_TEST_FILES", (str(tests),))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # seconds saved; the stub needs none
    budget = gpu_check.Budget(120)
    tests.write_text("import pytest\n\ndef test_cuda_one():\n    pass\n\n"
                     "@pytest.mark.skip(reason='needs CUDA')\ndef test_cuda_two():\n    pass\n\n"
                     "def test_other():\n    pass\n")
    passed = gpu_check.cuda_tests(budget, "cuda")
    assert passed["status"] == "ok" and passed["summary"].startswith("1 passed, 1 skipped, 1 deselected")
    tests.write_text("import pytest\n\n@pytest.mark.skip(reason='needs CUDA')\ndef test_cuda_one():\n    pass\n")
    skipped = gpu_check.cuda_tests(budget, "cuda")
    assert skipped["status"] == "skipped" and "needs CUDA" in skipped["reason"]
    tests.write_text("def test_cuda_one():\n    assert False\n")
    failed = gpu_check.cuda_tests(budget, "cuda")
    assert failed["status"] == "fail" and failed["returncode"] == 1 and "1 failed" in failed["summary"]
    assert gpu_check.cuda_tests(budget, "cpu")["status"] == "skipped"
