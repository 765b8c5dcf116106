"""SAE quality at matched L0: saecache against SAELens, sparsify and dictionary-learning.

Every trainer sees the identical batch stream: saecache's own reader order
(saecache.train.reader.PlainReader; saecache's training loop reads the same batches bitwise
with its PrefetchReader, checked here by hash), the same batch size, inputs scaled to
E‖x‖ = √d with the cache's statistics, the same F. Each peer trains with its own model,
loss, optimiser and defaults for the architecture (quality_peers.py); saecache trains through
its public API (TrainConfig, train) and is read back from its final snapshot.

For each data set (ground-truth synthetic features, and layer 1 of the demo's tiny trained
GPT-NeoX), each architecture (saecache's ARCHS, plus those only peers have) and each target
L0 (16, 32, d/2): TopK-style trainers are given k; trainers with their own L0 target are given
it; L1-style coefficients are found by a short search (probe runs at a fraction of the
length, then a few full-length runs aimed by log-log interpolation; the run nearest each
target is kept and the L0 it reached reported). Held-out rows
(the cache's last blocks) give the pooled FVU Σ‖x−x̂‖²/Σ‖x−x̄‖², L0, dead % (never fires on
held-out), and on ground truth the mean max cosine of the true directions to the decoder rows
(MMCS) and the fraction of true features recovered at cosine > 0.9.

    python benchmarks/bench_quality.py --quick          # ~5 min on 2 CPU cores
    python benchmarks/bench_quality.py                  # the docs/quality.md run
    python benchmarks/bench_quality.py --peers none --data ground_truth --archs topk
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import quality_data  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from quality_peers import PEERS, Peer, Setup, Sparsity, Trained  # noqa: E402

import saecache  # noqa: E402
from saecache.sae.archs import ARCHS  # noqa: E402
from saecache.sae.model import SAE  # noqa: E402
from saecache.train.config import ReaderConfig, TrainConfig  # noqa: E402
from saecache.train.reader import PlainReader, PrefetchReader  # noqa: E402

BEGIN, END = "<!-- bench_quality: begin -->", "<!-- bench_quality: end -->"
RECOVERED_COSINE = 0.9
EVAL_ROWS = 8192  # rows per forward pass when evaluating
PROBE_EVAL_ROWS = 16384  # held-out rows a search probe is measured on
MAX_STEP = math.log(20.0)  # a probe never moves a coefficient by more than 20× at once
MAX_FULL_STEP = math.log(4.0)  # nor a full-length run by more than 4× beyond the others


# ----------------------------------------------------------------------------- metrics


def pooled_fvu(x: Tensor, x_hat: Tensor) -> float:
    """Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖², x̄ the mean of all rows (float64)."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def max_cosines(true_dirs: Tensor, decoder: Tensor) -> Tensor:
    """(n_true,): each true direction's largest cosine with any decoder row (F, d)."""
    t = torch.nn.functional.normalize(true_dirs.double(), dim=1)
    w = torch.nn.functional.normalize(decoder.double(), dim=1)
    return (t @ w.T).max(dim=1).values


def mmcs(true_dirs: Tensor, decoder: Tensor) -> float:
    """Mean over the true directions of the max cosine to the learnt decoder rows."""
    return float(max_cosines(true_dirs, decoder).mean())


def recovered_fraction(true_dirs: Tensor, decoder: Tensor, threshold: float = RECOVERED_COSINE) -> float:
    """Fraction of true directions with some decoder row at cosine > threshold."""
    return float((max_cosines(true_dirs, decoder) > threshold).double().mean())


@torch.no_grad()
def evaluate(model: Trained, x: Tensor, directions: np.ndarray | None = None) -> dict:
    """Held-out metrics of a trained SAE on x (N, d), already scaled."""
    sq_err = torch.zeros((), dtype=torch.float64)
    nonzero, fired = 0, None
    for part in x.split(EVAL_ROWS):
        x_hat, acts = model.forward(part)
        sq_err += (part.double() - x_hat.double()).pow(2).sum()
        active = acts != 0
        nonzero += int(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
    xd = x.double()
    out = {"fvu": float(sq_err / (xd - xd.mean(0)).pow(2).sum()), "l0": nonzero / x.shape[0],
           "dead": float(1 - fired.double().mean())}
    if directions is not None:
        true = torch.from_numpy(np.asarray(directions))
        out["mmcs"] = mmcs(true, model.decoder.cpu())
        out["recovered"] = recovered_fraction(true, model.decoder.cpu())
    return out


# ----------------------------------------------------------------------------- the batch stream


@dataclass
class Bench:
    """One data set's fixed training setup: what every trainer gets."""

    data: quality_data.DataSet
    setup: Setup
    reader: ReaderConfig
    steps: int
    scale: float
    workdir: Path
    heldout: Tensor = field(init=False)
    """(H, d) float32 held-out rows, scaled like the training batches."""

    def __post_init__(self):
        self.heldout = self.data.heldout.float() * self.scale

    def batches(self, steps: int | None = None) -> Iterator[Tensor]:
        """The first ``steps`` training batches, float32, scaled: saecache's reader order."""
        steps = self.steps if steps is None else steps
        with PlainReader(self.data.cache, self.data.layer, self.reader) as reader:
            for i, batch in enumerate(reader.iter()):
                if i == steps:
                    return
                yield batch.float() * self.scale  # (B, d), as saecache's loop scales it

    def stream_hash(self, reader_cls=PlainReader) -> str:
        """sha256 of the fp16 bytes of the first ``steps`` batches as ``reader_cls`` yields them."""
        digest = hashlib.sha256()
        kwargs = {"device": "cpu"} if reader_cls is PrefetchReader else {}
        with reader_cls(self.data.cache, self.data.layer, self.reader, **kwargs) as reader:
            for i, batch in enumerate(reader.iter()):
                if i == self.steps:
                    break
                digest.update(batch.cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


# ----------------------------------------------------------------------------- saecache


def _known(cls, wanted: dict) -> tuple[dict, list[str]]:
    """(the entries of ``wanted`` that are fields of dataclass ``cls``, the names left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in wanted.items() if k in names}, sorted(set(wanted) - names)


class Saecache:
    """saecache through its public API: TrainConfig + train(), read back from the final snapshot."""

    name = "saecache"

    def __init__(self):
        self.version = saecache.__version__
        self.commit = _git_commit(Path(saecache.__file__).resolve().parent)
        self.reason = None
        self.left_out: set[str] = set()

    def archs(self, d: int) -> dict[str, list[Sparsity]]:
        """Each saecache architecture and how its L0 is set: by --k, by --l1 adaptive:TARGET,
        and (L1-style) by a search on a fixed --l1. Probed on the architecture itself, so a new
        one in ARCHS needs no edit here when it takes --k or --l1."""
        out = {}
        for name, arch in ARCHS.items():
            modes = []
            if _accepts(arch, (), (16,)):
                modes.append(Sparsity("k"))
            else:
                if _accepts(arch, ("adaptive:16",), ()):
                    modes.append(Sparsity("target", name="adaptive"))
                if _accepts(arch, (_default_l1(),), ()):
                    modes.append(Sparsity("coef", float(_default_l1()), "fixed --l1"))
            out[name] = modes
        return out

    def recipe(self, arch: str) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.name in ("lr", "lr_warmup", "lr_decay", "l1_warmup", "l0_ramp", "grad_clip",
                                  "dead_window")}
        return "TrainConfig defaults: " + ", ".join(
            f"{k} {'auto (2e-4/√(F/2¹⁴))' if v is None else format(v, 'g')}" for k, v in defaults.items())

    def train(self, arch: str, mode: Sparsity, value: float, bench: Bench, steps: int) -> Trained:
        setup = bench.setup
        sparsity = {"k": (int(value),)} if mode.kind == "k" else {
            "l1": (f"adaptive:{value:g}",) if mode.kind == "target" else (f"{value:.6g}",)}
        with tempfile.TemporaryDirectory(dir=bench.workdir) as out:
            reader, left_r = _known(ReaderConfig, dict(
                batch_size=setup.batch_size, seed=setup.seed, mix_chunks=bench.reader.mix_chunks,
                threads=2, holdout_fraction=bench.reader.holdout_fraction))
            cfg, left_t = _known(TrainConfig, dict(
                cache=bench.data.cache.location, out=out, layers=(bench.data.layer,), arch=arch,
                expansion=setup.n_features // setup.d, tokens=steps * setup.batch_size,
                snapshots=(), device=setup.device, log_every=10 ** 9, checkpoint_every=10 ** 15,
                heldout_rows=setup.batch_size, progress=False, reader=ReaderConfig(**reader),
                **sparsity))
            self.left_out |= set(left_r) | set(left_t)
            from saecache.train.loop import train

            run = train(TrainConfig(**cfg))[0]
            state = torch.load(run.folder.snapshot_path(bench.data.layer, None), weights_only=True)
        sae = SAE.from_snapshot(state, device=setup.device)  # weights for raw activations
        sae.eval()
        scale = bench.scale

        def forward(x):
            out = sae(x / scale)
            return out.x_hat * scale, out.acts

        final = state["cfg"].get("l1_final")
        note = f"λ_final {final:.3g}" if mode.kind == "target" and final is not None else ""
        return Trained(forward, sae.W_dec.detach(), note)


def _accepts(arch, l1: tuple, k: tuple) -> bool:
    try:
        arch.sparsities(l1, k, 64)
        return True
    except (ValueError, TypeError):
        return False


def _default_l1() -> str:
    default = next(f for f in dataclasses.fields(TrainConfig) if f.name == "l1").default
    return default[0] if isinstance(default, tuple) and default else "3e-4"


def _git_commit(path: Path) -> str:
    try:
        sha = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- matched L0


@dataclass
class Result:
    """One row of a table."""

    dataset: str
    arch: str
    trainer: str
    target: float
    setting: str
    metrics: dict
    cpu_s: float
    search_cpu_s: float = 0.0
    error: str = ""


def timed(fn: Callable[[], Trained]) -> tuple[Trained, float]:
    start = time.process_time()
    model = fn()
    return model, time.process_time() - start


def coefficient_search(run: Callable[[float, int], Trained], bench: Bench, targets: list[float],
                       start: float, probes: int, probe_fraction: float, full_runs: int,
                       tolerance: float, log: Callable[[str], None]) -> dict[float, tuple]:
    """Fixed-coefficient runs reaching each target L0: {target: (model, coef, metrics, cpu_s,
    search_cpu_s)}.

    Short probes (complete runs at ``probe_fraction`` of the length, from ``start``, each step
    at most 20×) bracket the targets in log L0 against log coef. Full-length runs then aim, one
    at a time, at the target missed worst so far: the first placed by the probes, the next
    ones interpolated in log-log between the full-length runs, or along the slope (the
    probes' until two full runs give one, at most 4× on) outside them; until every target is within
    ``tolerance`` or ``full_runs`` are spent. Each target keeps
    the full-length run whose L0 is nearest (the L0 reached is reported); the others' and the
    probes' CPU time is the search's.
    """
    probe_steps = max(20, int(bench.steps * probe_fraction))
    probe_points: list[tuple[float, float]] = []  # (log coef, log L0)
    probe_cpu = 0.0
    probe_rows = bench.heldout[:PROBE_EVAL_ROWS]
    coef = start
    for _ in range(probes):
        model, cpu = timed(lambda: run(coef, probe_steps))
        probe_cpu += cpu
        l0 = evaluate(model, probe_rows)["l0"]
        probe_points.append((math.log(coef), _log_l0(l0)))
        log(f"      probe {coef:.4g} ({probe_steps} steps): L0 {l0:.1f}")
        lo, hi = min(p[1] for p in probe_points), max(p[1] for p in probe_points)
        close = lambda t: any(abs(p[1] - math.log(t)) <= math.log1p(tolerance) for p in probe_points)
        outside = [t for t in targets if not lo <= math.log(t) <= hi and not close(t)]
        if not outside:
            break
        aim = max(outside, key=lambda t: min(abs(math.log(t) - lo), abs(math.log(t) - hi)))
        near = min(probe_points, key=lambda p: abs(p[1] - math.log(aim)))
        step = 1.25 * (math.log(aim) - near[1]) / _slope(probe_points)  # overshoot: bracket
        coef = math.exp(near[0] + max(-MAX_STEP, min(MAX_STEP, step)))

    full: list[tuple[float, float, Trained, dict, float]] = []  # (log coef, log L0, model, metrics, cpu)

    def nearest(target: float):
        return min(full, key=lambda f: abs(f[1] - math.log(target)), default=None)

    def miss(target: float) -> float:
        f = nearest(target)
        return math.inf if f is None else abs(f[1] - math.log(target))

    while len(full) < full_runs:
        target = max(targets, key=miss)
        if miss(target) <= math.log1p(tolerance):
            break
        # the probes place the first full run; after it, the full runs alone (L0 also
        # depends on the length), along the probes' slope until two full runs give their own
        points = [f[:2] for f in full] or probe_points
        slope = _slope(points) if len(full) >= 2 else _slope(probe_points)
        log_coef = math.log(_interpolate(points, math.log(target), slope,
                                         MAX_FULL_STEP if full else MAX_STEP))
        if any(abs(log_coef - f[0]) < 1e-3 for f in full):  # the same run again: nudge it
            log_coef += 0.1 * (1 if nearest(target)[1] > math.log(target) else -1)
        model, cpu = timed(lambda: run(math.exp(log_coef), bench.steps))
        metrics = evaluate(model, bench.heldout, bench.data.directions)
        full.append((log_coef, _log_l0(metrics["l0"]), model, metrics, cpu))
        log(f"      {math.exp(log_coef):.4g}: L0 {metrics['l0']:.1f} (aiming at {target:g})")
    results = {}
    for target in targets:
        chosen = nearest(target)
        search = probe_cpu + sum(f[4] for f in full if f is not chosen)
        results[target] = (chosen[2], math.exp(chosen[0]), chosen[3], chosen[4], search)
    return results


def _log_l0(l0: float) -> float:
    return math.log(max(l0, 0.05))


def _slope(points: list[tuple[float, float]]) -> float:
    """d log L0 / d log coef fitted to the points (−1 until two coefficients differ), kept
    negative and within [−4, −0.25]."""
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    if len(points) < 2 or np.ptp(xs) < 1e-9:
        return -1.0
    slope = float(np.polyfit(xs, ys, 1)[0])
    return min(-0.25, max(-4.0, slope))


def _interpolate(points: list[tuple[float, float]], y: float, slope: float,
                 max_step: float = MAX_STEP) -> float:
    """The coefficient at log L0 = y: linear in log-log between the nearest points on either
    side, else along ``slope`` from the nearest point (at most e^max_step times away)."""
    below = [p for p in points if p[1] <= y]
    above = [p for p in points if p[1] >= y]
    if below and above:
        (x0, y0), (x1, y1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        if abs(y1 - y0) > 1e-9:
            return math.exp(x0 + (y - y0) * (x1 - x0) / (y1 - y0))
        return math.exp((x0 + x1) / 2)
    near = min(points, key=lambda p: abs(p[1] - y))
    step = (y - near[1]) / slope
    return math.exp(near[0] + max(-max_step, min(max_step, step)))


# ----------------------------------------------------------------------------- running it


def run_arch(trainer, arch: str, mode: Sparsity, bench: Bench, targets: list[float], args,
             log) -> list[Result]:
    """Every target of one (trainer, architecture, sparsity mode) on one data set."""
    is_saecache = isinstance(trainer, Saecache)
    label = trainer.name + (f" ({mode.name})" if is_saecache and mode.name else "")

    def run(value: float, steps: int) -> Trained:
        if is_saecache:
            return trainer.train(arch, mode, value, bench, steps)
        return trainer.train(arch, value, bench.setup, steps, bench.batches(steps))

    rows = []
    try:
        if mode.kind == "coef":
            log(f"    {label} {arch}: searching {mode.name} from {mode.start:.4g}")
            found = coefficient_search(run, bench, targets, mode.start, args.probes,
                                       args.probe_fraction, round(args.full_runs * len(targets)),
                                       args.tolerance, log)
            for target, (model, coef, metrics, cpu, search) in found.items():
                rows.append(Result(bench.data.name, arch, label, target,
                                   f"{mode.name} {coef:.3g}", metrics, cpu, search))
            return rows
        for target in targets:
            value = int(round(target)) if mode.kind == "k" else target
            model, cpu = timed(lambda: run(value, bench.steps))
            metrics = evaluate(model, bench.heldout, bench.data.directions)
            setting = f"k {value}" if mode.kind == "k" else f"target L0 {value:g}"
            if model.note:
                setting += f", {model.note}"
            rows.append(Result(bench.data.name, arch, label, target, setting, metrics, cpu))
            log(f"    {label} {arch} {setting}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, "
                f"dead {100 * metrics['dead']:.1f}%, {cpu:.0f} CPU s")
    except Exception as err:  # a peer that breaks on this machine: recorded, the rest go on
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log(f"    {label} {arch}: FAILED {msg}")
        rows.append(Result(bench.data.name, arch, label, float("nan"), "", {}, 0.0, error=msg))
    return rows


def targets_for(d: int, n_features: int) -> list[float]:
    return sorted({t for t in (16, 32, d // 2) if 1 <= t <= n_features})


def architectures(saecache_archs: dict, peers: list, wanted: str, d: int) -> list[str]:
    """saecache's architectures (ARCHS order), then those only peers have."""
    names = list(saecache_archs)
    for peer in peers:
        names += [a for a in peer.archs(d) if a not in names]
    if wanted == "all":
        return names
    if wanted == "saecache":
        return [a for a in names if a in saecache_archs]
    chosen = [a.strip() for a in wanted.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise SystemExit(f"--archs: unknown architecture(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return chosen


def make_bench(data: quality_data.DataSet, args, workdir: Path) -> Bench:
    d = data.cache.layout.d
    reader = ReaderConfig(batch_size=args.batch_size, seed=args.seed, mix_chunks=args.mix_chunks,
                          threads=2, holdout_fraction=data.holdout_fraction)
    plan_batches = PlainReader(data.cache, data.layer, reader).plan.n_batches
    steps = min(args.tokens // args.batch_size, plan_batches)
    scale = math.sqrt(d) / data.cache.layer_stats(data.layer).mean_norm  # E‖x·scale‖ = √d
    setup = Setup(d=d, n_features=d * args.expansion, batch_size=args.batch_size, seed=args.seed,
                  device=args.device)
    return Bench(data, setup, reader, steps, scale, workdir)


def load_data(name: str, args, root: Path) -> quality_data.DataSet:
    if name == "ground_truth":
        return quality_data.ground_truth(root, d=args.d, n_true=args.true_features,
                                         mean_l0=args.true_l0, train_tokens=args.tokens,
                                         heldout_tokens=args.heldout, chunk_rows=args.chunk_rows,
                                         seed=args.seed)
    return quality_data.real(root, train_tokens=args.tokens, heldout_tokens=args.heldout,
                             chunk_rows=args.chunk_rows, seed=args.seed)


def run_all(args, log=print) -> dict:
    """Run the benchmark described by ``args``; returns everything the report needs."""
    torch.manual_seed(args.seed)
    wall = time.perf_counter()
    own = Saecache()
    peers = []
    for cls in PEERS:
        if args.peers == "none" or (args.peers != "all" and cls.name not in args.peers.split(",")):
            continue
        peer = cls()
        if peer.reason:
            log(f"{peer.name} ({peer.dist}) skipped: {peer.reason}")
        peers.append(peer)
    live = [p for p in peers if not p.reason]
    results, datasets = [], []
    root = Path(args.data_dir) if args.data_dir else None
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        root = root or Path(tmp) / "data"
        root.mkdir(parents=True, exist_ok=True)
        for name in args.data:
            start = time.perf_counter()
            data = load_data(name, args, root)
            bench = make_bench(data, args, Path(tmp))
            plain = bench.stream_hash(PlainReader)
            same = bench.stream_hash(PrefetchReader) == plain
            log(f"{data.title}\n  {bench.steps} steps of {args.batch_size}, F = {bench.setup.n_features}, "
                f"scale {bench.scale:.4g}, stream sha256 {plain[:16]} (saecache's loop reads the "
                f"same: {same}); data ready in {time.perf_counter() - start:.0f} s")
            d, n_features = bench.setup.d, bench.setup.n_features
            targets = targets_for(d, n_features)
            own_archs = own.archs(d)
            for arch in architectures(own_archs, live, args.archs, d):
                log(f"  {arch}")
                for mode in own_archs.get(arch, []):
                    if mode.kind == "coef" and not args.saecache_fixed_l1:
                        continue
                    results += run_arch(own, arch, mode, bench, targets, args, log)
                for peer in live:
                    mode = peer.archs(d).get(arch)
                    if mode is not None:
                        results += run_arch(peer, arch, mode, bench, targets, args, log)
            datasets.append(dict(name=name, title=data.title, info=data.info, steps=bench.steps,
                                 tokens=bench.steps * args.batch_size, heldout_rows=int(bench.heldout.shape[0]),
                                 d=d, n_features=n_features, targets=targets, scale=bench.scale,
                                 stream_sha256=plain, prefetch_reader_same=same,
                                 archs=architectures(own_archs, live, args.archs, d),
                                 saecache_archs=list(own_archs)))
    recipes = {}
    for trainer in [own, *live]:
        archs = own.archs(args.d) if trainer is own else trainer.archs(args.d)
        recipes[trainer.name] = {a: trainer.recipe(a) for a in archs}
    return dict(results=[dataclasses.asdict(r) for r in results], datasets=datasets,
                machine=machine(peers), saecache=dict(version=own.version, commit=own.commit,
                                                      options_left_out=sorted(own.left_out)),
                peers={p.name: dict(dist=p.dist, version=p.version, skipped=p.reason) for p in peers},
                recipes=recipes, args=vars(args), command=command_line(),
                wall_s=time.perf_counter() - wall)


def machine(peers: list[Peer]) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(nproc=os.cpu_count(), cpu=cpu, torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"))


def command_line() -> str:
    return " ".join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]])


# ----------------------------------------------------------------------------- the report


def _fmt(value, spec: str, empty: str = "–") -> str:
    return empty if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def tables(report: dict) -> str:
    """The Markdown section: machine, command, and one table per data set."""
    m, sc = report["machine"], report["saecache"]
    peers = ", ".join(f"{name} {p['version']}" + (f" (skipped: {p['skipped']})" if p["skipped"] else "")
                      for name, p in report["peers"].items()) or "none"
    lines = [BEGIN, "",
             f"Measured with `{report['command']}` (saecache {sc['version']}, commit {sc['commit']}) "
             f"in {report['wall_s'] / 60:.1f} min.",
             "",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']} ({m['threads']} threads, "
             f"OMP_NUM_THREADS={m['omp_num_threads']}), Python {m['python']}; peers: {peers}.",
             ""]
    if sc["options_left_out"]:
        lines += [f"saecache options this version does not have (not passed): "
                  f"{', '.join(sc['options_left_out'])}.", ""]
    by_set: dict[str, list[dict]] = {}
    for r in report["results"]:
        by_set.setdefault(r["dataset"], []).append(r)
    for ds in report["datasets"]:
        truth = ds["name"] == "ground_truth"
        lines += [f"### {ds['title']}", "",
                  f"{ds['tokens']:,} training tokens ({ds['steps']} batches of "
                  f"{report['args']['batch_size']}), F = {ds['n_features']}, {ds['heldout_rows']:,} "
                  f"held-out rows; batch stream sha256 `{ds['stream_sha256'][:16]}…` (saecache's "
                  f"PrefetchReader yields the same: {'yes' if ds['prefetch_reader_same'] else 'NO'}).", ""]
        head = "| arch | target L0 | trainer | setting | FVU | L0 | dead % |"
        rule = "|---|---|---|---|---|---|---|"
        if truth:
            head += " MMCS | recovered % |"
            rule += "---|---|"
        lines += [head + " CPU s |", rule + "---|"]
        rows = by_set.get(ds["name"], [])
        trainers = ["saecache", *report["peers"]]
        rank = lambda r: (trainers.index(_base(r["trainer"])) if _base(r["trainer"]) in trainers
                          else len(trainers), r["trainer"])
        for arch in ds["archs"]:
            if arch not in ds["saecache_archs"]:
                for target in ds["targets"]:
                    lines.append(f"| {arch} | {target:g} | saecache | not in this saecache |"
                                 + " – |" * (6 if truth else 4))
            mine = [r for r in rows if r["arch"] == arch]
            for r in sorted(mine, key=lambda r: (r["target"] if r["target"] == r["target"] else 1e9,
                                                 *rank(r))):
                lines.append(_row(r, truth))
        lines += ["", *summary(rows, ds["targets"], trainers, report["args"].get("tolerance", 0.15)), ""]
    lines += ["Recipes (each trainer's settings per architecture):", ""]
    for name, archs in report["recipes"].items():
        for arch, recipe in archs.items():
            lines.append(f"- {name}, {arch}: {recipe}")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _row(r: dict, truth: bool) -> str:
    mt = r["metrics"]
    if r["error"]:
        return (f"| {r['arch']} | – | {r['trainer']} | FAILED: {r['error']} |"
                + " – |" * (6 if truth else 4))
    cpu = f"{r['cpu_s']:.0f}" + (f" (+{r['search_cpu_s']:.0f} search)" if r["search_cpu_s"] else "")
    cells = (f"| {r['arch']} | {r['target']:g} | {r['trainer']} | {r['setting']} | "
             f"{_fmt(mt.get('fvu'), '.4f')} | {_fmt(mt.get('l0'), '.1f')} | "
             f"{_fmt(100 * mt['dead'] if 'dead' in mt else None, '.1f')} |")
    if truth:
        cells += (f" {_fmt(mt.get('mmcs'), '.3f')} | "
                  f"{_fmt(100 * mt['recovered'] if 'recovered' in mt else None, '.1f')} |")
    return cells + f" {cpu} |"


def _base(label: str) -> str:
    """The trainer of a row label: ``saecache (adaptive)`` → ``saecache``."""
    return label.split(" (", 1)[0]


def summary(rows: list[dict], targets: list[float], trainers: list[str], tolerance: float) -> list[str]:
    """Best held-out FVU of each trainer at each target, over its architectures and ways of
    setting the sparsity, counting only runs whose L0 came within ``tolerance`` of the target."""
    lines = [f"Best FVU per trainer and target L0, any architecture, among runs within "
             f"±{100 * tolerance:.0f}% of the target L0 (which one in brackets):", "",
             "| target L0 | " + " | ".join(trainers) + " |", "|---|" + "---|" * len(trainers)]
    for target in targets:
        cells = []
        for trainer in trainers:
            ok = [r for r in rows if _base(r["trainer"]) == trainer and r["target"] == target
                  and not r["error"] and abs(r["metrics"]["l0"] / target - 1) <= tolerance]
            best = min(ok, key=lambda r: r["metrics"]["fvu"], default=None)
            what = None if best is None else best["arch"] + best["trainer"][len(trainer):]
            cells.append("–" if best is None else f"{best['metrics']['fvu']:.4f} ({what})")
        lines.append(f"| {target:g} | " + " | ".join(cells) + " |")
    return lines


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (the whole file when it has none)."""
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            path.write_text(head + section.rstrip("\n") + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(section)


# ----------------------------------------------------------------------------- command line


QUICK = dict(tokens=2 ** 18, heldout=32768, probes=3, probe_fraction=0.25, full_runs=1.5,
             archs="saecache", saecache_fixed_l1=False)
FULL = dict(tokens=2 ** 20, heldout=102400, probes=4, probe_fraction=0.25, full_runs=2.5,
            archs="all", saecache_fixed_l1=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"small run (~5 min on 2 CPU cores): {QUICK}")
    parser.add_argument("--data", default="ground_truth,real", help="ground_truth, real or both")
    parser.add_argument("--peers", default="all", help="all, none, or names (SAELens,sparsify,dictionary-learning)")
    parser.add_argument("--archs", default=None,
                        help="all, saecache (only saecache's architectures), or names [quick: saecache; else all]")
    parser.add_argument("--d", type=int, default=64, help="ground truth width (real: the model's, 64)")
    parser.add_argument("--true-features", type=int, default=256, help="ground truth: true features")
    parser.add_argument("--true-l0", type=float, default=8.0, help="ground truth: mean true features per token")
    parser.add_argument("--expansion", type=int, default=8, help="F = expansion × d")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per run")
    parser.add_argument("--heldout", type=int, default=None, help="held-out rows")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--mix-chunks", type=int, default=8)
    parser.add_argument("--probes", type=int, default=None, help="coefficient-search probes")
    parser.add_argument("--probe-fraction", type=float, default=None)
    parser.add_argument("--full-runs", type=float, default=None,
                        help="coefficient search: full-length runs per target L0, at most")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--saecache-fixed-l1", action=argparse.BooleanOptionalAction, default=None,
                        help="also search a fixed --l1 for saecache's L1 architectures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="keep the caches here and reuse them")
    parser.add_argument("--out", default="docs/quality.md", help="Markdown file whose section to write")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only format the tables of a --json file written before (and --out them)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data = [d.strip() for d in args.data.split(",") if d.strip()]
    bad = [d for d in args.data if d not in ("ground_truth", "real")]
    if bad:
        parser.error(f"--data: unknown data set(s) {', '.join(bad)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        report = run_all(args, log=lambda s: print(s, flush=True))
    section = tables(report)
    print(section)
    if args.out:
        write_section(Path(args.out), section)
    if args.json and not args.render:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
