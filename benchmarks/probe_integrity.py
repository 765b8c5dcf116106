"""Every integrity probe of issue 10, run as a real `saecache` process; prints a Markdown table.

    python benchmarks/probe_integrity.py [--workdir DIR] [--only SUBSTRING]

Builds the tiny GPT-NeoX (saecache.demo.tiny) and a small cache, then for each probe damages
a copy (a chunk flipped, truncated or deleted, an attribute edited, a model swapped, a second
writer started, a signal sent, a full or read-only tmpfs) and runs the command that would read
or write it. A probe passes when the command does what the issue asks: a refusal is a non-zero
exit with one line on stderr and no traceback (and nothing written where it says so); a
recovery (a stale lock, a resume) is exit 0. Probes that need a tmpfs mount are skipped unless
this runs as root on Linux. Nothing here is part of the test suite: tests/test_integrity.py,
test_locks.py, test_identity.py, test_space.py and test_train_integrity.py check the same cases
faster, mostly in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
SAECACHE = [sys.executable, "-m", "saecache"]
CTX, TOKENS, CHUNK_ROWS = 32, 8192, 256  # 32 blocks of 8 sequences
HARVEST = ["--ctx", str(CTX), "--tokens", str(TOKENS), "--chunk-rows", str(CHUNK_ROWS),
           "--batch-size", "8", "--device", "cpu", "--no-progress"]
def partial_args(model: Path) -> list:
    """A slow harvest: one sequence per block, one sequence per forward (128 blocks)."""
    return ["--model", model, "--dataset", W.text, "--ctx", CTX, "--tokens", 4096, "--chunk-rows",
            CTX, "--batch-size", 1, "--device", "cpu", "--no-progress"]


TRAIN = ["--layer", "1", "--expansion", "4", "--tokens", "4096", "--batch-size", "256",
         "--device", "cpu", "--no-progress"]


@dataclass
class Outcome:
    rc: int
    err: str

    @property
    def line(self) -> str:
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.err


@dataclass
class Probe:
    item: str
    name: str
    run: Callable[[Path], tuple[str, Outcome, bool]]
    """workspace → (command shown, outcome, extra check held)."""
    expect_ok: bool = False


class World:
    """The shared fixtures: a tiny model, its text, one complete cache, one trained run."""

    def __init__(self, root: Path):
        from saecache.demo.tiny import DEMO_TEXT, TinyModelConfig, build_tiny_model

        self.root = root
        self.model = build_tiny_model(root / "model", TinyModelConfig())
        self.text = root / "text.txt"
        self.text.write_text("\n\n".join([DEMO_TEXT.read_text().strip()] * 4))
        self.cache = root / "base.zarr"
        self.check(cli("harvest", self.cache, *self.harvest_args()), "harvest")
        self.runs = root / "base-runs"
        self.check(cli("train", self.cache, *TRAIN, "--out", self.runs), "train")
        self.run = next(p for p in self.runs.iterdir() if p.is_dir())

    def harvest_args(self, model: Path | None = None, text: Path | None = None) -> list:
        return ["--model", model or self.model, "--dataset", text or self.text, *HARVEST]

    @staticmethod
    def check(outcome: Outcome, what: str) -> None:
        if outcome.rc != 0:
            raise SystemExit(f"setting up the probes: {what} failed:\n{outcome.err}")

    def copy(self, ws: Path) -> Path:
        dest = ws / "cache.zarr"
        shutil.copytree(self.cache, dest)
        return dest

    def partial(self, ws: Path, blocks: int = 4, model: Path | None = None) -> Path:
        """A cache killed (SIGKILL) after ``blocks`` commits: one sequence per block."""
        cache = ws / "partial.zarr"
        proc = start("harvest", cache, *partial_args(model or self.model))
        committed = cache / "blocks" / "committed" / "c"
        wait_for(proc, lambda: committed.is_dir() and len(os.listdir(committed)) >= blocks)
        kill(proc, signal.SIGKILL)
        return cache


# ---- running saecache -------------------------------------------------------------------------


def cli(*args, timeout: float = 300, prefix: tuple = (), env: dict | None = None) -> Outcome:
    argv = [*prefix, *SAECACHE, *map(str, args)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or ENV)
    except subprocess.TimeoutExpired as err:
        return Outcome(-1, f"timed out after {timeout} s: {err.stderr}")
    return Outcome(done.returncode, done.stderr)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*SAECACHE, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return False


def kill(proc: subprocess.Popen, sig: int) -> Outcome:
    proc.send_signal(sig)
    _, err = proc.communicate()
    return Outcome(proc.returncode, err)


def finish(proc: subprocess.Popen) -> Outcome:
    _, err = proc.communicate()
    return Outcome(proc.returncode, err)


def shown(*args) -> str:
    return "saecache " + " ".join(Path(str(a)).name if "/" in str(a) else str(a) for a in args)


# ---- damaging a cache -------------------------------------------------------------------------


def chunk(cache: Path, array: str, block: int) -> Path:
    """The file of a block's chunk: ``c/7`` (1-D), ``c/7/0`` (2-D), ``c/7/0/0`` (3-D)."""
    path = cache / array / "c" / str(block)
    while path.is_dir():
        path = path / "0"
    return path


def flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_attrs(cache: Path, change: Callable[[dict], None]) -> None:
    """Edit the ``saecache`` attribute in the group's zarr.json as a user with an editor would."""
    meta_file = cache / "zarr.json"
    meta = json.loads(meta_file.read_text())
    change(meta["attributes"]["saecache"])
    meta_file.write_text(json.dumps(meta, indent=2))


def last_block(cache: Path) -> int:
    return len(os.listdir(cache / "blocks" / "committed" / "c")) - 1


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "saecache.lock"} if path.exists() else {}


# ---- the probes -------------------------------------------------------------------------------

PROBES: list[Probe] = []
W: World = None  # type: ignore[assignment]  # the shared fixtures, made in main()


def probe(item: str, name: str, expect_ok: bool = False):
    def register(fn):
        PROBES.append(Probe(item, name, fn, expect_ok))
        return fn
    return register


def verify_cmd(cache, ws):
    return ("verify", cache)


def info_cmd(cache, ws):
    return ("info", cache)


def train_cmd(cache, ws):
    return ("train", cache, *TRAIN, "--out", ws / "runs")


def eval_cmd(cache, ws):
    run = ws / "run"
    if not run.exists():
        shutil.copytree(W.run, run)
    return ("eval", run, "--cache", cache, "--device", "cpu")


def harvest_cmd(cache, ws):
    return ("harvest", cache, *W.harvest_args())


COMMANDS = {"verify": verify_cmd, "info": info_cmd, "train": train_cmd, "eval": eval_cmd,
            "harvest": harvest_cmd}


def damaged(item: str, name: str, damage: Callable[[Path], None], *commands: str,
            writes_nothing: bool = True) -> None:
    """One probe per command: a copy of the cache damaged, then the command run on it; the cache
    must stay as it is and (``writes_nothing``) no run folder may appear."""
    for command in commands:
        def run(ws: Path, damage=damage, command=command):
            cache = W.copy(ws)
            damage(cache)
            before = tree(cache)
            args = COMMANDS[command](cache, ws)
            outcome = cli(*args)
            runs = (ws / "runs").exists() and writes_nothing
            return shown(*args), outcome, tree(cache) == before and not runs
        PROBES.append(Probe(item, f"{name} → {command}", run))


HELD = -1  # the last block: always held out


def resid_chunk(block: int = HELD, layer: int = 1):
    return lambda c: chunk(c, f"resid/{layer:02d}", last_block(c) if block == HELD else block)


def tokens_chunk(block: int = HELD):
    return lambda c: chunk(c, "tokens", last_block(c) if block == HELD else block)


# 2. missing chunks read as zeros; 6. corrupt or truncated chunks
damaged("2", "held-out resid chunk deleted", lambda c: resid_chunk()(c).unlink(), "train", "verify")
damaged("2", "held-out tokens chunk deleted", lambda c: tokens_chunk()(c).unlink(), "eval", "verify")
damaged("6", "held-out resid chunk flipped", lambda c: flip(resid_chunk()(c)), "train", "verify")
damaged("6", "held-out resid chunk truncated", lambda c: truncate(resid_chunk()(c)), "train", "verify")
damaged("6", "training resid chunk flipped", lambda c: flip(resid_chunk(0)(c)), "train",
        writes_nothing=False)  # found when the reader reaches it, after the run has started
damaged("6", "held-out tokens chunk flipped", lambda c: flip(tokens_chunk()(c)), "eval")
damaged("6", "source chunk flipped", lambda c: flip(chunk(c, "source", 0)), "verify")
damaged("6", "blocks/stats chunk deleted", lambda c: chunk(c, "blocks/stats", 2).unlink(), "verify", "harvest")
damaged("6", "commit record chunk flipped", lambda c: flip(chunk(c, "blocks/committed", 2), 0),
        "verify", "info", "harvest")
damaged("4", "complete cache with an uncommitted block",
        lambda c: chunk(c, "blocks/committed", 2).unlink(), "verify", "harvest")
# 3. attributes; 7. crafted sizes
damaged("3", "mean_norm × 1.37", lambda c: edit_attrs(
    c, lambda m: m["stats"]["01"].update(mean_norm=m["stats"]["01"]["mean_norm"] * 1.37)),
    "verify", "train")
damaged("3", "n_seq + 1", lambda c: edit_attrs(c, lambda m: m["layout"].update(n_seq=m["layout"]["n_seq"] + 1)),
        "verify", "train")
damaged("7", "n_seq 1e13", lambda c: edit_attrs(c, lambda m: m["layout"].update(n_seq=10**13)),
        "info", "verify", "train")
damaged("7", "d 1e7", lambda c: edit_attrs(c, lambda m: m["layout"].update(d=10**7)), "info", "train")
damaged("7", "seqs_per_block 0", lambda c: edit_attrs(c, lambda m: m["layout"].update(seqs_per_block=0)),
        "info", "verify", "train")
damaged("6", "invalid group JSON", lambda c: (c / "zarr.json").write_text('{"zarr_format": 3, "node_'),
        "info", "verify", "train", "eval", "harvest")
damaged("6", "resid/01/zarr.json deleted", lambda c: (c / "resid" / "01" / "zarr.json").unlink(),
        "verify", "train")


# 2. a tokens chunk of an uncommitted block; 4. a model swapped under the same path
def _resume_after(damage: Callable[[Path], None]):
    def run(ws: Path):
        cache = W.partial(ws)
        damage(cache)
        args = ("harvest", cache, *partial_args(W.model))
        last = len(os.listdir(cache / "tokens" / "c")) - 1  # the damaged block's commit: never written
        outcome = cli(*args)
        return shown(*args), outcome, not (cache / "blocks" / "committed" / "c" / str(last)).exists()
    return run


def _last_uncommitted_tokens(cache: Path) -> Path:
    return chunk(cache, "tokens", len(os.listdir(cache / "tokens" / "c")) - 1)


probe("2", "tokens chunk of an uncommitted block deleted → harvest resume")(
    _resume_after(lambda c: _last_uncommitted_tokens(c).unlink()))
probe("6", "tokens chunk of an uncommitted block flipped → harvest resume")(
    _resume_after(lambda c: flip(_last_uncommitted_tokens(c))))


def _swap_model(ws: Path) -> Path:
    """A copy of the tiny model folder whose weights are another seed's."""
    from saecache.demo.tiny import TinyModelConfig, build_tiny_model

    model = ws / "model"
    shutil.copytree(W.model, model)
    other = build_tiny_model(ws / "other", TinyModelConfig(seed=1))
    for weights in other.glob("*.safetensors"):
        shutil.copy(weights, model / weights.name)
    return model


@probe("4", "model weights changed at the same path → harvest of a complete cache")
def _swap_complete(ws: Path):
    from saecache.demo.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(ws / "model", TinyModelConfig())
    cache = ws / "cache.zarr"
    W.check(cli("harvest", cache, *W.harvest_args(model)), "harvest")
    for weights in build_tiny_model(ws / "other", TinyModelConfig(seed=1)).glob("*.safetensors"):
        shutil.copy(weights, model / weights.name)
    before = tree(cache)
    args = ("harvest", cache, *W.harvest_args(model))
    return shown(*args), cli(*args), tree(cache) == before


@probe("4", "model weights changed at the same path → harvest resume of a partial cache")
def _swap_partial(ws: Path):
    from saecache.demo.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(ws / "model", TinyModelConfig())
    cache = W.partial(ws, model=model)
    for weights in build_tiny_model(ws / "other", TinyModelConfig(seed=1)).glob("*.safetensors"):
        shutil.copy(weights, model / weights.name)
    before = tree(cache)
    args = ("harvest", cache, *partial_args(model))
    return shown(*args), cli(*args), tree(cache) == before


@probe("4", "tokenizer merges changed, vocabulary the same → harvest of a complete cache")
def _swap_tokenizer(ws: Path):
    from saecache.demo.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(ws / "model", TinyModelConfig())
    cache = ws / "cache.zarr"
    W.check(cli("harvest", cache, *W.harvest_args(model)), "harvest")
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-40]  # same vocabulary, other tokens
    (model / "tokenizer.json").write_text(json.dumps(tok))
    before = tree(cache)
    args = ("harvest", cache, *W.harvest_args(model))
    return shown(*args), cli(*args), tree(cache) == before


@probe("4", "complete cache harvested again (same command)", expect_ok=True)
def _again(ws: Path):
    cache = W.copy(ws)
    before = tree(cache)
    args = ("harvest", cache, *W.harvest_args())
    outcome = cli(*args)
    return shown(*args), outcome, tree(cache) == before and "already complete" in outcome.err


# 5. hyper-parameters: refused before anything is written
for bad in (["--grad-clip", "nan"], ["--l1", "nan"], ["--l1", "inf"], ["--lr", "nan"], ["--lr", "-1"],
            ["--lr-warmup", "nan"], ["--seed", "-1"], ["--arch", "topk", "--k", "100000"],
            ["--arch", "batchtopk", "--k", "257"], ["--l1", "adaptive:nan"], ["--l1", "anthropic:inf"]):
    def run(ws: Path, bad=bad):
        args = ("train", W.cache, *TRAIN, "--out", ws / "runs", *bad)
        return shown(*args), cli(*args), not (ws / "runs").exists()
    PROBES.append(Probe("5", "train " + " ".join(bad), run))


# 1. one writer at a time
def _second_while(first_args: tuple, ready: Callable[[], bool], second_args: tuple, ws: Path,
                  check: Callable[[], bool] = lambda: True):
    """Start ``first_args``; once ``ready()``, run ``second_args``; then let the first finish."""
    first = start(*first_args)
    if not wait_for(first, ready):
        return shown(*second_args), Outcome(-1, "the first process finished before the probe: "
                                            + finish(first).err), False
    first.send_signal(signal.SIGSTOP)  # held where it is while the second one tries
    try:
        outcome = cli(*second_args)
    finally:
        first.send_signal(signal.SIGCONT)
    done = finish(first)
    return shown(*second_args), outcome, done.rc == 0 and check()


@probe("1", "second harvest while the first writes blocks")
def _two_harvests(ws: Path):
    cache = ws / "cache.zarr"
    args = ("harvest", cache, *partial_args(W.model))
    committed = cache / "blocks" / "committed" / "c"
    return _second_while(args, lambda: committed.is_dir() and len(os.listdir(committed)) >= 2, args, ws)


@probe("1", "second harvest while the first tokenises")
def _harvest_while_tokenising(ws: Path):
    cache = ws / "cache.zarr"
    big = ws / "big.txt"
    big.write_text("\n\n".join([W.text.read_text()] * 40))
    args = ("harvest", cache, "--model", W.model, "--dataset", big, *HARVEST[:-1], "--tokens", "200000",
            "--no-progress")
    args = tuple(a for a in args)
    tokens = cache / "tokens" / "zarr.json"
    return _second_while(args, lambda: tokens.exists() and not (cache / "blocks").exists(), args, ws)


@probe("1", "second train on the same --out")
def _two_trains(ws: Path):
    out = ws / "runs"
    slow = ("train", W.cache, "--layer", "1", "--expansion", "32", "--tokens", "7680", "--batch-size",
            "16", "--device", "cpu", "--no-progress", "--out", out)

    def no_duplicates() -> bool:
        lines = [json.loads(x) for f in out.rglob("metrics.jsonl") for x in f.read_text().splitlines()]
        keys = [(line["step"], line["split"]) for line in lines]
        return len(keys) == len(set(keys))
    return _second_while(slow, lambda: any(out.rglob("run.json")), slow, ws, no_duplicates)


@probe("1", "--overwrite while a train reads the cache")
def _overwrite_under_reader(ws: Path):
    cache = W.copy(ws)
    slow = ("train", cache, "--layer", "1", "--expansion", "32", "--tokens", "7680", "--batch-size",
            "16", "--device", "cpu", "--no-progress", "--out", ws / "runs")
    again = ("harvest", cache, *W.harvest_args(), "--overwrite")
    return _second_while(slow, lambda: any((ws / "runs").rglob("metrics.jsonl")), again, ws)


@probe("1", "harvest killed (kill -9), then the same command: its stale lock taken over", expect_ok=True)
def _stale_lock(ws: Path):
    cache = W.partial(ws)
    args = ("harvest", cache, *partial_args(W.model))
    outcome = cli(*args)
    return shown(*args), outcome, outcome.rc == 0


# 6. paths that are not what they should be
@probe("6", "CACHE is a regular file → info")
def _cache_is_file(ws: Path):
    path = ws / "cache.zarr"
    path.write_text("not a cache")
    return shown("info", path), cli("info", path), path.read_text() == "not a cache"


@probe("6", "CACHE is a regular file → harvest")
def _harvest_into_file(ws: Path):
    path = ws / "cache.zarr"
    path.write_text("not a cache")
    args = ("harvest", path, *W.harvest_args())
    return shown(*args), cli(*args), path.read_text() == "not a cache"


@probe("6", "train --out is a regular file")
def _out_is_file(ws: Path):
    out = ws / "runs"
    out.write_text("x")
    args = ("train", W.cache, *TRAIN, "--out", out)
    return shown(*args), cli(*args), out.read_text() == "x"


@probe("6", "harvest --overwrite on a symlinked CACHE")
def _overwrite_symlink(ws: Path):
    cache = W.copy(ws)
    link = ws / "link.zarr"
    link.symlink_to(cache)
    before = tree(cache)
    args = ("harvest", link, *W.harvest_args(), "--overwrite")
    return shown(*args), cli(*args), tree(cache) == before


def _small_model(ws: Path, **changes) -> Path:
    from saecache.demo.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(ws / "small", TinyModelConfig(**changes))


def _eval_with(name: str, **model: int) -> None:
    """eval of a copy of the trained run, spliced into a tiny model built with ``model``."""
    def run_probe(ws: Path):
        run = ws / "run"
        shutil.copytree(W.run, run)
        args = ("eval", run, "--model", _small_model(ws, **model), "--device", "cpu")
        return shown(*args), cli(*args), not (run / "eval.json").exists()
    PROBES.append(Probe("6", name, run_probe))


_eval_with("eval --model with fewer layers than the run's layer", n_layers=1)
_eval_with("eval --model with a smaller vocabulary than the cache's tokens", vocab_size=300)


# 8. signals, temporary files, full and read-only disks
TIMING = {"tokens_per_s", "data_wait_fraction", "bytes_read"}  # measurements of timing (docs/train-integrity.md)
SLOW_TRAIN = ["--layer", "1", "--expansion", "4", "--tokens", "7680", "--batch-size", "32",
              "--checkpoint-every", "1024", "--log-every", "5", "--device", "cpu", "--no-progress"]


def same_run(a: Path, b: Path) -> bool:
    """Two run folders trained the same: equal snapshots, equal metrics apart from timing."""
    import torch

    for snap in sorted(a.glob("*.pt")):
        x, y = (torch.load(p, weights_only=True) for p in (snap, b / snap.name))
        if any(not torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor)):
            return False

    def lines(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
                for x in (run / "metrics.jsonl").read_text().splitlines()]
    return lines(a) == lines(b)


@probe("8", "SIGTERM during train, then the same command: identical run")
def _sigterm_train(ws: Path):
    clean = ws / "clean"
    W.check(cli("train", W.cache, *SLOW_TRAIN, "--out", clean), "train")
    out = ws / "runs"
    proc = start("train", W.cache, *SLOW_TRAIN, "--out", out)
    wait_for(proc, lambda: any(out.rglob("checkpoints/step*.pt")))
    outcome = kill(proc, signal.SIGTERM)
    again = cli("train", W.cache, *SLOW_TRAIN, "--out", out)
    run = next(p for p in out.iterdir() if p.is_dir())
    ok = again.rc == 0 and same_run(run, clean / run.name)
    return shown("train", "CACHE", *SLOW_TRAIN, "--out", "runs"), outcome, ok


@probe("8", "temporary files of a killed run → removed by the same command", expect_ok=True)
def _temporaries(ws: Path):
    out = ws / "runs"
    shutil.copytree(W.runs, out)
    run = next(p for p in out.iterdir() if p.is_dir())
    (run / "checkpoints").mkdir(exist_ok=True)
    planted = [run / ".sae_layer01_final.pt.k3j4h5x9", run / "checkpoints" / ".step000000016.pt.a1b2c3d4"]
    for path in planted:
        path.write_bytes(b"\0" * 1000)
    args = ("train", W.cache, *TRAIN, "--out", out)
    outcome = cli(*args)
    return shown(*args), outcome, not any(p.exists() for p in planted)


class Tmpfs:
    """A small tmpfs mounted at ``path`` (root on Linux only), unmounted on exit."""

    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path, self.size, self.ro = path, size, read_only

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        options = f"size={self.size}" + (",ro" if self.ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], check=True)
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", str(self.path)], check=False)


def can_mount() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("mount") is not None


@probe("8", "disk full during train (tmpfs), then the same command elsewhere: identical run")
def _train_disk_full(ws: Path):
    with Tmpfs(ws / "small", "300k") as small:
        out = small / "runs"
        args = ("train", W.cache, *TRAIN, "--checkpoint-every", "1024", "--out", out)
        outcome = cli(*args)
        shutil.copytree(out, ws / "runs")
    again = cli("train", W.cache, *TRAIN, "--checkpoint-every", "1024", "--out", ws / "runs")
    run = next(p for p in (ws / "runs").iterdir() if p.is_dir())
    return shown(*args), outcome, again.rc == 0 and same_run(run, W.run)


@probe("8", "disk full during harvest --no-space-check (tmpfs), then resumed elsewhere: identical cache")
def _harvest_disk_full(ws: Path):
    with Tmpfs(ws / "small", "1m") as small:
        cache = small / "cache.zarr"
        args = ("harvest", cache, *W.harvest_args(), "--no-space-check")
        outcome = cli(*args)
        shutil.copytree(cache, ws / "cache.zarr")
    again = cli("harvest", ws / "cache.zarr", *W.harvest_args(), "--no-space-check")
    return shown(*args), outcome, again.rc == 0 and tree(ws / "cache.zarr") == tree(W.cache)


@probe("8", "harvest into a read-only filesystem")
def _harvest_read_only(ws: Path):
    with Tmpfs(ws / "ro", "1m", read_only=True) as ro:
        args = ("harvest", ro / "cache.zarr", *W.harvest_args())
        return shown(*args), cli(*args), not any(ro.iterdir())


@probe("8", "train --out on a read-only filesystem")
def _train_read_only(ws: Path):
    with Tmpfs(ws / "ro", "1m", read_only=True) as ro:
        args = ("train", W.cache, *TRAIN, "--out", ro / "runs")
        return shown(*args), cli(*args), not any(ro.iterdir())


@probe("8", "harvest larger than the free space (tmpfs of 1 MiB)")
def _space_tmpfs(ws: Path):
    with Tmpfs(ws / "small", "1m") as small:
        args = ("harvest", small / "cache.zarr", *W.harvest_args())
        return shown(*args), cli(*args), not any(small.iterdir())


@probe("8", "harvest --tokens 300M of the tiny model (115 GB) on this machine's disk")
def _space_disk(ws: Path):
    args = ("harvest", ws / "cache.zarr", *W.harvest_args(), "--tokens", "300M")
    free = shutil.disk_usage(ws).free
    if free > 300e6 * 64 * 2 * 3:
        return shown(*args), Outcome(-2, f"skipped: {free / 1e9:.0f} GB free here"), True
    return shown(*args), cli(*args, timeout=120), not (ws / "cache.zarr").exists()


MOUNTS = {"disk full during train", "disk full during harvest", "read-only", "(tmpfs of 1 MiB)"}


# ---- main -------------------------------------------------------------------------------------


def _verdict(p: Probe, outcome: Outcome, extra: bool) -> str:
    if outcome.rc == -2:
        return "skipped"
    one_line = outcome.rc != 0 and not outcome.traceback and outcome.line.startswith("saecache: ")
    good = (outcome.rc == 0 if p.expect_ok else one_line) and extra
    return "pass" if good else "FAIL"


def main() -> None:
    global W
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", default=None, help="Run the probes whose name holds this text.")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="saecache-probes-"))
    W = World(root)
    print("| item | probe | command | exit | what the user sees | verdict |")
    print("| --- | --- | --- | --- | --- | --- |")
    failed = 0
    for i, p in enumerate(PROBES):
        if args.only and args.only not in p.name:
            continue
        ws = root / f"p{i:02d}"
        ws.mkdir()
        if any(m in p.name for m in MOUNTS) and not can_mount():
            command, outcome, extra = "", Outcome(-2, "skipped: needs root to mount a tmpfs"), True
        else:
            command, outcome, extra = p.run(ws)
        verdict = _verdict(p, outcome, extra)
        failed += verdict == "FAIL"
        line = outcome.line.replace("|", "\\|").replace(str(root), "…")
        print(f"| {p.item} | {p.name} | `{command}` | {outcome.rc} | {line} | {verdict} |", flush=True)
    print(f"\n{failed} failed of {len(PROBES)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
