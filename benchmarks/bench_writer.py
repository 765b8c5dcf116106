#!/usr/bin/env python
"""Stage one's block writer against raw sequential writes of the same bytes, no model.

The real :class:`saecache.harvest.writer.BlockWriter` writes ``--blocks`` blocks of
``--layers`` × ``--rows`` × ``--d`` fp16 (16384 × 1024: 32 MiB a chunk) from HostBuffers of
random fp16 into a fresh cache under ``--dir``, commit records included. The baseline writes
the same number of files of the same size (chunk + 4-byte checksum) from the same host memory
with plain ``open(..., "wb").write(view)`` into the same folder, from 1 thread and from
``--threads`` threads; the better of the two is "raw". Neither fsyncs a file (zarr's local
store does not, nor does the writer); each timing ends with one ``os.sync()`` inside it, so on
a disk both pay for getting the bytes to it (on /dev/shm the sync costs nothing). Each figure
is the best of ``--repeats`` rounds (raw 1 thread, raw N threads, writer; every other round in
the reverse order); the files of each timing are deleted, and synced, before the next. ``--zarr`` also times the writer with every
chunk encoded by zarr (``direct=False``: the path before the direct writer).

    python benchmarks/bench_writer.py --dir /dev/shm        # ~1 min; last line: writer/raw R
    python benchmarks/bench_writer.py --dir /tmp --zarr --threads 8

GB = 1e9 bytes. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saecache.harvest.capture import HostBuffer  # noqa: E402
from saecache.harvest.config import HarvestConfig  # noqa: E402
from saecache.harvest.writer import BlockWriter  # noqa: E402
from saecache.storage.cache import Cache  # noqa: E402
from saecache.storage.layout import CacheLayout  # noqa: E402
from saecache.storage.provenance import Provenance  # noqa: E402

CTX = 2048
DEFAULT_THREADS = HarvestConfig.__dataclass_fields__["writer_threads"].default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="folder to write in [%(default)s]")
    p.add_argument("--blocks", type=int, default=6, help="blocks per timing [%(default)s]")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--rows", type=int, default=16384, help="rows per chunk (a multiple of 2048)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="writer threads, and the raw baseline's many-thread count [%(default)s]")
    p.add_argument("--buffers", type=int, default=2, help="host buffers of one block [%(default)s]")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each figure is the best [%(default)s]")
    p.add_argument("--zarr", action="store_true", help="also time the writer through zarr's encoder")
    return p.parse_args(argv)


def host_buffers(args) -> list[HostBuffer]:
    """``--buffers`` one-block buffers of random fp16 (finite statistics: zeros)."""
    buffers = []
    for i in range(args.buffers):
        buffer = HostBuffer.allocate(args.layers, args.rows // CTX, CTX, args.d, pin=False)
        generator = torch.Generator().manual_seed(i)
        for layer in range(args.layers):  # (rows, d) at a time: no fp32 copy of the whole buffer
            buffer.resid[layer] = torch.randn(args.rows, args.d, generator=generator).half()
        buffer.sums.zero_()
        buffers.append(buffer)
    return buffers


def new_cache(folder: Path, args) -> Cache:
    """An empty cache of ``--blocks`` blocks, ``--layers`` layers, ready for residuals."""
    seqs = args.rows // CTX
    layout = CacheLayout(ctx=CTX, d=args.d, layers=tuple(range(args.layers)), seqs_per_block=seqs,
                         n_seq=0)
    provenance = Provenance(
        model="synthetic", revision=None, dtype="float16", architecture="none", blocks="none",
        n_layers=args.layers, tokenizer="none", vocab_hash="", eos_token_id=0, dataset="random",
        dataset_config=None, split="train", dataset_revision=None, text_field="text",
        token_budget=args.blocks * seqs * CTX)
    cache = Cache.create(str(folder), provenance, layout)
    cache.create_token_arrays(args.blocks * seqs)
    cache.finish_tokens(args.blocks * seqs)
    return cache


def time_writer(folder: Path, buffers: list[HostBuffer], args, direct: bool) -> float:
    """Seconds for the BlockWriter to write and commit every block, and os.sync()."""
    cache = new_cache(folder, args)
    start = time.perf_counter()
    with BlockWriter(cache, buffers, args.threads, direct=direct) as writer:
        for block in range(args.blocks):
            writer.submit(writer.acquire(), block, [block])
    os.sync()
    seconds = time.perf_counter() - start
    assert writer.blocks_committed == args.blocks
    return seconds


def time_raw(folder: Path, buffers: list[HostBuffer], args, threads: int) -> float:
    """Seconds to write the same files (count and size) with plain writes, and os.sync()."""
    views = [b.resid[i].numpy() for b in buffers for i in range(args.layers)]  # (rows, d) each
    jobs = [(folder / f"{layer:02d}" / str(block), views[(block * args.layers + layer) % len(views)])
            for block in range(args.blocks) for layer in range(args.layers)]
    for layer in range(args.layers):
        (folder / f"{layer:02d}").mkdir(parents=True)
    trailer = bytes(4)

    def write(job) -> None:
        path, view = job
        with open(path, "wb") as f:
            f.write(view)
            f.write(trailer)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, jobs))
    os.sync()
    return time.perf_counter() - start


def best_seconds(phases: dict, root: Path, repeats: int, nbytes: int) -> dict[str, float]:
    """The best time of each phase (name → phase(folder) → seconds) over ``repeats`` rounds,
    every other round in the reverse order; each phase's files are deleted after it."""
    best = {name: float("inf") for name in phases}
    for round_ in range(repeats):
        for name in list(phases) if round_ % 2 == 0 else list(phases)[::-1]:
            folder = root / f"{name.replace(' ', '-')}-{round_}"
            best[name] = min(best[name], phases[name](folder))
            shutil.rmtree(folder)
            os.sync()  # the deletion's journal and discards land here, not in the next timing
            print(f"round {round_} {name}: {nbytes / best[name] / 1e9:.2f} GB/s best so far",
                  file=sys.stderr)
    return best


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rows % CTX:
        raise SystemExit(f"--rows {args.rows} is not a multiple of {CTX}")
    nbytes = args.blocks * args.layers * args.rows * args.d * 2  # residual bytes per timing
    print(f"# {args.blocks} blocks x {args.layers} layers x {args.rows} x {args.d} fp16 "
          f"= {nbytes / 1e9:.2f} GB into {args.dir}; {platform.node()}, {os.cpu_count()} CPUs; "
          f"writer threads {args.threads}, buffers {args.buffers}", file=sys.stderr)
    buffers = host_buffers(args)
    root = Path(tempfile.mkdtemp(prefix="bench-writer-", dir=args.dir))
    phases = {"raw x1": lambda f: time_raw(f, buffers, args, 1),
              f"raw x{args.threads}": lambda f: time_raw(f, buffers, args, args.threads),
              "writer": lambda f: time_writer(f, buffers, args, True)}
    if args.zarr:
        phases["writer via zarr"] = lambda f: time_writer(f, buffers, args, False)
    try:
        best = best_seconds(phases, root, args.repeats, nbytes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rates = {name: nbytes / seconds / 1e9 for name, seconds in best.items()}
    raw = max(rates["raw x1"], rates[f"raw x{args.threads}"])
    for name, rate in rates.items():
        print(f"{name:16s} {rate:6.2f} GB/s")
    if args.zarr:
        print(f"zarr/raw {rates['writer via zarr'] / raw:.2f}")
    print(f"writer/raw {rates['writer'] / raw:.2f}")


if __name__ == "__main__":
    main()
