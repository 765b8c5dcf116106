"""One run on a GPU machine: is the CUDA path correct, and how close does it come to its limits?

    python benchmarks/gpu_check.py --out gpu_check.json          # an H100/H200, ≤ 6 minutes
    python benchmarks/gpu_check.py --device cpu --quick          # tiny shapes: the script itself
    python benchmarks/gpu_check.py --quick                       # the same on the GPU: a first try

Writes one JSON (--out) and prints a short table. Sections, in this order, each skipped with
its reason when the time budget (--budget, 330 s) cannot hold its estimate, each recording its
status (ok / fail / error / skipped), its seconds and its peak GPU memory:

  harvest_identity  a random-weight GPT-NeoX (bench_harvest's "mid": d 512, 8 blocks, fp16,
                    ctx 512, 64 sequences) harvested with --buffers 1 and --buffers 3: every
                    file byte-identical, and every layer bitwise equal to a plain synchronous
                    hook loop (forward, .to(float16).cpu()) read back through zarr
  cuda_tests        pytest on the CUDA tests (-k cuda) of tests/test_reader.py, tests/test_cuda.py
                    and the fast-path test files, in a subprocess
  sync_debug        one SAETrainer step of every architecture × precision under
                    torch.cuda.set_sync_debug_mode("error") after one warm-up step (AuxK live:
                    dead_window is one batch)
  train             train() on a synthetic one-layer cache vs bench_train's limit (the step on a
                    batch already on the device) for 1 and 3 sister SAEs (d 1024, F 32768, batch
                    4096) in fp32, tf32 and bf16; data-wait fraction; peak memory
  harvest_ram       harvest of the pythia-410m shape (d 1024, 24 layers, fp16, random weights),
  harvest_disk      ctx 2048, every layer, ≤ 256K tokens, into /dev/shm and into --disk-dir, vs
                    min(forward-only, raw sequential write of the same bytes to the same folder)
  harvest_stats     (between the two) storage.stats.sequence_sums on a (8, 2048, 1024) fp16
                    batch × 24 layers, as a share of one batch's forward-only time

Time on an H200, estimated from the shapes (the budget checks use these, × 2 for safety):
pythia-410m fp16 forward 2·0.3G·256K ≈ 1.6e14 FLOP ≈ 1 s; its residuals 256K·24·1024·2 B =
12.9 GB, written twice per folder (harvest, raw) at ≥ 3 GB/s to RAM (≈ 9 s) and at the disk's
measured speed (a 1 GiB probe first; the disk section's tokens shrink to fit what is left);
an SAE step 6·4096·1024·32768 ≈ 0.8 TFLOP ≈ 4–8 ms in tf32/bf16, 15–30 ms in fp32, so the six
training rows (156 loop + 53 limit steps × 1 or 3 SAEs, + snapshots) ≈ 60 s after ≈ 15 s of
making the 40-chunk cache; model builds and loads ≈ 20 s; pytest ≈ 30 s. About 3 minutes in
all; the budget (from the process start) stops at 330 s whatever happens (a watchdog writes the
JSON and exits 3 if a section overruns it by 20 s).

Exit status: 0 when no check failed and no section raised, 1 otherwise, 3 on the watchdog.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

START = time.perf_counter()  # the budget counts the imports and CUDA's start-up too
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: fail at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import zarr  # noqa: E402

# raw_write: plain sequential writes of chunk-sized files (to be replaced by bench_writer's raw
# write, the best plain writes can do, once that exists: the limit must be the fairest one)
from bench_harvest import SHAPES, build_model, forward_only, make_text, raw_write, run_harvest, sync  # noqa: E402
from bench_train import SISTERS, from_cache, limit  # noqa: E402
from synthetic_cache import LAYER, make_cache  # noqa: E402

from saecache.core.errors import first_line  # noqa: E402
from saecache.core.lock import LOCK_NAME  # noqa: E402
from saecache.harvest.config import HarvestConfig  # noqa: E402
from saecache.harvest.corpus import DatasetSpec  # noqa: E402
from saecache.harvest.loop import harvest, units_of  # noqa: E402
from saecache.demo.tiny import TinyModelConfig  # noqa: E402
from saecache.harvest.models import block_output, load_model  # noqa: E402
from saecache.sae.archs import ARCHS  # noqa: E402
from saecache.storage import stats  # noqa: E402
from saecache.storage.cache import Cache  # noqa: E402
from saecache.train.config import PRECISIONS, ReaderConfig, TrainConfig  # noqa: E402
from saecache.train.reader import Plan  # noqa: E402
from saecache.train.trainer import SAETrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("harvest_identity", "cuda_tests", "sync_debug", "train", "harvest_ram", "harvest_stats",
            "harvest_disk")
TARGETS = {"harvest": 0.90, "train": 0.95}
"""The issue's targets: harvest ≥ 0.90 × its limit; training ≥ 0.95 × the step (tf32, bf16)."""
CUDA_TEST_FILES = ("tests/test_reader.py", "tests/test_cuda.py", "tests/test_train_fastpath.py",
                   "tests/test_harvest_fastpath.py")
WATCHDOG_GRACE_S = 20


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of every section: the issue's on a GPU, tiny ones for --quick."""

    identity_model: str = "mid"
    identity_ctx: int = 512
    identity_seqs: int = 64
    identity_chunk_rows: int = 4096  # 8 sequences per block: 8 blocks
    ratio_model: str = "pythia-410m"
    ratio_ctx: int = 2048
    ratio_tokens: int = 256 * 1024
    ratio_chunk_rows: int = 16384
    harvest_batch: int = 8
    sync_d: int = 256
    sync_expansion: int = 16
    sync_batch: int = 1024
    sync_k: int = 32
    train_d: int = 1024
    train_expansion: int = 32
    train_batch: int = 4096
    train_blocks: int = 40  # 39 training chunks of 16384 rows: 156 batches of 4096
    train_chunk_rows: int = 16384
    train_mix_chunks: int = 8
    train_rows: tuple[tuple[str, int], ...] = tuple((p, n) for p in PRECISIONS for n in (1, 3))
    """(precision, sister SAEs) of each training row."""
    train_max_steps: int = 0  # 0: the whole pass over the training rows
    limit_steps: int = 50
    forward_flops: float = 150e12  # fp16 FLOP/s a 410m forward reaches, conservatively
    sae_flops: float = 100e12  # tf32/bf16 SAE step FLOP/s, conservatively (fp32 ÷ 4 below)
    write_bytes_s: float = 3e9  # to /dev/shm


QUICK = Shapes(identity_model="tiny", identity_ctx=32, identity_seqs=16, identity_chunk_rows=128,
               ratio_model="tiny", ratio_ctx=32, ratio_tokens=512, ratio_chunk_rows=128,
               harvest_batch=4, sync_d=32, sync_expansion=4, sync_batch=64, sync_k=8, train_d=32,
               train_expansion=4, train_batch=64, train_blocks=4, train_chunk_rows=256,
               train_mix_chunks=2, train_rows=(("fp32", 1), ("bf16", 3)), train_max_steps=4,
               limit_steps=2, forward_flops=2e9, sae_flops=2e9, write_bytes_s=2e8)
"""--quick: tiny shapes that run everything on two busy CPU cores in under a minute; the figures
are only the script's own check."""


# ----------------------------------------------------------------------------- the report


class Report:
    """The JSON being built: every section's record, written at the end or by the watchdog."""

    def __init__(self, path: Path, args):
        self.path, self.lock, self.running = path, threading.Lock(), None
        self.data = {"machine": machine(args.device), "args": vars(args), "targets": TARGETS,
                     "sections": {name: {"status": "skipped", "reason": "not reached"}
                                  for name in SECTIONS}}

    def set(self, name: str, record: dict) -> None:
        with self.lock:
            self.data["sections"][name] = record

    def write(self, elapsed: float) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(elapsed, 1)
            self.data["ok"] = all(s["status"] in ("ok", "skipped")
                                  for s in self.data["sections"].values())
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def machine(device: str) -> dict:
    """What the figures were measured on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
           "transformers": transformers.__version__, "device": device, "cpus": os.cpu_count(),
           "host": platform.node()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return out


class Budget:
    """The whole run's time: a section starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float, start: float | None = None):
        self.start, self.seconds = time.perf_counter() if start is None else start, seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed

    def refusal(self, estimate: float) -> str | None:
        """Why a piece estimated at ``estimate`` s may not start (None: it may)."""
        if estimate > self.left:
            return f"budget: needs ~{estimate:.0f} s, {max(self.left, 0):.0f} s of {self.seconds:.0f} s left"
        return None


def run_section(report: Report, budget: Budget, name: str, estimate: float, body, device: str) -> None:
    """Run ``body() -> dict`` as section ``name`` unless the budget refuses; record its status,
    seconds, peak GPU memory, and an exception's first line and traceback."""
    reason = budget.refusal(estimate)
    if reason:
        report.set(name, {"status": "skipped", "reason": reason, "estimate_s": round(estimate, 1)})
        return
    report.running = name
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        record = body()
    except Exception as err:  # one section's failure must not cost the others their figures
        record = {"status": "error", "reason": what(err),
                  "traceback": traceback.format_exc()[-3000:]}
    record.update(seconds=round(time.perf_counter() - start, 1), estimate_s=round(estimate, 1))
    if "peak_gpu_bytes" not in record:  # train resets it per row and gives the rows' maximum
        record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    report.set(name, record)
    report.running = None


def what(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


# ----------------------------------------------------------------------------- (a) correctness


def harvest_identity(shapes: Shapes, work: Path, device: str) -> dict:
    """Harvest one model with --buffers 1 and 3: identical files, and equal to the hook loop."""
    model = build_model(shapes.identity_model, work / "models")
    tokens = shapes.identity_seqs * shapes.identity_ctx
    text = make_text(_folder(work / "identity-text"), tokens)
    caches = {}
    for buffers in (1, 3):
        caches[buffers] = work / f"identity-buffers{buffers}" / "cache.zarr"
        harvest(HarvestConfig(cache=str(caches[buffers]), model=str(model),
                              dataset=DatasetSpec(str(text)), tokens=tokens, ctx=shapes.identity_ctx,
                              batch_size=shapes.harvest_batch, device=device, dtype="float16",
                              chunk_rows=shapes.identity_chunk_rows, buffers=buffers, progress=False))
    n_files, differ = differing_files(caches[1], caches[3])
    cache = Cache.open(str(caches[3]))
    mismatched = reference_mismatches(cache, hook_reference(cache, model, device, shapes.harvest_batch))
    ok = not differ and not mismatched
    lay = cache.layout
    return {"status": "ok" if ok else "fail", "files": n_files, "differing_files": differ[:20],
            "layers": len(lay.layers), "rows": lay.n_seq * lay.ctx, "d": lay.d,
            "reference_mismatches": mismatched,
            "line": f"{n_files} files, buffers 1 vs 3: {len(differ)} differ; hook reference: "
                    f"{len(lay.layers) - len(mismatched)}/{len(lay.layers)} layers bitwise equal "
                    f"({lay.n_seq * lay.ctx:,} rows × d {lay.d})"}


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def differing_files(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files in either tree, relative names of those not byte-identical or in one tree only);
    the lock file, which names its last holder, aside."""
    def files(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    fa, fb = files(a), files(b)
    names = sorted(fa.keys() | fb.keys())
    return len(names), [n for n in names if n not in fa or n not in fb
                        or fa[n].read_bytes() != fb[n].read_bytes()]


@torch.no_grad()
def hook_reference(cache: Cache, model_path: Path, device: str, batch_size: int) -> dict[int, np.ndarray]:
    """Each stored layer's residuals the plain way: the batches the harvest forwards (its units
    of blocks, cut into batch_size sequences), a forward hook per block that copies the output
    to the host synchronously. {layer: (n_seq · ctx, d) float16}."""
    model = load_model(str(model_path), None, "float16", device)
    blocks, lay = model.get_submodule(cache.provenance.blocks), cache.layout
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in lay.layers}

    def keep(layer: int):
        def hook(module, args, output):
            h = block_output(output).to(torch.float16).cpu()  # (B, T, d), synchronous
            parts[layer].append(h.reshape(-1, lay.d).numpy())
        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in lay.layers]
    try:
        for unit in units_of(lay, list(range(lay.n_blocks)), batch_size):
            seqs = range(lay.block_seqs(unit[0]).start, lay.block_seqs(unit[-1]).stop)
            ids = torch.from_numpy(cache.tokens[seqs.start:seqs.stop]).to(device).long()  # (S, T)
            for start in range(0, len(seqs), batch_size):
                model.base_model(input_ids=ids[start:start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: np.concatenate(p) for layer, p in parts.items()}


def reference_mismatches(cache: Cache, reference: dict[int, np.ndarray]) -> dict[str, dict]:
    """{layer: what differs} for each layer whose stored bits differ from ``reference``."""
    bad = {}
    for layer, want in reference.items():
        got = cache.resid(layer)[:]  # zarr: (n_seq · ctx, d) float16
        if got.shape != want.shape:
            bad[str(layer)] = {"shape": list(got.shape), "reference_shape": list(want.shape)}
        elif not np.array_equal(got.view(np.uint16), want.view(np.uint16)):  # bits, NaN included
            diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
            bad[str(layer)] = {"elements": int((got.view(np.uint16) != want.view(np.uint16)).sum()),
                               "max_abs_diff": float(np.nanmax(diff))}
    return bad


def cuda_tests(budget: Budget, device: str) -> dict:
    """pytest -k cuda on the CUDA tests, in a subprocess importing this checkout."""
    if torch.device(device).type != "cuda":
        return {"status": "skipped", "reason": f"--device {device}: the CUDA tests would only skip"}
    files = [f for f in CUDA_TEST_FILES if (REPO / f).exists()]
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    # the tests whose own name says cuda: `-k cuda` would also match a folder named cuda-…
    listed = subprocess.run([*pytest, "--collect-only", *files], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=max(10.0, budget.left - 5))
    names = sorted({line.rsplit("::", 1)[1].split("[")[0] for line in listed.stdout.splitlines()
                    if "::" in line and "cuda" in line.rsplit("::", 1)[1]})
    proc = subprocess.run([*pytest, "-rs", "-k", " or ".join(names) or "cuda", *files], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=max(10.0, budget.left - 5))
    lines = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()
    summary = lines[-1].strip("= ")
    status = ("ok" if "passed" in summary and "failed" not in summary else "skipped") \
        if proc.returncode == 0 else "fail"
    record = {"status": status, "returncode": proc.returncode, "files": files, "summary": summary,
              "output_tail": (proc.stdout + proc.stderr)[-2000:], "line": summary}
    if status == "skipped":
        record["reason"] = next((l for l in lines if l.startswith("SKIPPED")), summary)
    return record


def sync_debug(shapes: Shapes, work: Path, device: str) -> dict:
    """One step of every architecture in every precision; on CUDA under sync debug "error"."""
    cuda = torch.device(device).type == "cuda"
    x = torch.randn(shapes.sync_batch, shapes.sync_d, device=device)  # (B, d) on the device
    steps = {f"{name}/{precision}": _checked_step(shapes, work, device, name, precision, x)
             for name in ARCHS for precision in PRECISIONS}
    failed = {k: v for k, v in steps.items() if v != "ok"}
    checked = "" if cuda else " (no CUDA: ran, syncs not checked)"
    return {"status": "fail" if failed else "ok", "syncs_checked": cuda, "steps": steps,
            **({"reason": f"{len(failed)} step(s) synchronised: {next(iter(failed.items()))}"} if failed else {}),
            "line": f"{len(steps) - len(failed)}/{len(steps)} steps without a hidden sync{checked}"}


def _checked_step(shapes: Shapes, work: Path, device: str, name: str, precision: str, x) -> str:
    """"ok", or the first line of the error a hidden sync raised in the step after a warm-up one
    (Adam's state is created lazily in the first)."""
    arch, d = ARCHS[name], shapes.sync_d
    k = () if arch.penalised else (shapes.sync_k,)  # penalised archs take --l1, the others --k
    cfg = TrainConfig(cache="unused", out=str(work), layers=(0,), arch=name, k=k,
                      expansion=shapes.sync_expansion, tokens=4 * shapes.sync_batch, snapshots=(),
                      device=device, precision=precision, dead_window=shapes.sync_batch,
                      reader=ReaderConfig(batch_size=shapes.sync_batch))  # AuxK live at step 1
    trainer = SAETrainer(cfg.run_specs(0, d)[0], cfg, d)
    trainer.step(x, 0)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(x, 1)
    except RuntimeError as err:
        return f"error: {first_line(err)}"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    return "ok"


# ----------------------------------------------------------------------------- (b) ratios


def training(shapes: Shapes, work: Path, device: str, budget: Budget) -> dict:
    """train() from a synthetic cache vs bench_train's limit, per precision, for 1 and 3 SAEs."""
    cuda = torch.device(device).type == "cuda"
    cache = make_cache(work / "train.zarr", shapes.train_blocks, shapes.train_chunk_rows,
                       shapes.train_d, ctx=min(2048, shapes.train_chunk_rows))
    bench = argparse.Namespace(d=shapes.train_d, expansion=shapes.train_expansion,
                               batch_size=shapes.train_batch, device=device,
                               reader_threads=ReaderConfig().threads, mix_chunks=shapes.train_mix_chunks)
    reader = ReaderConfig(batch_size=shapes.train_batch, mix_chunks=shapes.train_mix_chunks)
    steps = Plan(cache.layout, LAYER, reader).n_batches  # one pass over the training rows
    steps = min(steps, shapes.train_max_steps or steps)
    rows = []
    for precision, runs in shapes.train_rows:
        reason = budget.refusal(train_estimate(shapes, precision, runs, steps))
        if reason:
            rows.append({"precision": precision, "runs": runs, "status": "skipped", "reason": reason})
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows.append(train_row(cache, bench, precision, SISTERS[:runs], steps, shapes.limit_steps))
        rows[-1]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    measured = [r for r in rows if r["status"] == "ok"]
    return {"status": "ok" if measured else "skipped", "steps": steps, "rows": rows,
            **({} if measured else {"reason": rows[0]["reason"]}),
            "peak_gpu_bytes": max((r["peak_gpu_bytes"] or 0 for r in measured), default=None) if cuda else None,
            "line": "\n".join(train_line(r) for r in rows)}


def train_row(cache, bench, precision: str, l1: tuple[str, ...], steps: int, limit_steps: int) -> dict:
    tok_s, whole_tok_s, wait, nbytes = from_cache(cache, bench, precision, l1, steps)
    # the loop first: train() sets the matmul precision, so a limit that sets none of its own
    # runs under the same; the flag is recorded, as the limit left it, to show which it was
    lim = limit(cache, bench, precision, l1, min(steps, limit_steps))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    target = TARGETS["train"] if precision in ("tf32", "bf16") else None
    return {"precision": precision, "runs": len(l1), "status": "ok", "limit_tok_s": lim,
            "train_tok_s": tok_s, "whole_tok_s": whole_tok_s, "ratio": tok_s / lim, "target": target,
            "meets_target": None if target is None else tok_s / lim >= target,
            "data_wait_fraction": wait, "bytes_read": nbytes, "limit_allow_tf32": tf32}


def train_estimate(shapes: Shapes, precision: str, runs: int, steps: int) -> float:
    """Seconds for one row: the loop's and the limit's steps, the final snapshot + checkpoint."""
    n_features = shapes.train_d * shapes.train_expansion
    flops = 6 * shapes.train_batch * shapes.train_d * n_features * runs  # one step of every run
    rate = shapes.sae_flops / (4 if precision == "fp32" else 1)
    saved = runs * 5 * n_features * shapes.train_d * 4  # weights, snapshot, Adam moments
    # + opening the runs, the held-out read, the reader's pinned buffers and threads
    return 2 * (flops * (steps + shapes.limit_steps + 3) / rate + saved / shapes.write_bytes_s) + 3 + runs


def train_line(r: dict) -> str:
    name = f"{r['precision']} × {r['runs']} SAE{'s' if r['runs'] > 1 else ''}"
    if r["status"] != "ok":
        return f"{name}: skipped ({r['reason']})"
    target = f" (target ≥ {r['target']:.2f})" if r["target"] else ""
    return (f"{name}: loop/limit {r['ratio']:.2f}{target}, {r['train_tok_s']:,.0f} vs "
            f"{r['limit_tok_s']:,.0f} tok/s, data wait {r['data_wait_fraction']:.3f}, "
            f"peak {gib(r.get('peak_gpu_bytes'))}")


def gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


class HarvestRatio:
    """Harvest vs min(forward-only, raw write) of the pythia-410m shape, per target folder;
    the model, its text and the forward-only figure are made once for both folders."""

    def __init__(self, shapes: Shapes, work: Path, device: str, writer_threads: int):
        self.shapes, self.work, self.device, self.threads = shapes, work, device, writer_threads
        self.model = self.text = self.forward = None

    @property
    def dims(self) -> tuple[int, int]:
        """(layers, d) of the model shape (all its layers are harvested)."""
        shape = SHAPES[self.shapes.ratio_model]
        if shape is None:
            return TinyModelConfig.n_layers, TinyModelConfig.d_model
        return shape["num_hidden_layers"], shape["hidden_size"]

    @property
    def bytes_per_token(self) -> int:
        layers, d = self.dims
        return layers * d * 2

    @property
    def chunk_bytes(self) -> int:
        s = self.shapes
        return max(1, s.ratio_chunk_rows // s.ratio_ctx) * s.ratio_ctx * self.dims[1] * 2

    def prepare(self) -> None:
        if self.forward is None:  # set last: a failure here is retried by the next section
            s = self.shapes
            self.model = build_model(s.ratio_model, self.work / "models")
            self.text = make_text(_folder(self.work / "ratio-text"), s.ratio_tokens)
            n_batches = max(2, s.ratio_tokens // (s.harvest_batch * s.ratio_ctx))
            self.forward = forward_only(self.model, s.ratio_ctx, s.harvest_batch, n_batches,
                                        self.device, "float16")

    def estimate(self, tokens: int, write_bytes_s: float) -> float:
        """Seconds for a folder, × 2: building and loading (the first time), the forward-only
        and the harvest's forward (2 · 12·L·d² FLOP a token), the harvest's and the raw writes."""
        layers, d = self.dims
        build = 0 if self.model is not None else 5 + 20 * layers * d * d * 12 / 1e9  # ~2 s per 100M
        forward = 2 * 12 * layers * d * d * tokens / self.shapes.forward_flops
        return build + 2 * (2 * forward + 2 * tokens * self.bytes_per_token / write_bytes_s) + 5

    def measure(self, folder: Path, tokens: int) -> dict:
        s = self.shapes
        args = argparse.Namespace(tokens=tokens, ctx=s.ratio_ctx, batch_size=s.harvest_batch,
                                  device=self.device, dtype="float16", chunk_rows=s.ratio_chunk_rows,
                                  writer_threads=self.threads)
        tok_s, bytes_s, per_token, chunk_bytes, written = run_harvest(self.model, self.text, folder, args)
        raw = raw_write(folder, chunk_bytes, written)
        lim = min(self.forward, raw / per_token)
        ratio = tok_s / lim
        bound = "forward" if self.forward <= raw / per_token else "write"
        return {"status": "ok", "dir": str(folder), "tokens": tokens, "bytes_written": written,
                "forward_tok_s": self.forward, "raw_write_bytes_s": raw, "harvest_tok_s": tok_s,
                "harvest_bytes_s": bytes_s, "limit_tok_s": lim, "bound": bound, "ratio": ratio,
                "target": TARGETS["harvest"], "meets_target": ratio >= TARGETS["harvest"],
                "line": f"harvest/limit {ratio:.2f} (target ≥ {TARGETS['harvest']:.2f}, {bound}-bound): "
                        f"{tok_s:,.0f} tok/s vs forward {self.forward:,.0f}, raw write "
                        f"{raw / 1e9:.2f} GB/s = {raw / per_token:,.0f} tok/s; {tokens:,} tokens"}


def harvest_ram(ratio: HarvestRatio, ram: Path | None) -> dict:
    if ram is None:
        return {"status": "skipped", "reason": "no writable /dev/shm with room for the check on this machine"}
    ratio.prepare()
    tokens = fitting_tokens(ratio, ram, ratio.shapes.ratio_tokens)
    if tokens == 0:
        return {"status": "skipped", "reason": f"{ram} has {shutil.disk_usage(ram).free / 2**30:.1f} "
                                               "GiB free, too little for one batch"}
    return ratio.measure(ram, tokens)


def harvest_stats(ratio: HarvestRatio, device: str, reps: int = 10) -> dict:
    """What the per-sequence statistics cost the forward: storage.stats.sequence_sums on one
    batch of a block's output, once per stored layer, against one batch's forward-only time."""
    ratio.prepare()
    s, (layers, d) = ratio.shapes, ratio.dims
    h = torch.randn(s.harvest_batch, s.ratio_ctx, d, device=device).half()  # (B, T, d) a block's output
    stats.sequence_sums(h)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        stats.sequence_sums(h)
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    forward = s.harvest_batch * s.ratio_ctx / ratio.forward  # s per batch
    share = layers * seconds / forward
    return {"status": "ok", "seconds_per_call": seconds, "calls_per_batch": layers,
            "forward_batch_s": forward, "share_of_forward": share,
            "line": f"statistics {share:.1%} of the forward's time: {layers} × {seconds * 1e3:.2f} ms "
                    f"per ({s.harvest_batch}, {s.ratio_ctx}, {d}) fp16 batch vs {forward * 1e3:.1f} ms"}


def harvest_disk(ratio: HarvestRatio, disk: Path, budget: Budget) -> dict:
    """Into --disk-dir, with as many tokens (≤ the RAM section's) as its measured raw write
    speed lets harvest + raw write finish in the time left."""
    ratio.prepare()
    s, per_token = ratio.shapes, ratio.bytes_per_token
    probe = raw_write(disk, ratio.chunk_bytes, min(2**30, 32 * ratio.chunk_bytes))  # bytes/s
    affordable = int(max(budget.left - 15, 0) / 2 / (2 * per_token / probe + 1 / ratio.forward))
    tokens = fitting_tokens(ratio, disk, min(s.ratio_tokens, affordable))
    if tokens == 0:
        return {"status": "skipped", "probe_write_bytes_s": probe,
                "reason": f"budget: raw write to {disk} runs at {probe / 1e9:.2f} GB/s, too slow for "
                          f"one batch in the {budget.left:.0f} s left"}
    return {**ratio.measure(disk, tokens), "probe_write_bytes_s": probe}


def fitting_tokens(ratio: HarvestRatio, folder: Path, tokens: int) -> int:
    """``tokens`` cut to whole batches of sequences, and to 80% of the folder's free space."""
    s = ratio.shapes
    free = shutil.disk_usage(folder).free * 0.8 / ratio.bytes_per_token
    batch_tokens = s.harvest_batch * s.ratio_ctx
    return int(min(tokens, free) // batch_tokens * batch_tokens)


# ----------------------------------------------------------------------------- the run


def table(report: Report) -> str:
    """The short table: a line per section (and per training row)."""
    lines = [f"{'section':<17} {'status':<8} result"]
    for name, record in report.data["sections"].items():
        text = record.get("line") if record["status"] in ("ok", "fail") else record.get("reason")
        first, *more = str(text or record.get("reason", "")).splitlines() or [""]
        lines.append(f"{name:<17} {record['status']:<8} {first}")
        lines += [f"{'':<26} {line}" for line in more]
    return "\n".join(lines)


def start_watchdog(report: Report, budget: Budget, cleanup, grace: float = WATCHDOG_GRACE_S,
                   exit=os._exit) -> threading.Timer:
    """Past the budget by ``grace`` s: record the running section as stopped, write the JSON,
    print the table and exit 3 (a hung or slow section still leaves every figure)."""
    def fire():
        if report.running:
            report.set(report.running, {"status": "error", "reason": (
                f"still running at {budget.elapsed:.0f} s, past the {budget.seconds:.0f} s budget: "
                "stopped by the watchdog")})
        report.write(budget.elapsed)
        print(table(report), flush=True)
        cleanup()
        exit(3)

    timer = threading.Timer(max(0.0, budget.left) + grace, fire)  # a spent budget still skips in time
    timer.daemon = True
    timer.start()
    return timer


def run_all(args, report: Report, budget: Budget, work: Path, ram: Path | None, disk: Path) -> None:
    s, device = QUICK if args.quick else Shapes(), args.device
    run_section(report, budget, "harvest_identity", 20 if not args.quick else 5,
                lambda: harvest_identity(s, work, device), device)
    run_section(report, budget, "cuda_tests", 45, lambda: cuda_tests(budget, device), device)
    run_section(report, budget, "sync_debug", 2 * len(ARCHS) * len(PRECISIONS) * 0.5 + 2,
                lambda: sync_debug(s, work, device), device)
    train_bytes = s.train_blocks * s.train_chunk_rows * s.train_d * 2
    run_section(report, budget, "train", 2 * train_bytes / 1e8 + train_estimate(s, "bf16", 1, 10),
                lambda: training(s, work, device, budget), device)
    ratio = HarvestRatio(s, work, device, args.writer_threads)
    run_section(report, budget, "harvest_ram", ratio.estimate(s.ratio_tokens, s.write_bytes_s),
                lambda: harvest_ram(ratio, ram), device)
    run_section(report, budget, "harvest_stats", ratio.estimate(0, s.write_bytes_s),
                lambda: harvest_stats(ratio, device), device)
    run_section(report, budget, "harvest_disk", ratio.estimate(s.harvest_batch * s.ratio_ctx, 2e8),
                lambda: harvest_disk(ratio, disk, budget), device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run")
    parser.add_argument("--disk-dir", help="local-disk folder [default: a temporary one here]")
    parser.add_argument("--writer-threads", type=int,
                        default=HarvestConfig.__dataclass_fields__["writer_threads"].default,
                        help="harvest writer threads [default: HarvestConfig's]")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; "
                     "check the script itself with --device cpu --quick")
    if not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: folder {Path(args.out).resolve().parent} does not exist")
    if args.disk_dir is not None and not Path(args.disk_dir).is_dir():
        parser.error(f"--disk-dir {args.disk_dir} is not a folder: give an existing local-disk folder")
    return args


def ram_folder(quick: bool) -> Path | None:
    """/dev/shm when it is there, writable and holds the models and small caches (≥ 8 GiB
    free, 0.2 for --quick), else None (the system's temporary folder is used instead)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    return shm if shutil.disk_usage(shm).free >= (0.2 if quick else 8) * 2**30 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget, START)
    report = Report(Path(args.out), args)
    ram = ram_folder(args.quick)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=ram))  # models, small caches, runs
    disk = Path(tempfile.mkdtemp(prefix="gpu_check-disk-", dir=args.disk_dir or os.getcwd()))
    tempfile.tempdir = str(work)  # bench_train's run folders go to RAM too

    def cleanup():
        for folder in (work, disk):
            shutil.rmtree(folder, ignore_errors=True)

    watchdog = start_watchdog(report, budget, cleanup)
    try:
        run_all(args, report, budget, work, ram, disk)
    finally:
        watchdog.cancel()
        cleanup()
        report.write(budget.elapsed)
    print(table(report))
    print(f"{args.out}: {budget.elapsed:.0f} s on {report.data['machine'].get('gpu', args.device)}")
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
