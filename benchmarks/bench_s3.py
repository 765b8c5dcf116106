#!/usr/bin/env python
"""How fast a cache reads from an S3 server on this machine, against the same cache on disk.

Builds a one-layer cache of random fp16 rows through the Cache API in a temporary folder
(chunks of ``--chunk-rows`` × ``--d``, bytes + crc32c codecs as every uncompressed cache has),
copies its objects into a bucket of moto's S3 server, started here as a separate process on
127.0.0.1 (so its Python does not share the reader's GIL), and times one pass over the
training chunks (the last block is held out) with:

- s3fs ``cat`` of the chunk objects, no decoding, 1..N concurrent requests: the transport;
- zarr, one chunk per call (``arr[rows]``), from 1, 4 and 8 threads, local and S3;
- PrefetchReader on the CPU device with 1, 4 and 8 worker threads: local (plain ``preadv``
  + crc32c, the fast path) and S3 (zarr decodes through s3fs: the URL fallback).

The local files are read once first, so local figures are page-cache reads. moto keeps
objects in memory and serves them from one Python process: the S3 figures measure the
client path (aiobotocore, s3fs, zarr) plus that server, not a real object store's network.
Every figure is the best of ``--repeats`` passes, in GB/s of chunk data (GB = 1e9 bytes).

    python benchmarks/bench_s3.py                 # ~1-2 min, needs s3fs and moto[server]
    python benchmarks/bench_s3.py --blocks 6 --chunk-rows 4096   # quicker
    AWS_ENDPOINT_URL=https://… python benchmarks/bench_s3.py --url s3://my-bucket/bench.zarr

With ``--url`` no server is started: the cache is copied to that (empty) location on the
store the environment points at, measured there, and deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path


from synthetic_cache import make_cache  # benchmarks/ is on sys.path when run as a script

from saecache.storage.cache import Cache
from saecache.train.reader import PrefetchReader, ReaderConfig, split_blocks

LAYER = 0
CTX = 2048


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class MotoServer:
    """``moto_server`` in its own process on 127.0.0.1 at a free port."""

    def __enter__(self) -> MotoServer:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def best(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def zarr_pass(cache: Cache, blocks: list[int], threads: int) -> None:
    arr = cache.resid(LAYER)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: arr[cache.layout.block_rows(b)], blocks))


def reader_pass(cache: Cache, threads: int, mix: int) -> int:
    cfg = ReaderConfig(batch_size=4096, mix_chunks=mix, threads=threads, prefetch_groups=2)
    with PrefetchReader(cache, LAYER, cfg, "cpu") as reader:
        for _ in reader:
            pass
        return reader.bytes_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12, help="chunks in the cache (one is held out)")
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the local cache goes")
    parser.add_argument("--url", default=None, help="an empty s3:// location on the store the "
                        "environment points at (default: a moto server started here)")
    args = parser.parse_args()

    import s3fs

    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-s3-"))
    try:
        if args.url:
            run(args, folder, args.url, s3fs.S3FileSystem(skip_instance_cache=True), "given endpoint")
            return
        with MotoServer() as server:
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_ENDPOINT_URL=server.endpoint, AWS_DEFAULT_REGION="us-east-1",
                              AWS_EC2_METADATA_DISABLED="true")
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            run(args, folder, "s3://bench/cache.zarr", fs, f"moto {version('moto')} on 127.0.0.1")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, folder: Path, url: str, fs, server: str) -> None:
    log("building the local cache ...")
    local = make_cache(str(folder / "cache.zarr"), args.blocks, args.chunk_rows, args.d)
    remote_path = url.removeprefix("s3://").rstrip("/")
    if fs.exists(remote_path) and fs.find(remote_path):
        raise SystemExit(f"{url} is not empty: give an empty location")
    log("copying it into the bucket ...")
    t0 = time.perf_counter()
    files = sorted(p for p in (folder / "cache.zarr").rglob("*") if p.is_file())
    for path in files:
        fs.pipe_file(f"{remote_path}/{path.relative_to(folder / 'cache.zarr')}", path.read_bytes())
    upload_s = time.perf_counter() - t0
    try:
        measure(args, folder, local, Cache.open(url), fs, remote_path, server, len(files), upload_s)
    finally:
        fs.rm(remote_path, recursive=True)


def measure(args, folder: Path, local: Cache, remote: Cache, fs, remote_path: str, server: str,
            n_files: int, upload_s: float) -> None:

    train, _ = split_blocks(local.layout)
    blocks = [int(b) for b in train]
    arr = local.resid(LAYER)
    keys = [f"{arr.path}/{arr.metadata.encode_chunk_key((b, 0))}" for b in blocks]
    nbytes = sum((folder / "cache.zarr" / k).stat().st_size for k in keys)
    for k in keys:  # warm the page cache: local figures are memory reads, as the S3 server's are
        (folder / "cache.zarr" / k).read_bytes()
    gb = nbytes / 1e9
    rows = []

    for conc in (1, 4, 8):
        paths = [f"{remote_path}/{k}" for k in keys]
        secs = best(lambda: fs.cat(paths, batch_size=conc), args.repeats)
        rows.append(("s3fs cat, no decode", f"{conc} requests", "-", gb / secs))
        log(rows[-1])
    for threads in (1, 4, 8):
        for name, cache in (("local", local), ("s3", remote)):
            secs = best(lambda: zarr_pass(cache, blocks, threads), args.repeats)
            rows.append(("zarr arr[rows]", f"{threads} threads", name, gb / secs))
            log(rows[-1])
    for threads in (1, 4, 8):
        for name, cache in (("local", local), ("s3", remote)):
            secs = best(lambda: reader_pass(cache, threads, mix=4), args.repeats)
            rows.append(("PrefetchReader cpu", f"{threads} threads", name, gb / secs))
            log(rows[-1])

    print(f"### Reading a cache from S3 ({server}) vs local disk\n")
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"zarr {version('zarr')}, s3fs {version('s3fs')}, aiobotocore {version('aiobotocore')}; "
          f"{len(blocks)} training chunks of {args.chunk_rows} × {args.d} fp16 "
          f"({nbytes / len(blocks) / 2**20:.1f} MiB each, {gb:.3f} GB per pass); best of "
          f"{args.repeats}; upload of {n_files} objects took {upload_s:.1f} s.\n")
    print("| path | concurrency | store | GB/s |")
    print("| --- | --- | --- | --- |")
    for path, conc, store, rate in rows:
        print(f"| {path} | {conc} | {store} | {rate:.3f} |")


if __name__ == "__main__":
    main()
