"""How sparse the model card's L1 coefficients make SAEs at pythia-410m's width (d = 1024).

A GPT-NeoX with pythia-410m's width and random weights (the L0 a coefficient gives depends on
the loss convention and on d, not on what the model learnt), a cache of its residuals, then the
card's sister runs `--l1 3e-4 --l1 8e-5` at expansion 32 (F = 32768) trained from it; prints the
held-out L0 as a fraction of F for each, and λ_Anthropic (docs/l1-units.md).

    python benchmarks/bench_l1_units.py                       # CPU: ~10 minutes on 2 cores
    python benchmarks/bench_l1_units.py --device cuda --tokens 4M --batch-size 4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from saecache.core.units import parse_count
from saecache.demo.tiny import DEMO_TEXT, TinyModelConfig, build_tiny_model
from saecache.harvest.config import HarvestConfig
from saecache.harvest.corpus import DatasetSpec
from saecache.harvest.loop import harvest
from saecache.sae.l1 import to_anthropic
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.loop import train

D = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=parse_count, default=parse_count("96K"), help="training tokens")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--l1", nargs="+", default=["3e-4", "8e-5"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", TinyModelConfig(n_layers=2, d_model=D, n_heads=16,
                                                                 d_mlp=4 * D, max_ctx=256))
        text = root / "text.txt"
        text.write_text("\n\n".join([DEMO_TEXT.read_text().strip()] * 40))
        harvest(HarvestConfig(cache=str(root / "cache.zarr"), model=str(model), dataset=DatasetSpec(str(text)),
                              tokens=args.tokens + args.tokens // 8, ctx=128, layers="1", batch_size=16,
                              chunk_rows=4096, device=args.device, progress=False))
        start = time.perf_counter()
        runs = train(TrainConfig(cache=str(root / "cache.zarr"), out=str(root / "runs"), layers=(1,),
                                 expansion=args.expansion, l1=tuple(args.l1), tokens=args.tokens, snapshots=(),
                                 log_every=10**9, heldout_rows=8192, device=args.device, progress=False,
                                 reader=ReaderConfig(batch_size=args.batch_size, mix_chunks=4)))
        seconds = time.perf_counter() - start
        n_features = args.expansion * D
        print(f"d = {D}, F = {n_features}, {args.tokens:,} training tokens, batch {args.batch_size}, "
              f"{seconds:.0f} s ({args.device}, torch {torch.__version__})")
        print("| --l1 | λ_Anthropic | held-out L0 | L0 / F | held-out FVU |")
        print("| --- | --- | --- | --- | --- |")
        for value, run in zip(args.l1, runs):
            line = [json.loads(l) for l in run.folder.metrics.read_text().splitlines() if '"heldout"' in l][-1]
            print(f"| {value} | {to_anthropic(run.spec.l1, D):.2f} | {line['l0']:.1f} | "
                  f"{100 * line['l0'] / n_features:.2f}% | {line['fvu']:.3f} |")


if __name__ == "__main__":
    main()
