"""Train-side integrity (issue 10 C): bad values refused before anything is written, SIGTERM
handled like Ctrl-C, a resumed run's metrics identical to an uninterrupted run's, temporaries
of a killed run removed, and a full or read-only disk as one line, never a traceback."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import saecache.core.atomic as atomic
import saecache.train.sister as sister
from saecache.cli import cli
from saecache.demo.tiny import DEMO_TEXT, TinyModelConfig, build_tiny_model
from saecache.sae.metrics import FiringStats, RunningMetrics
from saecache.storage.cache import Cache
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.reader import heldout_seqs
from saecache.train.runfolder import RunFolder
from saecache.train.trainer import SAETrainer
from tests.conftest import tree_digest
from tests.test_cli import assert_one_line_error
from tests.test_resume import commits

WORKTREE = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(WORKTREE)}
RUNS = ("layer01-relu-x4-l1-0.0003", "layer01-relu-x4-adaptive-l0-32")
# 117 steps of 256 tokens; a checkpoint every 3 steps, a metrics line every 25 steps (and at the
# 10K snapshot, step 40): most checkpoints fall between two metrics lines.
TRAIN = ["--layer", "1", "--expansion", "4", "--l1", "3e-4", "--l1", "adaptive:32", "--tokens", "30K",
         "--snapshots", "10K", "--batch-size", "256", "--lr", "1e-3", "--checkpoint-every", "768",
         "--log-every", "25", "--device", "cpu", "--reader-threads", "2", "--mix-chunks", "4",
         "--dead-window", "10K", "--no-progress"]
TIMING = ("tokens_per_s", "data_wait_fraction", "bytes_read")  # measurements, not results
"""Fields of a metrics line that cannot repeat: wall-clock, and the reader's byte count (its
threads read ahead, as fast as they can)."""


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def train_args(cache, out, *extra) -> list[str]:
    return ["train", str(cache), "--out", str(out), *TRAIN, *extra]


def train_command(cache, out) -> list[str]:
    return [sys.executable, "-m", "saecache", *train_args(cache, out)]


def results(out: Path) -> dict:
    """Every run's snapshot tensors, and its metrics lines without the timing fields."""
    found = {}
    for name in RUNS:
        run = RunFolder(out / name)
        tensors = {s.path.name: {k: v for k, v in torch.load(s.path, weights_only=True).items()
                                 if isinstance(v, torch.Tensor)} for s in run.snapshots()}
        lines = [{k: v for k, v in line.items() if k not in TIMING} for line in run.metrics_lines()]
        found[name] = (tensors, lines)
    return found


def assert_same_results(out: Path, whole: Path) -> None:
    got, expected = results(out), results(whole)
    for name in RUNS:
        (tensors, lines), (want_tensors, want_lines) = got[name], expected[name]
        assert sorted(tensors) == sorted(want_tensors), name
        for snap, weights in want_tensors.items():
            for key, value in weights.items():
                assert torch.equal(tensors[snap][key], value), (name, snap, key)
        assert lines == want_lines, name


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.is_file())


@pytest.fixture(scope="module")
def uninterrupted(train_cache, tmp_path_factory) -> Path:
    whole = tmp_path_factory.mktemp("whole") / "runs"
    result = run_cli(*train_args(train_cache, whole))
    assert result.exit_code == 0, result.output
    return whole


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """True once ``ready()`` holds while ``proc`` runs; False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.005)
    return False


def checkpoint_reached(out: Path, step: int):
    folder = out / RUNS[0] / "checkpoints"
    return lambda: folder.is_dir() and any(s >= step for s in RunFolder(out / RUNS[0]).checkpoint_steps())


# ---- 1. every bad value refused before anything is written ---------------------------------

TRAIN_PROBES = [
    (["--arch", "topk", "--k", "100000"], 1, ["--k 100000 is more than the SAE's 256 features"]),
    (["--arch", "batchtopk", "--k", "8", "--k", "257"], 1, ["--k 257 is more than", "256"]),
    (["--l1", "adaptive:nan"], 2, ["--l1 'adaptive:nan'"]),
    (["--l1", "adaptive:0"], 2, ["--l1 'adaptive:0'"]),
    (["--l1", "adaptive:-3"], 2, ["--l1 'adaptive:-3'"]),
    (["--l1", "adaptive:10:inf"], 2, ["--l1 'adaptive:10:inf'"]),
    (["--l1", "anthropic:inf"], 2, ["--l1 'anthropic:inf' is not a finite coefficient"]),
    (["--l1", "nan"], 2, ["--l1 'nan'"]),
    (["--expansion", "0"], 2, ["--expansion", "0 is not in the range x>=1"]),
    (["--expansion", "100000000000"], 1, ["SAE(s) of F = 6,400,000,000,000 features", "lower --expansion"]),
    (["--expansion", str(10**30)], 1, ["need", "GiB with their optimiser state", "lower --expansion"]),
    (["--mix-chunks", str(10**12)], 1, ["--mix-chunks 1000000000000 needs", "lower --mix-chunks"]),
    (["--arch", "topk", "--k", "8", "--aux-k", "0"], 2, ["--aux-k", "x>=1"]),
    (["--aux-coeff", "nan"], 2, ["--aux-coeff must be a finite number"]),
    (["--dead-window", "0"], 2, ["--dead-window must be at least 1, not 0"]),
    (["--heldout-rows", "0"], 2, ["--heldout-rows", "x>=1"]),
    (["--reader-threads", "0"], 2, ["--reader-threads", "x>=1"]),
    (["--mix-chunks", "0"], 2, ["--mix-chunks", "x>=1"]),
    (["--checkpoint-every", "0"], 2, ["--checkpoint-every must be at least 1, not 0"]),
    (["--log-every", "0"], 2, ["--log-every", "x>=1"]),
    (["--snapshots", "0"], 2, ["--snapshots must be at least 1, not 0"]),
    (["--snapshots", "nan"], 2, ["--snapshots", "'nan' is not a count"]),
    (["--snapshots", "9K"], 2, ["--snapshots 9K is not below --tokens 8K"]),
    (["--lr", "inf"], 2, ["--lr must be a finite number, not inf"]),
    (["--lr", "nan"], 2, ["--lr must be a finite number, not nan"]),
    (["--lr-warmup", "nan"], 2, ["--lr-warmup must be a finite number"]),
    (["--grad-clip", "-1"], 2, ["--grad-clip", "x>0"]),
    (["--l1-warmup", "2"], 2, ["--l1-warmup", "0<=x<=1"]),
    (["--tokens", "1e400"], 2, ["--tokens", "'1e400' is not a count"]),
    (["--tokens", "10M"], 1, ["--tokens 10M is more than"]),
    (["--batch-size", "0"], 2, ["--batch-size", "x>=1"]),
    (["--seed", str(10**24)], 2, ["--seed", "0<=x<=4294967295"]),
]


PROBE_CASES = [(*probe, False) for probe in TRAIN_PROBES] + [
    (*probe, True) for probe in TRAIN_PROBES if probe[1] == 1]  # refused after opening the cache


@pytest.mark.parametrize("args, code, needles, existing", PROBE_CASES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_train_value_is_one_line_and_writes_nothing(train_cache, tmp_path, args, code, needles, existing):
    """existing: --out holds a folder already, which must stay byte-identical."""
    out = tmp_path / "runs"
    if existing:
        (out / "keep").mkdir(parents=True)
        (out / "keep" / "file.txt").write_text("untouched")
        before = tree_digest(out)
    result = run_cli("train", train_cache, "--out", out, "--layer", 1, "--tokens", "8K", "--batch-size",
                     256, "--expansion", 4, "--device", "cpu", "--no-progress", *args)
    assert_one_line_error(result, *needles)
    assert result.exit_code == code
    if existing:
        assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == ["keep"]
    else:
        assert not out.exists()


OTHER_PROBES = [
    ("harvest", ["--ctx", "0"], ["--ctx", "x>=1"]),
    ("harvest", ["--tokens", "1e400"], ["--tokens", "'1e400' is not a count"]),
    ("harvest", ["--tokens", "0"], ["--tokens must be at least 1, not 0"]),
    ("harvest", ["--chunk-rows", "0"], ["--chunk-rows", "x>=1"]),
    ("harvest", ["--batch-size", "0"], ["--batch-size", "x>=1"]),
    ("harvest", ["--writer-threads", "0"], ["--writer-threads", "x>=1"]),
    ("import", ["--ctx", "0"], ["--ctx", "x>=1"]),
    ("import", ["--chunk-rows", "0"], ["--chunk-rows", "x>=1"]),
    ("eval", ["--max-seqs", "0"], ["--max-seqs", "x>=1"]),
    ("eval", ["--batch-size", "0"], ["--batch-size", "x>=1"]),
    ("report", ["--cutoff", "nan"], ["--cutoff must be a finite number"]),
    ("report", ["--skip", "2"], ["--skip", "0<=x<=1"]),
]


@pytest.mark.parametrize("command, args, needles", OTHER_PROBES)
def test_a_bad_value_of_another_command_is_one_line_and_writes_nothing(tmp_path, tiny_model, command, args,
                                                                        needles):
    out = tmp_path / "out"
    full = {"harvest": ["harvest", out, "--model", tiny_model, "--dataset", DEMO_TEXT, "--device", "cpu"],
            "import": ["import", tmp_path / "acts.npy", out, "--ctx", 8],
            "eval": ["eval", out, "--device", "cpu"],
            "report": ["report", tmp_path, "--out", out]}[command]
    result = run_cli(*full, *args)
    assert_one_line_error(result, *needles)
    assert result.exit_code == 2 and not out.exists()


# ---- 4. temporaries of a killed run ----------------------------------------------------------


def test_resuming_removes_the_temporaries_of_a_killed_run_and_nothing_else(train_cache, uninterrupted, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(uninterrupted, out)
    run = out / RUNS[0]
    planted = [run / ".sae_layer01_100K.pt.a1b2c3d4", run / ".sae_layer01_final.pt.zz_9yx87",
               run / ".run.json.k3j4h5g6", run / ".metrics.jsonl.qwertyui", run / ".eval.json.abcdefgh",
               run / "checkpoints" / ".step000000099.pt.mnbvcxzl"]
    kept = [run / ".notes.txt.a1b2c3d4", run / ".sae_layer01_final.pt", run / "sae_layer01_final.pt.a1b2c3d4",
            run / "checkpoints" / ".step99.pt.abcdefgh", run / "checkpoints" / "notes.txt",
            run / ".run.json.short", out / ".run.json.a1b2c3d4"]
    for path in planted + kept:
        path.write_bytes(b"left by kill -9")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p not in planted}
    result = run_cli(*train_args(train_cache, out))  # finished already: only opens the runs
    assert result.exit_code == 0, result.output
    assert [p for p in planted if p.exists()] == []
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_remove_temporaries_names_what_it_removed(tmp_path):
    folder = RunFolder(tmp_path / "run")
    (folder.checkpoints).mkdir(parents=True)
    mine = folder.checkpoints / ".step000000003.pt.0123abcd"
    mine.write_bytes(b"x")
    (folder.dir / "sae_layer01_final.pt").write_bytes(b"y")
    assert folder.remove_temporaries() == [mine]
    assert (folder.dir / "sae_layer01_final.pt").exists()
    assert RunFolder(tmp_path / "missing").remove_temporaries() == []


def test_a_write_that_fails_leaves_no_temporary(tmp_path):
    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        atomic.atomic_write(tmp_path / "x.pt", fail)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


class Interrupted(FullDisk):
    """A file whose ``after``-th write is interrupted, as a SIGTERM handler raising inside it."""

    def __init__(self, f, after: int):
        super().__init__(f, 1 << 40)
        self.left = after

    def write(self, data) -> int:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return super().write(data)


@pytest.mark.parametrize("wrap, raised", [(lambda f: FullDisk(f, 1000), OSError),
                                          (lambda f: Interrupted(f, 3), KeyboardInterrupt)],
                         ids=["full disk", "signal"])
def test_what_torch_save_makes_a_runtime_error_of_is_raised_as_itself(tmp_path, monkeypatch, wrap, raised):
    """A full disk, or SIGTERM's handler raising inside a write (exit 143, not a traceback):
    torch's zip writer turns either into "unexpected pos"; atomic_write raises the cause,
    an OSError naming the file, and leaves no temporary."""
    real_fdopen = os.fdopen
    with monkeypatch.context() as patch:
        patch.setattr(atomic.os, "fdopen", lambda fd, mode: wrap(real_fdopen(fd, mode)))
        with pytest.raises(RuntimeError):  # what torch makes of it by itself
            with open(tmp_path / "plain.pt", "wb") as f:
                torch.save({"w": torch.zeros(4096)}, wrap(f))
        with pytest.raises(raised) as err:
            atomic.atomic_write(tmp_path / "w.pt", lambda f: torch.save({"w": torch.zeros(4096)}, f))
    if raised is OSError:
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "w.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt"]  # no temporary left


# ---- 3. the metrics window in the checkpoint -------------------------------------------------


def test_a_dead_window_beyond_int64_counts_nothing_dead():
    firing = FiringStats(4)
    firing.update(torch.zeros(8, 4))
    assert not firing.dead_mask(10**22).any() and firing.dead_mask(8).all()


def test_an_sae_too_large_for_memory_is_one_line_and_writes_nothing(train_cache, tmp_path, monkeypatch):
    """Where the estimate lets it through, the allocator's own failure is caught too."""
    import saecache.train.loop as loop

    monkeypatch.setattr(loop, "_memory", lambda device: None)
    out = tmp_path / "runs"
    result = run_cli(*train_args(train_cache, out, "--expansion", 10**11))
    assert_one_line_error(result, "does not fit in cpu memory", "lower --expansion")
    assert not out.exists()


def test_running_metrics_resumed_from_their_state_sum_as_if_never_stopped():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen),
                torch.relu(torch.randn(16, 32, generator=gen))) for _ in range(4)]
    whole, first = RunningMetrics(), RunningMetrics()
    for batch in batches:
        whole.update(*batch)
    for batch in batches[:2]:
        first.update(*batch)
    state = torch.load(_saved(first.state_dict()), weights_only=True)
    resumed = RunningMetrics()
    resumed.load_state_dict(state)
    for batch in batches[2:]:
        resumed.update(*batch)
    assert resumed.summary() == whole.summary()
    fresh = RunningMetrics()
    fresh.load_state_dict(RunningMetrics().state_dict())  # an empty window round-trips too
    assert fresh.tokens == 0


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_trainer_resumed_between_two_lines_writes_the_uninterrupted_line():
    cfg = TrainConfig(cache="c", layers=(0,), expansion=2, tokens=64 * 16, device="cpu", progress=False,
                      l1=("adaptive:4",), reader=ReaderConfig(batch_size=64))
    spec, gen = cfg.run_specs(0, d=8)[0], torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 8, generator=gen) for _ in range(6)]
    whole, first = SAETrainer(spec, cfg, d=8), SAETrainer(spec, cfg, d=8)
    for step, x in enumerate(xs):
        whole.step(x, step)
    for step, x in enumerate(xs[:4]):
        first.step(x, step)
    resumed = SAETrainer(spec, cfg, d=8)
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=True))
    for step, x in enumerate(xs[4:], start=4):
        resumed.step(x, step)
    assert resumed.metrics_line(5, {}) == whole.metrics_line(5, {})


# ---- 2, 3. SIGTERM and kill -9, then the same command ----------------------------------------


def test_sigterm_then_kill_9_between_metrics_lines_then_rerun_equals_an_uninterrupted_run(
        train_cache, uninterrupted, tmp_path):
    """SIGTERM: the resume hint, exit 143, no temporary left. kill -9 after a checkpoint that
    falls between two metrics lines: the rerun's lines are the uninterrupted run's."""
    out = tmp_path / "runs"
    proc = subprocess.Popen(train_command(train_cache, out), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(proc, checkpoint_reached(out, 9)), "training ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["saecache: interrupted; re-run the same command to resume"]
    assert not (out / RUNS[0] / "sae_layer01_final.pt").exists() and leftovers(out) == []
    killed = RunFolder(out / RUNS[0]).checkpoint_steps()[-1] + 12
    proc = subprocess.Popen(train_command(train_cache, out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_for(proc, checkpoint_reached(out, killed)), "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = min(RunFolder(out / name).checkpoint_steps()[-1] for name in RUNS)
    assert resumed % 25 and resumed != 40, f"resumes at step {resumed}: on a metrics line"
    rerun = run_cli(*train_args(train_cache, out))  # the same command, in this process (faster)
    assert rerun.exit_code == 0, rerun.output
    assert_same_results(out, uninterrupted)
    for name in RUNS:  # bytes_read goes on from the checkpoint: it never falls
        counts = [line["bytes_read"] for line in RunFolder(out / name).metrics_lines() if "bytes_read" in line]
        assert counts == sorted(counts) and counts[0] > 0


@pytest.mark.parametrize("how, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_a_command_is_the_resume_hint_and_the_handler_is_put_back(monkeypatch, tmp_path,
                                                                                    how, code):
    import saecache.report.report as report

    cleaned = []

    def interrupted(*args, **kwargs):
        try:
            os.kill(os.getpid(), getattr(signal, how))
            time.sleep(30)  # the handler interrupts this
        finally:
            cleaned.append(True)

    monkeypatch.setattr(report, "write_report", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    result = run_cli("report", tmp_path, "--out", tmp_path / "r")
    assert result.exit_code == code and time.monotonic() - started < 20
    assert result.output.strip().splitlines() == ["saecache: interrupted; re-run the same command to resume"]
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) is before


HARVEST = ["--dataset", str(DEMO_TEXT), "--tokens", "2048", "--ctx", "32", "--chunk-rows", "32",
           "--batch-size", "1", "--device", "cpu", "--writer-threads", "2", "--no-progress"]


def test_sigterm_stops_a_harvest_cleanly_and_the_rerun_finishes_it_identically(tiny_model, tmp_path):
    whole, cache = tmp_path / "whole.zarr", tmp_path / "cache.zarr"
    assert run_cli("harvest", whole, "--model", tiny_model, *HARVEST).exit_code == 0
    command = [sys.executable, "-m", "saecache", "harvest", str(cache), "--model", str(tiny_model), *HARVEST]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(proc, lambda: commits(cache) >= 4), "the harvest ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["saecache: interrupted; re-run the same command to resume"]
    assert list(cache.rglob("*.partial")) == []  # the writer's threads finished or removed theirs
    rerun = run_cli("harvest", cache, "--model", tiny_model, *HARVEST)  # the same command, in-process
    assert rerun.exit_code == 0, rerun.output
    assert tree_digest(cache) == tree_digest(whole)


# ---- 5. a full disk, a read-only one, a file where a folder goes ----------------------------

WRITES = {  # which of a run's writes fails: (the temporary's prefix or the log, the file named)
    "snapshot": (".sae_layer01_10K.pt.", "sae_layer01_10K.pt"),
    "checkpoint": (".step000000030.pt.", "checkpoints/step000000030.pt"),
    "run.json": (".run.json.", "run.json"), "metrics.jsonl": ("metrics.jsonl", "metrics.jsonl")}


def fail_writes(monkeypatch, target: str, code: int) -> None:
    """Make the first write of ``target`` fail with errno ``code`` (as the disk would)."""
    real_mkstemp, real_open = atomic.tempfile.mkstemp, open

    def mkstemp(*args, prefix="", **kwargs):
        if prefix == target:
            raise OSError(code, os.strerror(code))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    def open_(path, mode="r", *args, **kwargs):
        if Path(path).name == target and "a" in mode:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(sister, "open", open_, raising=False)


NO_SPACE = (errno.ENOSPC, ["no space left writing", "free space and re-run the same command to resume"])
READ_ONLY = (errno.EROFS, ["cannot write", "Read-only file system", "make it writable"])
NO_PERMISSION = (errno.EACCES, ["cannot write", "Permission denied", "make it writable"])


@pytest.mark.parametrize("which, error", [(which, NO_SPACE) for which in sorted(WRITES)]
                         + [("checkpoint", READ_ONLY), ("run.json", NO_PERMISSION)])
def test_a_failed_write_is_one_line_and_the_rerun_equals_an_uninterrupted_run(
        train_cache, uninterrupted, tmp_path, monkeypatch, which, error):
    out, (target, named), (code, needles) = tmp_path / "runs", WRITES[which], error
    with monkeypatch.context() as patch:
        fail_writes(patch, target, code)
        result = run_cli(*train_args(train_cache, out))
    assert_one_line_error(result, *needles, named, "is intact up to its last checkpoint")
    assert not out.exists() or leftovers(out) == []
    result = run_cli(*train_args(train_cache, out))
    assert result.exit_code == 0, result.output
    assert_same_results(out, uninterrupted)


def unshare_tmpfs(script: str, mount: Path) -> subprocess.CompletedProcess:
    """``script`` run by sh in a new mount namespace with ``$M`` a fresh tmpfs at ``mount``."""
    mount.mkdir()
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env={**ENV, "M": str(mount)},
                          capture_output=True, text=True, timeout=300)


def tmpfs_or_skip(tmp_path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = unshare_tmpfs('mount -t tmpfs -o size=64k tmpfs "$M"', tmp_path / "probe")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")


def shell_train(cache) -> str:
    """The train command for sh, its --out "$M/runs" (the tmpfs)."""
    return shlex.join(train_command(cache, "RUNS_ON_TMPFS")).replace("RUNS_ON_TMPFS", '"$M/runs"')


def test_a_real_full_disk_is_one_line_and_the_rerun_after_freeing_space_equals_an_uninterrupted_run(
        train_cache, uninterrupted, tmp_path):
    tmpfs_or_skip(tmp_path)
    # 1.5 MB: run.json, metrics and the first checkpoints fit (2 runs × 2 × 0.4 MB), not much more.
    # Then the runs move to a disk with space (a tmpfs lives only in its namespace).
    script = (f'mount -t tmpfs -o size=1500k tmpfs "$M" && {{ {shell_train(train_cache)}; echo "rc=$?"; '
              f'ls -A "$M/runs"/*/checkpoints; cp -r "$M/runs" "{tmp_path}/runs"; }}')
    done = unshare_tmpfs(script, tmp_path / "disk")
    err = done.stderr.strip().splitlines()
    assert "rc=1" in done.stdout.splitlines(), (done.stdout, err)
    assert len(err) == 1 and err[0].startswith("saecache: error: no space left writing "), err
    assert "free space and re-run the same command to resume" in err[0]
    assert ".pt." not in done.stdout  # no temporary left in checkpoints/
    assert leftovers(tmp_path / "runs") == []
    result = run_cli(*train_args(train_cache, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert_same_results(tmp_path / "runs", uninterrupted)


def test_a_real_read_only_disk_is_one_line_and_writes_nothing(train_cache, tmp_path):
    tmpfs_or_skip(tmp_path)
    script = (f'mount -t tmpfs -o size=1m tmpfs "$M" && mkdir "$M/runs" && mount -o remount,ro "$M" && '
              f'{{ {shell_train(train_cache)}; echo "rc=$?"; ls -A "$M/runs"; }}')
    done = unshare_tmpfs(script, tmp_path / "disk")
    err = done.stderr.strip().splitlines()
    assert done.stdout.strip() == "rc=1", done.stdout  # and the read-only folder stays empty
    assert len(err) == 1 and err[0].startswith("saecache: error: cannot write "), err
    assert "Read-only file system" in err[0] and "make it writable" in err[0]


def test_the_cli_net_turns_a_disk_error_into_one_line(monkeypatch, tmp_path):
    import saecache.report.report as report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "index.html"))

    monkeypatch.setattr(report, "write_report", full)
    result = run_cli("report", tmp_path, "--out", tmp_path / "r")
    assert_one_line_error(result, "no space left writing", "index.html", "free space")


@pytest.mark.parametrize("command", ["train", "report", "export", "demo"])
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_a_file_is_one_line(command, where, train_cache, uninterrupted, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "sub"
    args = {"train": train_args(train_cache, out),
            "report": ["report", uninterrupted, "--out", out],
            "export": ["export", uninterrupted / RUNS[0], "--format", "pt", "--out", out],
            "demo": ["demo", "--out", out, "--device", "cpu"]}[command]
    result = run_cli(*args)
    assert_one_line_error(result, str(out) if where == "file" else str(blocker), "is a file")
    assert blocker.read_text() == "not a folder"


# ---- eval with a model that cannot take the run ----------------------------------------------


def largest_heldout_token(cache) -> int:
    layout = Cache.open(str(cache)).layout
    return int(Cache.open(str(cache)).tokens[heldout_seqs(layout).start:].max())


@pytest.mark.parametrize("smaller", ["layers", "vocabulary"])
def test_eval_with_a_model_too_small_for_the_run_is_one_line(train_cache, uninterrupted, tmp_path, smaller):
    largest = largest_heldout_token(train_cache)
    shape, needles = {"layers": (TinyModelConfig(n_layers=1), ["of layer 1", "has 1 block:"]),
                      "vocabulary": (TinyModelConfig(vocab_size=largest),
                                     [f"go up to id {largest}", f"vocabulary of {largest}"])}[smaller]
    model = build_tiny_model(tmp_path / "small", shape)
    before = tree_digest(uninterrupted)
    result = run_cli("eval", uninterrupted / RUNS[0], "--model", model, "--device", "cpu", "--max-seqs", 4)
    assert_one_line_error(result, *needles)
    assert tree_digest(uninterrupted) == before
