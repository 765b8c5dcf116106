"""Harvest throughput with 1 process and with N torchrun processes on the same machine.

Each run harvests the same tokens with the same model into a fresh cache; throughput is the
tokens harvested over the slowest rank's forward-and-write loop (what each rank prints).

    python benchmarks/bench_ranks.py --shape tiny --dtype float32 --tokens 512K --nproc 2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_harvest import SHAPES, build_model, make_text  # benchmarks/ is on sys.path

from saecache.core.units import parse_count

LINE = re.compile(r"harvested (\S+) tokens .* in ([0-9.]+) s")


def harvest(cmd: list[str]) -> tuple[int, float]:
    """(tokens, seconds of the slowest rank) from the ranks' summary lines."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = [LINE.search(line) for line in done.stderr.splitlines()]
    pairs = [(parse_count(m.group(1)), float(m.group(2))) for m in found if m]
    return sum(t for t, _ in pairs), max(s for _, s in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=parse_count, default=parse_count("512K"))
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, text = build_model(args.shape, Path(tmp)), make_text(Path(tmp), args.tokens)
        common = ["harvest", "--model", str(model), "--dataset", str(text), "--tokens", str(args.tokens),
                  "--ctx", str(args.ctx), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                  "--device", args.device, "--no-progress"]
        rows = []
        for n in (1, args.nproc):
            launcher = ([sys.executable, "-m", "saecache"] if n == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", str(n), "-m", "saecache"])
            tokens, seconds = harvest([*launcher, common[0], f"{tmp}/cache-{n}.zarr", *common[1:]])
            rows.append((n, tokens, seconds))
    print(f"shape={args.shape} dtype={args.dtype} ctx={args.ctx} batch={args.batch_size} device={args.device}")
    print("| processes | tokens | slowest rank's loop s | tokens/s | vs 1 process |")
    print("|---|---:|---:|---:|---:|")
    for n, tokens, seconds in rows:
        print(f"| {n} | {tokens:,} | {seconds:.1f} | {tokens / seconds:,.0f} | "
              f"{(tokens / seconds) / (rows[0][1] / rows[0][2]):.2f}× |")


if __name__ == "__main__":
    main()
