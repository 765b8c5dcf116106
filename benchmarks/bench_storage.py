#!/usr/bin/env python
"""Choose the cache's chunk size, sharding and codecs by measurement.

Writes residual-stream-like float16 arrays of shape (rows, d) into Zarr v3 arrays laid out
several ways (chunk rows, codecs, sharding) in a target folder, and measures, for each layout:

- write GB/s from 1, 2 and 4 threads, each call writing one whole chunk (or shard);
- read GB/s from 1, 2 and 4 threads, each call reading one chunk, page cache warm;
- the compression ratio (logical bytes / bytes stored);
- bytes handed to the store per byte stored (> 1 when a write rewrites data already there);
- whether one inverted byte in a chunk file is noticed on read.

A "plain files" row per chunk size writes the same bytes with ``open(...).write``, one file
per chunk, and reads them back with ``os.preadv`` into a preallocated buffer: what a perfect
writer and reader could do on that folder. GB/s always counts logical (uncompressed) bytes,
GB = 1e9 bytes. Nothing is fsynced (zarr's local store does not fsync either).

    python benchmarks/bench_storage.py                       # a temp folder under /tmp, ~3 min
    python benchmarks/bench_storage.py --dir /tmp --dir /dev/shm --write-doc docs/benchmarks.md

The Markdown report goes to stdout, progress to stderr; ``--write-doc`` also puts the report
into the section ``## Cache layout: chunk size, sharding, codecs`` of that file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import Callable

import numcodecs
import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore, WrapperStore

SECTION = "## Cache layout: chunk size, sharding, codecs"
DOC_INTRO = (
    "# Benchmarks\n\n"
    "Measurements behind saecache's design choices. Each section is produced by a script in "
    "`benchmarks/`, names the machine it ran on and the command that reproduces it, and ends "
    "with the choice it supports.\n"
)
GB = 1e9
OUTLIER_SCALE = 50.0  # residual streams have a few dimensions ~50x larger than the rest
N_OUTLIERS = 3


# ----------------------------------------------------------------------------- data


def residual_like(rows: int, d: int, seed: int = 0, block_rows: int = 16384) -> np.ndarray:
    """Float16 (rows, d) array shaped like a residual stream, row-major.

    Each dimension is gaussian noise times its own lognormal scale; three dimensions are
    scaled a further 50x, like the outlier dimensions of real transformer residuals.
    Generated in row blocks so the float32 temporaries stay small.
    """
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(mean=0.0, sigma=0.5, size=d).astype(np.float32)  # (d,)
    scale[rng.choice(d, N_OUTLIERS, replace=False)] *= OUTLIER_SCALE
    out = np.empty((rows, d), dtype=np.float16)  # (rows, d)
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        noise = rng.standard_normal((r1 - r0, d), dtype=np.float32)  # (r1 - r0, d)
        out[r0:r1] = noise * scale
    return out


# ----------------------------------------------------------------------------- layouts

CODECS: dict[str, tuple[BytesBytesCodec, ...]] = {
    "none": (),
    "crc32c": (Crc32cCodec(),),
    "zstd1+crc32c": (ZstdCodec(level=1), Crc32cCodec()),
}


KIND_LABELS = {
    "plain": "plain files",
    "none": "zarr, no checksum",
    "crc32c": "zarr + crc32c",
    "zstd1+crc32c": "zarr + zstd (level 1) + crc32c",
    "check-empty": "zarr + crc32c, write_empty_chunks=False",
    "sharded": "zarr sharded + crc32c, whole-shard writes",
    "partial-shard": "zarr sharded + crc32c, one-chunk writes",
}


@dataclass(frozen=True)
class Layout:
    """One way to store the (rows, d) array: chunking, sharding, codecs and write pattern."""

    chunk_rows: int
    """Rows per chunk (the inner chunk when sharded); every chunk spans all d columns."""
    codecs: str = "crc32c"
    """Key of CODECS: the bytes-to-bytes codecs after BytesCodec (inside shards if sharded)."""
    shard_chunks: int = 0
    """Chunks per shard along rows; 0 means unsharded."""
    partial_writes: bool = False
    """Write one inner chunk per call into sharded arrays, instead of one whole shard."""
    write_empty_chunks: bool = True
    """zarr's write_empty_chunks; False makes zarr compare every chunk with the fill value."""
    data_fraction: float = 1.0
    """Share of --total-mib this layout writes (slow codecs write less)."""
    plain_files: bool = False
    """Not zarr: one plain file per chunk, written with open().write, read with os.preadv."""

    @property
    def kind(self) -> str:
        """Short name of what is compared: a key of KIND_LABELS."""
        if self.plain_files:
            return "plain"
        if self.shard_chunks:
            return "partial-shard" if self.partial_writes else "sharded"
        return self.codecs if self.write_empty_chunks else "check-empty"

    @property
    def write_variant(self) -> bool:
        """Differs from another layout only in how it writes: timed on 1 thread, reads skipped.

        Threads writing different chunks of one shard would also lose each other's updates.
        """
        return self.partial_writes or not self.write_empty_chunks

    @property
    def shard_rows(self) -> int:
        """Rows per shard, or per chunk when unsharded: the unit the row count must divide."""
        return self.chunk_rows * max(1, self.shard_chunks)

    @property
    def write_rows(self) -> int:
        """Rows each write call covers: a whole shard, unless writing partial shards."""
        return self.chunk_rows if self.partial_writes else self.shard_rows


def layouts_for(chunk_rows: list[int], shard_chunks: int) -> list[Layout]:
    """Every layout the benchmark measures, grouped by chunk rows."""
    out = []
    for rows in chunk_rows:
        out += [Layout(rows, codecs="none", plain_files=True),
                Layout(rows, codecs="none"),
                Layout(rows),
                Layout(rows, codecs="zstd1+crc32c", data_fraction=0.5),
                Layout(rows, write_empty_chunks=False)]
        if shard_chunks > 1:
            out += [Layout(rows, shard_chunks=shard_chunks),
                    Layout(rows, shard_chunks=shard_chunks, partial_writes=True)]
    return out


# ----------------------------------------------------------------------------- stores


class CountingStore(WrapperStore):
    """A store wrapper that adds up the bytes zarr hands to ``set``: what writing costs."""

    def __init__(self, store: LocalStore, tally: list[int] | None = None) -> None:
        super().__init__(store)
        self.tally = tally if tally is not None else [0]  # shared with copies zarr makes

    def _with_store(self, store: LocalStore) -> CountingStore:
        return type(self)(store, self.tally)

    async def set(self, key: str, value: Buffer) -> None:
        self.tally[0] += len(value)
        await self._store.set(key, value)


def create_array(path: Path, layout: Layout, shape: tuple[int, int]) -> zarr.Array:
    """A fresh, empty zarr v3 array at path laid out as the layout says."""
    shutil.rmtree(path, ignore_errors=True)
    d = shape[1]
    return zarr.create_array(
        store=CountingStore(LocalStore(path)),
        shape=shape,
        dtype="float16",
        chunks=(layout.chunk_rows, d),
        shards=(layout.shard_rows, d) if layout.shard_chunks else None,
        filters=(),
        serializer=BytesCodec(),
        compressors=CODECS[layout.codecs],
        fill_value=0,
        config={"write_empty_chunks": layout.write_empty_chunks},
    )


# ----------------------------------------------------------------------------- timing


def for_each_block(fn: Callable[[int], object], n_blocks: int, threads: int) -> None:
    """Call fn(i) for every block i: in order on this thread, or spread over a thread pool."""
    if threads == 1:
        for i in range(n_blocks):
            fn(i)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fn, range(n_blocks)))


def usable_threads(threads: list[int], n_blocks: int) -> list[int]:
    """The thread counts that have at least one block each to work on."""
    return [t for t in threads if t <= n_blocks]


def timed_gbs(nbytes: int, run: Callable[[], None],
              setup: Callable[[], None] = lambda: None) -> float:
    """GB/s of one run(), after setup() and a sync, both untimed."""
    setup()
    os.sync()  # flush earlier runs' dirty pages so their writeback is not billed here
    t0 = time.perf_counter()
    run()
    return nbytes / (time.perf_counter() - t0) / GB


def pread_into(path: Path, buf: memoryview) -> None:
    """Read the whole file at path into buf with os.preadv, looping over short reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], done)
            if n == 0:
                raise EOFError(f"{path} is shorter than {len(buf)} bytes")
            done += n
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- measurements


@dataclass
class Result:
    """What was measured for one layout in one folder; None where it does not apply."""

    layout: Layout
    rows: int
    nbytes: int  # logical bytes written and read, rows * d * 2
    write_gbs: dict[int, float] = field(default_factory=dict)  # threads -> GB/s
    read_gbs: dict[int, float] = field(default_factory=dict)  # threads -> GB/s
    ratio: float | None = None  # logical bytes / bytes stored
    amplification: float | None = None  # bytes handed to the store / bytes stored
    flipped_byte: str = "—"  # what reading did after one byte of a chunk file was inverted


def chunk_files(folder: Path, n_chunks: int) -> list[Path]:
    """Paths of the plain per-chunk files, chunk i in folder/chunk{i}."""
    return [folder / f"chunk{i}" for i in range(n_chunks)]


def time_plain_writes(folder: Path, cr: int, data: np.ndarray,
                      threads: list[int]) -> dict[int, float]:
    """Write GB/s per thread count of open().write, one new file per cr-row chunk."""
    files = chunk_files(folder, len(data) // cr)

    def remove_files() -> None:  # each timing creates its files, as zarr does
        for path in files:
            path.unlink(missing_ok=True)

    def write(i: int) -> None:
        with open(files[i], "wb") as f:
            f.write(data[i * cr:(i + 1) * cr])  # (cr, d), contiguous

    return {t: timed_gbs(data.nbytes, lambda: for_each_block(write, len(files), t),
                         setup=remove_files) for t in threads}


def time_plain_reads(folder: Path, cr: int, data: np.ndarray,
                     threads: list[int]) -> dict[int, float]:
    """Read GB/s per thread count of os.preadv into one preallocated buffer, cache warm."""
    files = chunk_files(folder, len(data) // cr)
    out = np.empty_like(data)  # (rows, d), preallocated read buffer

    def read(i: int) -> None:
        pread_into(files[i], memoryview(out[i * cr:(i + 1) * cr]).cast("B"))

    for_each_block(read, len(files), 1)  # warm the page cache
    assert np.array_equal(out, data), "plain files read back wrong"
    return {t: timed_gbs(data.nbytes, lambda: for_each_block(read, len(files), t))
            for t in threads}


def bench_plain(folder: Path, layout: Layout, data: np.ndarray, threads: list[int]) -> Result:
    """Plain chunk-sized files: what a perfect writer and reader could do in folder."""
    cr = layout.chunk_rows
    usable = usable_threads(threads, len(data) // cr)
    return Result(layout, len(data), data.nbytes,
                  write_gbs=time_plain_writes(folder, cr, data, usable),
                  read_gbs=time_plain_reads(folder, cr, data, usable),
                  ratio=1.0, amplification=1.0)


def time_zarr_writes(path: Path, layout: Layout, data: np.ndarray,
                     threads: list[int]) -> tuple[dict[int, float], zarr.Array, float]:
    """Write GB/s per thread count, into a fresh array each time (write variants: 1 thread).

    Returns the rates, the last array written, and the bytes it handed to the store per
    byte stored (2.5 means every byte was written 2.5 times on average).
    """
    wr, arrays = layout.write_rows, []

    def new_array() -> None:
        arrays.append(create_array(path, layout, data.shape))

    def write(i: int) -> None:
        arrays[-1][i * wr:(i + 1) * wr] = data[i * wr:(i + 1) * wr]  # (wr, d)

    usable = [1] if layout.write_variant else usable_threads(threads, len(data) // wr)
    rates = {t: timed_gbs(data.nbytes, lambda: for_each_block(write, len(data) // wr, t),
                          setup=new_array) for t in usable}
    array = arrays[-1]
    metadata_bytes = os.path.getsize(path / "zarr.json")  # written by create, counted too
    amplification = (array.store.tally[0] - metadata_bytes) / array.nbytes_stored()
    return rates, array, amplification


def time_zarr_reads(array: zarr.Array, data: np.ndarray,
                    threads: list[int]) -> dict[int, float]:
    """Read GB/s per thread count, one (inner) chunk per call, after one warming read."""
    cr = array.chunks[0]

    def read(i: int) -> np.ndarray:
        return array[i * cr:(i + 1) * cr]  # (cr, d)

    assert np.array_equal(array[:], data), "zarr read back wrong"  # also warms the cache
    return {t: timed_gbs(data.nbytes, lambda: for_each_block(read, len(data) // cr, t))
            for t in usable_threads(threads, len(data) // cr)}


def flipped_byte_outcome(path: Path, data: np.ndarray, shard_rows: int) -> str:
    """Invert the middle byte of the first chunk (or shard) file and read that data back.

    "detected" if zarr raises, "silently wrong" if it returns other values, "unchanged"
    if the byte did not matter. The file is left corrupted: call this last.
    """
    chunk_file = path / "c" / "0" / "0"  # default v3 key encoding: chunk (0, 0)
    with open(chunk_file, "r+b") as f:
        f.seek(os.path.getsize(chunk_file) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))
    try:
        back = zarr.open_array(LocalStore(path, read_only=True))[:shard_rows]  # (shard_rows, d)
    except Exception as exc:  # any failure to decode counts as noticing the damage
        return f"detected ({type(exc).__name__})"
    return "unchanged" if np.array_equal(back, data[:shard_rows]) else "silently wrong"


def bench_zarr(folder: Path, layout: Layout, data: np.ndarray, threads: list[int]) -> Result:
    """Every zarr measurement for one layout (only writes for write variants)."""
    path = folder / "array"
    writes, array, amplification = time_zarr_writes(path, layout, data, threads)
    result = Result(layout, len(data), data.nbytes, writes, amplification=amplification)
    if not layout.write_variant:
        result.read_gbs = time_zarr_reads(array, data, threads)
        result.ratio = data.nbytes / array.nbytes_stored()
        result.flipped_byte = flipped_byte_outcome(path, data, layout.shard_rows)
    return result


def bench_layout(folder: Path, layout: Layout, data: np.ndarray, threads: list[int]) -> Result:
    """Measure one layout on a whole number of shards of data, in a scratch subfolder."""
    unit = layout.shard_rows
    rows = int(len(data) * layout.data_fraction) // unit * unit
    scratch = Path(tempfile.mkdtemp(prefix="layout-", dir=folder))
    try:
        bench = bench_plain if layout.plain_files else bench_zarr
        return bench(scratch, layout, data[:rows], threads)
    finally:
        shutil.rmtree(scratch)


def fsync_write_gbs(folder: Path, data: np.ndarray, chunk_rows: int) -> float:
    """GB/s of writing data as chunk-sized plain files, each fsynced: what the device sustains."""
    scratch = Path(tempfile.mkdtemp(prefix="fsync-", dir=folder))
    try:
        os.sync()
        t0 = time.perf_counter()
        for i in range(len(data) // chunk_rows):
            with open(scratch / f"chunk{i}", "wb") as f:
                f.write(data[i * chunk_rows:(i + 1) * chunk_rows])
                os.fsync(f.fileno())
        return data.nbytes / (time.perf_counter() - t0) / GB
    finally:
        shutil.rmtree(scratch)


# ----------------------------------------------------------------------------- machine


def machine_facts() -> dict[str, str]:
    """CPU, memory and library versions of this machine, as lines for the report."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {
        "CPU": f"{len(os.sched_getaffinity(0))} cores usable (`nproc`), {cpu}",
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "software": (f"Python {platform.python_version()}, zarr {zarr.__version__}, "
                     f"numcodecs {numcodecs.__version__}, numpy {np.__version__}, "
                     f"Linux {platform.release()}"),
    }


def filesystem(folder: Path) -> str:
    """The filesystem holding folder, from `df -hT`: device, type, size and free space."""
    line = subprocess.run(["df", "-hT", str(folder)], capture_output=True, text=True,
                          check=True).stdout.splitlines()[-1]
    device, fstype, size, _used, avail, _pct, mount = line.split()[:7]
    return f"{fstype} on {device} mounted at {mount}, {size} ({avail} free)"


# ----------------------------------------------------------------------------- report


def rates(values: dict[int, float], threads: list[int]) -> str:
    """'1.23 / 2.01 / —': GB/s per thread count, a dash where it was not measured."""
    return " / ".join(f"{values[t]:.2f}" if t in values else "—" for t in threads)


def optional(value: float | None, fmt: str) -> str:
    """value formatted with fmt, or a dash when there is none."""
    return "—" if value is None else format(value, fmt)


def results_table(results: list[Result], threads: list[int]) -> str:
    """The Markdown table of every layout measured in one folder."""
    thr = "/".join(map(str, threads))
    lines = [f"| layout | chunk rows (MiB) | shard rows | codecs | data MiB | ratio | "
             f"write GB/s, {thr} threads | read GB/s, {thr} threads | "
             f"bytes written / stored | flipped byte |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | --- |"]
    for r in results:
        lay = r.layout
        chunk_mib = lay.chunk_rows * (r.nbytes / r.rows) / 2**20
        codecs = "plain `write` / `preadv`" if lay.plain_files else lay.codecs
        lines.append(
            f"| {KIND_LABELS[lay.kind]} | {lay.chunk_rows} ({chunk_mib:.0f}) | "
            f"{lay.shard_rows if lay.shard_chunks else '—'} | {codecs} | "
            f"{r.nbytes / 2**20:.0f} | {optional(r.ratio, '.3f')} | "
            f"{rates(r.write_gbs, threads)} | {rates(r.read_gbs, threads)} | "
            f"{optional(r.amplification, '.2f')} | {r.flipped_byte} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- findings

CARD_TOKENS = 300e6  # the model card's token budget: rows per layer of the real cache


def find(results: list[Result], kind: str, chunk_rows: int) -> Result | None:
    """The result for the layout of that kind at chunk_rows, if it was measured."""
    return next((r for r in results
                 if r.layout.kind == kind and r.layout.chunk_rows == chunk_rows), None)


def best(values: dict[int, float]) -> float:
    """The fastest rate over thread counts."""
    return max(values.values())


def choose_chunk_rows(results: list[Result]) -> int:
    """Smallest chunk rows whose crc32c best write and best read are both within 10% of the
    fastest size (smaller chunks shuffle finer and commit sooner), else the best balance."""
    crc = [r for r in results if r.layout.kind == "crc32c"]
    top_write = max(best(r.write_gbs) for r in crc)
    top_read = max(best(r.read_gbs) for r in crc)
    score = {r.layout.chunk_rows: min(best(r.write_gbs) / top_write, best(r.read_gbs) / top_read)
             for r in crc}
    good = [rows for rows, s in score.items() if s >= 0.9]
    return min(good) if good else max(score, key=score.get)


@dataclass
class Findings:
    """The ratios the recommendation rests on, at one chunk size in one folder.

    Speed ratios are "this layout's GB/s / the reference layout's GB/s"; 1 thread unless
    named "best" (fastest over thread counts). None where a layout was not measured.
    """

    chunk_rows: int
    crc_write_cost: float | None = None  # 1 - crc32c / no checksum, best write
    crc_read_cost: float | None = None  # same, best read
    zstd_ratio: float | None = None  # logical / stored bytes
    zstd_write: float | None = None  # zstd+crc32c / crc32c, best write
    zstd_read: float | None = None  # same, best read
    shard_write: float | None = None  # whole-shard sharded / unsharded crc32c, best write
    shard_read: float | None = None  # same, best read
    partial_write: float | None = None  # one-chunk writes / whole-shard writes, 1 thread
    partial_amplification: float | None = None  # bytes written per byte stored
    empty_check_write: float | None = None  # write_empty_chunks False / True, 1 thread
    zarr_vs_plain_write: float | None = None  # crc32c / plain files, best write
    zarr_vs_plain_read: float | None = None  # crc32c / plain preadv, best read
    flipped: dict[str, str] = field(default_factory=dict)  # layout kind -> outcome


def speed(a: Result | None, b: Result | None, attr: str,
          threads: int | None = 1) -> float | None:
    """a's rate / b's rate for attr ('write_gbs' or 'read_gbs') at threads (None: best)."""
    if a is None or b is None or not getattr(a, attr) or not getattr(b, attr):
        return None
    pick = best if threads is None else (lambda v: v[threads])
    return pick(getattr(a, attr)) / pick(getattr(b, attr))


def slowdown(ratio: float | None) -> float | None:
    """The share of speed lost, 1 - ratio: 0.12 when a layout runs at 0.88x."""
    return None if ratio is None else 1 - ratio


def findings(results: list[Result], rows: int) -> Findings:
    """Compare the layouts measured at chunk_rows = rows."""
    plain, none, crc, zstd, check_empty, shard, partial = (find(results, kind, rows) for kind in (
        "plain", "none", "crc32c", "zstd1+crc32c", "check-empty", "sharded", "partial-shard"))
    return Findings(
        chunk_rows=rows,
        crc_write_cost=slowdown(speed(crc, none, "write_gbs", None)),
        crc_read_cost=slowdown(speed(crc, none, "read_gbs", None)),
        zstd_ratio=zstd.ratio if zstd else None,
        zstd_write=speed(zstd, crc, "write_gbs", None),
        zstd_read=speed(zstd, crc, "read_gbs", None),
        shard_write=speed(shard, crc, "write_gbs", None),
        shard_read=speed(shard, crc, "read_gbs", None),
        partial_write=speed(partial, shard, "write_gbs"),
        partial_amplification=partial.amplification if partial else None,
        empty_check_write=speed(check_empty, crc, "write_gbs"),
        zarr_vs_plain_write=speed(crc, plain, "write_gbs", None),
        zarr_vs_plain_read=speed(crc, plain, "read_gbs", None),
        flipped={r.layout.kind: r.flipped_byte for r in results
                 if r.layout.chunk_rows == rows and r.flipped_byte != "—"},
    )


def pct(x: float | None) -> str:
    """0.123 -> '12%'."""
    return "—" if x is None else f"{x:.0%}"


def times(x: float | None) -> str:
    """1.234 -> '1.23×'."""
    return "—" if x is None else f"{x:.2f}×"


FINDING_ROWS: list[tuple[str, Callable[[Findings], str]]] = [
    ("crc32c cost vs no checksum: best write / read",
     lambda f: f"{pct(f.crc_write_cost)} / {pct(f.crc_read_cost)}"),
    ("zstd compression ratio (logical / stored bytes)", lambda f: times(f.zstd_ratio)),
    ("zstd + crc32c speed vs crc32c: best write / read",
     lambda f: f"{times(f.zstd_write)} / {times(f.zstd_read)}"),
    ("sharded (whole-shard writes) speed vs unsharded: best write / read",
     lambda f: f"{times(f.shard_write)} / {times(f.shard_read)}"),
    ("one-chunk writes into shards vs whole-shard writes: speed, 1 thread; "
     "bytes written per byte stored",
     lambda f: f"{times(f.partial_write)}; {optional(f.partial_amplification, '.2f')}"),
    ("write_empty_chunks=False vs True: write speed, 1 thread",
     lambda f: times(f.empty_check_write)),
    ("zarr + crc32c vs plain files: best write / read",
     lambda f: f"{times(f.zarr_vs_plain_write)} / {times(f.zarr_vs_plain_read)}"),
    ("flipped byte: no checksum / crc32c / zstd + crc32c / sharded",
     lambda f: " / ".join(f.flipped.get(k, "—") for k in
                          ("none", "crc32c", "zstd1+crc32c", "sharded"))),
]


def findings_table(per_folder: dict[str, Findings]) -> str:
    """Markdown table: one row per finding, one column per folder."""
    folders = list(per_folder)
    lines = [f"| at {next(iter(per_folder.values())).chunk_rows} chunk rows | "
             + " | ".join(f"`{p}`" for p in folders) + " |",
             "| --- |" + " --- |" * len(folders)]
    for label, show in FINDING_ROWS:
        lines.append(f"| {label} | " + " | ".join(show(per_folder[p]) for p in folders) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- recommendation

MIN_ZSTD_RATIO = 1.25  # compression must save a quarter of the disk to be the default ...
MIN_ZSTD_WRITE = 0.8  # ... and cost at most a fifth of the writer's speed
MIN_SHARD_GAIN = 1.1  # sharding must speed up both writes and reads by 10% to be the default


def recommend_codecs(f: Findings) -> str:
    """The checksum and compression bullets."""
    crc = (f"- **Checksum: crc32c on every chunk.** It costs {pct(f.crc_write_cost)} of the "
           f"best write speed and {pct(f.crc_read_cost)} of the best read speed; with it the "
           f"flipped byte was {f.flipped.get('crc32c', '—')}, without it "
           f"{f.flipped.get('none', '—')}.")
    use_zstd = (f.zstd_ratio or 0) >= MIN_ZSTD_RATIO and (f.zstd_write or 0) >= MIN_ZSTD_WRITE
    choice = "zstd level 1" if use_zstd else "none by default, zstd opt-in"
    zstd = (f"- **Compression: {choice}.** zstd stores {times(f.zstd_ratio)} fewer bytes but "
            f"writes at {times(f.zstd_write)} and reads at {times(f.zstd_read)} the speed of "
            f"uncompressed chunks (the default needs ≥ {MIN_ZSTD_RATIO}× and ≥ "
            f"{MIN_ZSTD_WRITE}× write speed). The data is synthetic: check the ratio on a real "
            f"cache before relying on it.")
    return crc + "\n" + zstd


def recommend_sharding(f: Findings, shard_chunks: int) -> str:
    """The sharding bullet."""
    if f.shard_write is None or f.shard_read is None:
        return (f"- **Sharding: not measured at {f.chunk_rows} chunk rows** (`--shard-chunks` "
                f"below 2, or less than two shards of data: raise `--total-mib`).")
    use = min(f.shard_write, f.shard_read) >= MIN_SHARD_GAIN
    return (f"- **Sharding: {'yes' if use else 'no'}.** Shards of {shard_chunks} chunks written "
            f"whole ran at {times(f.shard_write)} (write) and {times(f.shard_read)} (read) the "
            f"unsharded speed (the default needs ≥ {MIN_SHARD_GAIN}× on both). Writing one "
            f"chunk into a shard re-reads and rewrites the whole shard: "
            f"{optional(f.partial_amplification, '.2f')} bytes written per byte stored and "
            f"{times(f.partial_write)} the speed of whole-shard writes, so any shards must be "
            f"written whole, by one writer.")


def zarr_verdict(f: Findings) -> str:
    """Whether zarr or the folder bounds the reader and the writer."""
    versus_plain = (("reads", f.zarr_vs_plain_read), ("writes", f.zarr_vs_plain_write))
    slow = [name for name, x in versus_plain if x is not None and x < 0.7]
    if not slow:
        return "zarr adds little over the folder itself"
    return (f"zarr's own path, not the folder, bounds {' and '.join(slow)}, so the cache should "
            f"overlap several chunk reads and writes")


def recommendation(f: Findings, d: int, shard_chunks: int, folder: str) -> str:
    """Markdown bullets: the layout to use, each with the measurement behind it."""
    rows = f.chunk_rows
    files = CARD_TOKENS / rows
    chunk = (f"- **Chunks: {rows} rows × all {d} columns ({rows * d * 2 / 2**20:.0f} MiB).** "
             f"The smallest chunk whose crc32c write and read speeds (best over threads) are "
             f"within 10% of the fastest size measured; smaller chunks shuffle finer and commit "
             f"sooner. The model card's 300M tokens make {files:,.0f} chunk files per layer.")
    empty = (f"- **write_empty_chunks=True.** zarr's default (False) compares every dense chunk "
             f"with the fill value: {times(f.empty_check_write)} the write speed.")
    reader = (f"- **Zarr's overhead.** Through zarr, reads reach {times(f.zarr_vs_plain_read)} "
              f"and writes {times(f.zarr_vs_plain_write)} the speed of plain files on the same "
              f"folder (best over threads): {zarr_verdict(f)}.")
    return "\n".join([f"From `{folder}`:", "", chunk, recommend_codecs(f),
                      recommend_sharding(f, shard_chunks), empty, reader])


# ----------------------------------------------------------------------------- document


@dataclass
class FolderRun:
    """Everything measured in one target folder."""

    folder: str
    filesystem: str
    fsync_gbs: float  # plain chunk files, each fsynced, 1 thread
    load: tuple[float, float]  # 1-minute load average before and after: other work running
    spread: float  # median of 1 - slowest / fastest pass over every figure
    results: list[Result]  # the best of all passes


def method_paragraph(args: argparse.Namespace, rows: int) -> str:
    """What was written and how it was timed, in one paragraph."""
    return (
        f"Data: float16 arrays of {rows} × {args.d} (`--total-mib {args.total_mib}`; zstd layouts "
        f"half of it), row-major, residual-stream-like: gaussian noise times a lognormal scale "
        f"per dimension, with {N_OUTLIERS} dimensions {OUTLIER_SCALE:.0f}× larger. Zarr v3 "
        f"arrays use `serializer=BytesCodec()`, the codecs listed as `compressors=` (inside "
        f"the shard when sharded), chunks spanning all columns, and `write_empty_chunks=True` "
        f"unless stated. Each write or read call covers one chunk (one shard for whole-shard "
        f"writes) and the calls are spread over a `ThreadPoolExecutor` of "
        f"{args.threads.replace(',', ', ')} threads; the rows that differ only in how they "
        f"write are timed on one thread and not read. Writes go into a fresh array, reads are "
        f"timed after one warming read (page cache warm) that also checks the data. Each "
        f"figure is the best of {args.passes} passes over all layouts, interleaved so that "
        f"other work on the machine does not land on one layout's every timing. GB/s counts "
        f"logical bytes (GB = 10⁹ B); nothing is fsynced, as zarr's store does not fsync. "
        f"\"bytes written / stored\": bytes zarr handed to the store during the write per byte "
        f"stored at the end. \"flipped byte\": one byte in the middle of the first chunk (or "
        f"shard) file inverted, then that data read back.")


def machine_lines(runs: list[FolderRun]) -> str:
    """Markdown bullets naming the machine and each folder's filesystem."""
    lines = [f"- {k}: {v}" for k, v in machine_facts().items()]
    lines += [f"- `{r.folder}`: {r.filesystem}; plain chunk files written with an fsync each: "
              f"{r.fsync_gbs:.2f} GB/s; 1-minute load average {r.load[0]:.1f} before the run, "
              f"{r.load[1]:.1f} after; a figure's passes differ by {r.spread:.0%} (median of "
              f"1 − slowest / fastest), so smaller differences between rows are noise"
              for r in runs]
    return "\n".join(lines)


def render_section(args: argparse.Namespace, runs: list[FolderRun], rows: int,
                   command: str) -> str:
    """The whole Markdown section: method, machine, command, tables, recommendation."""
    chosen = choose_chunk_rows(runs[0].results)
    per_folder = {r.folder: findings(r.results, chosen) for r in runs}
    parts = [SECTION, method_paragraph(args, rows), "Machine:", machine_lines(runs),
             "Reproduce (from the repository root):", f"    {command}"]
    threads = parse_ints(args.threads)
    for run in runs:
        parts += [f"### `{run.folder}`", results_table(run.results, threads)]
    parts += ["### Findings", findings_table(per_folder), "### Recommendation",
              recommendation(per_folder[runs[0].folder], args.d, args.shard_chunks,
                             runs[0].folder)]
    return "\n\n".join(parts) + "\n"


def write_section(doc: Path, section: str) -> None:
    """Put section into doc, replacing the section of the same title if there is one.

    The file is written to a temporary name and renamed, so a crash leaves the old one.
    """
    text = doc.read_text() if doc.exists() else DOC_INTRO
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))  # the next level-2 section, if any
        text = text[:start] + section + ("" if end < 0 else text[end:])
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(doc.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, doc)


# ----------------------------------------------------------------------------- main


def parse_ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", action="append", type=Path,
                   help="folder to measure (repeatable; a scratch subfolder is made and "
                        "removed); default: the system temp folder, usually /tmp")
    p.add_argument("--d", type=int, default=1024, help="columns (model width), default 1024")
    p.add_argument("--total-mib", type=int, default=512,
                   help="MiB of float16 data per layout (zstd layouts half), default 512")
    p.add_argument("--chunk-rows", default="4096,16384,65536", help="chunk sizes in rows")
    p.add_argument("--shard-chunks", type=int, default=4,
                   help="chunks per shard in the sharded layouts (0 or 1: no sharded layouts)")
    p.add_argument("--threads", default="1,2,4", help="thread counts to time")
    p.add_argument("--passes", type=int, default=2,
                   help="passes over all layouts; each figure is the best of its passes")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    p.add_argument("--write-doc", type=Path, metavar="PATH",
                   help=f"also write the report as the section '{SECTION}' of PATH")
    return p.parse_args(argv)


def progress(layout: Layout, message: str) -> None:
    """One progress line on stderr about layout."""
    print(f"  {KIND_LABELS[layout.kind]}, {layout.chunk_rows} rows: {message}", file=sys.stderr)


def faster(a: Result, b: Result) -> Result:
    """a with each rate replaced by b's where b's is higher: the best of two passes."""

    def top(x: dict[int, float], y: dict[int, float]) -> dict[int, float]:
        return {t: max(x[t], y[t]) for t in x}

    return replace(a, write_gbs=top(a.write_gbs, b.write_gbs), read_gbs=top(a.read_gbs, b.read_gbs))


def fits(layout: Layout, rows: int) -> bool:
    """Whether rows of data give the layout at least two shards (or chunks) to write."""
    return int(rows * layout.data_fraction) >= 2 * layout.shard_rows


def measure_pass(folder: Path, layouts: list[Layout], data: np.ndarray,
                 threads: list[int]) -> list[Result]:
    """Time every layout once, each in its own scratch subfolder of folder."""
    results = []
    for layout in layouts:
        t0 = time.perf_counter()
        r = bench_layout(folder, layout, data, threads)
        results.append(r)
        progress(layout, f"write {rates(r.write_gbs, threads)}, read "
                 f"{rates(r.read_gbs, threads)} GB/s ({time.perf_counter() - t0:.1f} s)")
    return results


def pass_spread(passes: list[list[Result]]) -> float:
    """Median over every figure of 1 - slowest pass / fastest pass: how much timings wander."""
    spreads = []
    for same_layout in zip(*passes):  # one layout's results, one per pass
        for attr in ("write_gbs", "read_gbs"):
            for t in getattr(same_layout[0], attr):
                values = [getattr(r, attr)[t] for r in same_layout]
                spreads.append(1 - min(values) / max(values))
    return float(np.median(spreads)) if spreads else 0.0


def measure_folder(folder: Path, layouts: list[Layout], data: np.ndarray,
                   threads: list[int], passes: int, fsync_rows: int) -> FolderRun:
    """Best of several passes over all layouts, so that load from other processes on the
    machine lands on different layouts in different passes rather than on one layout's
    every timing."""
    for skipped in (lay for lay in layouts if not fits(lay, len(data))):
        progress(skipped, "skipped, less than two shards of data")
    layouts = [lay for lay in layouts if fits(lay, len(data))]
    scratch = Path(tempfile.mkdtemp(prefix="saecache-bench-", dir=folder))
    load_before = os.getloadavg()[0]
    try:
        all_passes = []
        for n in range(passes):
            print(f"{folder}: pass {n + 1} of {passes}", file=sys.stderr)
            all_passes.append(measure_pass(scratch, layouts, data, threads))
        fsync = fsync_write_gbs(scratch, data, fsync_rows)
        best_results = [reduce(faster, same_layout) for same_layout in zip(*all_passes)]
        return FolderRun(str(folder), filesystem(folder), fsync,
                         (load_before, os.getloadavg()[0]), pass_spread(all_passes),
                         best_results)
    finally:
        shutil.rmtree(scratch)


def main(argv: list[str] | None = None) -> None:
    """Measure every folder, print the report, and write it into the doc if asked."""
    args = parse_args(argv)
    folders = args.dir or [Path(tempfile.gettempdir())]
    chunk_rows, threads = parse_ints(args.chunk_rows), parse_ints(args.threads)
    rows = args.total_mib * 2**20 // (2 * args.d)
    t0 = time.perf_counter()
    data = residual_like(rows, args.d, args.seed)  # (rows, d) float16
    print(f"generated {data.nbytes / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    fsync_rows = sorted(chunk_rows)[len(chunk_rows) // 2]  # the middle size
    layouts = layouts_for(chunk_rows, args.shard_chunks)
    runs = [measure_folder(f, layouts, data, threads, args.passes, fsync_rows) for f in folders]
    command = "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    section = render_section(args, runs, rows, command)
    print(section)
    if args.write_doc:
        write_section(args.write_doc, section)
        print(f"wrote the section into {args.write_doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
