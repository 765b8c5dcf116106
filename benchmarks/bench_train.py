"""Training throughput from the cache against the same SAE step on batches already on the device.

In one run on one machine, for 1 run and for 3 sister runs (L1 3e-4, 8e-5, adaptive:150):

    limit      SAETrainer.step on a batch that already lives on the device, repeated (no data path)
    train      saecache's training loop reading the cache (page cache warm): tokens/s of the
               whole loop, and the fraction of step time spent waiting for data

    python benchmarks/bench_train.py                                  # CPU-sized default
    python benchmarks/bench_train.py --d 1024 --expansion 32 --batch-size 4096 --device cuda \
        --precision tf32 --precision bf16 --blocks 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from synthetic_cache import LAYER, make_cache  # benchmarks/ is on sys.path when run as a script

from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.loop import train
from saecache.train.trainer import SAETrainer, set_precision

SISTERS = ("3e-4", "8e-5", "adaptive:150")


def config(cache, out, args, precision: str, l1: tuple[str, ...], tokens: int) -> TrainConfig:
    return TrainConfig(cache=str(cache), out=str(out), layers=(LAYER,), expansion=args.expansion,
                       l1=l1, tokens=tokens, snapshots=(), device=args.device, precision=precision,
                       log_every=10**9, checkpoint_every=10**12, heldout_rows=args.batch_size,
                       progress=False, reader=ReaderConfig(batch_size=args.batch_size,
                                                           threads=args.reader_threads,
                                                           mix_chunks=args.mix_chunks))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def limit(cache, args, precision: str, l1: tuple[str, ...], steps: int) -> float:
    """Tokens/s of the runs' steps on one batch resident on the device, with the matmul
    precision the training loop sets (tf32: TF32 on; without it "tf32" would time fp32)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = config(cache.location, out, args, precision, l1, steps * args.batch_size)
        set_precision(precision)  # as train() does
        runs = [SAETrainer(spec, cfg, cache.layout.d) for spec in cfg.run_specs(LAYER, cache.layout.d)]
        x = torch.randn(args.batch_size, cache.layout.d, device=args.device)  # (B, d) on the device
        for step in range(3):  # warm-up
            for run in runs:
                run.step(x, step)
        sync(args.device)
        start = time.perf_counter()
        for step in range(steps):
            for run in runs:
                run.step(x, step)
        sync(args.device)
        return steps * args.batch_size / (time.perf_counter() - start)


def from_cache(cache, args, precision: str, l1: tuple[str, ...], steps: int) -> tuple[float, float, float, int]:
    """(loop tokens/s, whole-command tokens/s, data-wait fraction, bytes read) of train() on
    the cache. With one metrics line at the last step, its tokens/s covers the whole loop; the
    whole command adds opening the runs, the held-out read, the final snapshot and checkpoint."""
    with tempfile.TemporaryDirectory() as out:
        cfg = config(cache.location, out, args, precision, l1, steps * args.batch_size)
        start = time.perf_counter()
        runs = train(cfg)
        seconds = time.perf_counter() - start
        last = [json.loads(l) for l in runs[0].folder.metrics.read_text().splitlines()
                if '"train"' in l][-1]
        return (last["tokens_per_s"], steps * args.batch_size / seconds, last["data_wait_fraction"],
                last["bytes_read"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=24, help="cache blocks (16384 rows each)")
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", action="append", help="fp32 / tf32 / bf16 (repeatable)")
    parser.add_argument("--reader-threads", type=int, default=8)
    parser.add_argument("--mix-chunks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="0: one pass over the training rows")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    precisions = args.precision or (["tf32", "bf16"] if args.device.startswith("cuda") else ["fp32"])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = make_cache(Path(tmp) / "cache.zarr", args.blocks, args.chunk_rows, args.d)
        train_rows = (args.blocks - 1) * cache.layout.rows_per_block
        steps = args.steps or (train_rows // args.batch_size) - args.mix_chunks * args.chunk_rows // args.batch_size
        for precision in precisions:
            for l1 in (SISTERS[:1], SISTERS):
                lim = limit(cache, args, precision, l1, min(steps, 50))
                tok_s, whole_tok_s, wait, nbytes = from_cache(cache, args, precision, l1, steps)
                rows.append(dict(precision=precision, runs=len(l1), limit_tok_s=lim, train_tok_s=tok_s,
                                 whole_tok_s=whole_tok_s, ratio=tok_s / lim, data_wait=wait,
                                 bytes_read=nbytes))
    print(f"d={args.d} F={args.d * args.expansion} batch={args.batch_size} device={args.device} "
          f"steps={steps} threads={torch.get_num_threads()}")
    print("| precision | SAEs per batch | limit tok/s (batch on device) | training loop tok/s from cache | "
          "loop / limit | whole command tok/s | data-wait fraction | bytes read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['runs']} | {r['limit_tok_s']:,.0f} | {r['train_tok_s']:,.0f} | "
              f"{100 * r['ratio']:.0f}% | {r['whole_tok_s']:,.0f} | {r['data_wait']:.3f} | {r['bytes_read']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))


if __name__ == "__main__":
    main()
