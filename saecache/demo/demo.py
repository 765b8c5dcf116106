"""`saecache demo`: the whole pipeline offline on the tiny built-in model and bundled text."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from saecache.core.atomic import check_folder
from saecache.harvest.corpus import DatasetSpec
from saecache.evaluate.runs import EvalConfig, evaluate_runs
from saecache.harvest.config import HarvestConfig
from saecache.harvest.loop import harvest
from saecache.report.report import write_report
from saecache.storage.info import describe, format_info
from saecache.demo.tiny import DEMO_MODEL, DEMO_TEXT, build_tiny_model
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.loop import train

DEMO_CTX = 64
DEMO_TOKENS = 65536  # the bundled text (~7.6K tokens) read 9 times over
DEMO_CHUNK_ROWS = 2048  # 32 sequences per block: 32 blocks, the last one held out
DEMO_LAYER = 1


def demo_text(out: Path) -> Path:
    """The bundled text, repeated so that the demo cache holds enough tokens to train on."""
    path = out / "demo-text.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join([DEMO_TEXT.read_text().strip()] * 9))
    return path


def demo_harvest_config(out: Path, device: str) -> HarvestConfig:
    """Harvest of the demo text through the tiny model into ``out/cache.zarr``."""
    model = build_tiny_model(out / "model", DEMO_MODEL)
    # float16 matmuls are emulated on the CPU (~20× slower than float32 for this model)
    dtype = "float32" if torch.device(device).type == "cpu" else "float16"
    return HarvestConfig(cache=str(out / "cache.zarr"), model=str(model),
                         dataset=DatasetSpec(str(demo_text(out))), tokens=DEMO_TOKENS, ctx=DEMO_CTX,
                         batch_size=32, chunk_rows=DEMO_CHUNK_ROWS, device=device, dtype=dtype)


def demo_train_configs(out: Path, device: str) -> list[TrainConfig]:
    """Sparse SAEs on layer 1 (F = 256): ReLU sister runs with L1 1e-2 (λ_Anthropic 5.1) and
    adaptive toward L0 = 16, and TopK with k = 16."""
    common = dict(cache=str(out / "cache.zarr"), out=str(out / "runs"), layers=(DEMO_LAYER,),
                  expansion=4, tokens=49152, snapshots=(16000, 32000), dead_window=16384,
                  log_every=16, checkpoint_every=16384, device=device,
                  reader=ReaderConfig(batch_size=128, mix_chunks=4, threads=2))
    return [TrainConfig(l1=("1e-2", "adaptive:16"), **common), TrainConfig(arch="topk", k=(16,), **common)]


STAGES = 5


def run_demo(out: str | Path, device: str, say: Callable[[str], None] = lambda line: None) -> str:
    """Run the demo pipeline into ``out``, telling ``say`` each stage as it starts and ends;
    returns the report to print."""
    out = check_folder(out).resolve()  # every path the cache and runs record is absolute
    with _threads(device):
        say(f"saecache demo: the whole pipeline offline on a tiny built-in model, in {out}")
        with _stage(say, 1, "model: the bundled 3-block GPT-NeoX (d 64), pre-trained on the bundled text"):
            cfg = demo_harvest_config(out, device)
        with _stage(say, 2, f"harvest: {DEMO_TOKENS:,} tokens × 3 layers into {cfg.cache}"):
            cache = harvest(cfg).cache
        report = [format_info(describe(cache)), ""]
        with _stage(say, 3, f"train: layer {DEMO_LAYER}, F = 256: ReLU at L1 1e-2 and adaptive "
                            "toward L0 16 (one read pass), then TopK k 16"):
            for train_cfg in demo_train_configs(out, device):
                report += [f"{run.folder.name}: {run.summary()}" for run in train(train_cfg)]
        with _stage(say, 4, "eval: each SAE spliced into the model (CE loss recovered, KL)"):
            evaluated = evaluate_runs(EvalConfig(runs=str(out / "runs"), device=device))
        for run, data in evaluated.items():
            r = next(v for name, v in data["snapshots"].items() if name.endswith("_final.pt"))
            report.append(_evaluated(run.name, r, cache.layout.d * run.record().spec.expansion))
        with _stage(say, 5, f"report: figures and tables into {out / 'report'}"):
            index = write_report(out / "runs", out / "report")
    report.append(f"report: {index}")
    return "\n".join(report)


@contextmanager
def _stage(say: Callable[[str], None], number: int, what: str):
    """Say a stage when it starts and how long it took when it ends."""
    say(f"[{number}/{STAGES}] {what} …")
    start = time.perf_counter()
    yield
    say(f"[{number}/{STAGES}] done in {time.perf_counter() - start:.1f} s")


@contextmanager
def _threads(device: str):
    """One intra-op thread on the CPU while the demo runs: its matrices (d 64, F 256) are too
    small to gain from more, and torch's default of one spinning thread per core turns a busy
    machine's minute into ten (measured: docs/benchmarks.md, "Demo")."""
    before = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _evaluated(name: str, r: dict, n_features: int) -> str:
    """One run's eval.json figures of its final snapshot, in one line."""
    return (f"{name}: L0 {r['l0']:.1f} of F = {n_features}, FVU {r['fvu']:.3f}, dense "
            f"{100 * r['dense_fraction']:.1f}%, dead {100 * r['dead_fraction']:.1f}%; CE loss "
            f"recovered {r['ce_loss_recovered']:.3f} (CE clean {r['ce_clean']:.3f}, spliced "
            f"{r['ce_spliced']:.3f}, zero-ablated {r['ce_zero']:.3f}), KL {r['kl']:.4f}")
