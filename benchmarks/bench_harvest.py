"""Harvest throughput against its two limits, measured in the same run on the same machine.

    forward-only   the model's own forward (the blocks harvest runs, no hooks, no copies)
    raw write      plain sequential file writes of chunk-sized files into the target folder
    harvest        saecache's forward-and-write loop (tokenisation excluded: it runs once, before)

and reports harvest / min(forward-only, raw write expressed in tokens/s). Models have random
weights, built locally: `tiny` (the demo's GPT-NeoX) or `pythia-410m` (its exact shape).

    python benchmarks/bench_harvest.py --shape tiny --dir /tmp --dir /dev/shm
    python benchmarks/bench_harvest.py --shape pythia-410m --ctx 2048 --tokens 2M --device cuda \
        --dir /tmp --dir /dev/shm

`--stats` times only the per-sequence statistics of one (8, 2048, 1024) batch (one layer's
share of a forward): storage.stats.sequence_sums against the plain implementation it replaced
(kept in tests/reference.py), best of `--repeat`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from saecache.harvest.corpus import DatasetSpec
from saecache.harvest.config import HarvestConfig
from saecache.harvest.loop import harvest
from saecache.harvest.models import DTYPES
from saecache.demo.tiny import DEMO_TEXT, TinyModelConfig, build_tiny_model
from saecache.core.units import parse_count
from saecache.storage import stats

SHAPES = {
    "tiny": None,
    "mid": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096),
}


def build_model(shape: str, folder: Path) -> Path:
    """A saved model of the given shape with random weights and the tiny tokenizer."""
    tiny = build_tiny_model(folder / "tiny", TinyModelConfig(max_ctx=2048))
    if shape == "tiny":
        return tiny
    config = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                           use_parallel_residual=True, bos_token_id=0, eos_token_id=0, **SHAPES[shape])
    with torch.device("cpu"):
        GPTNeoXForCausalLM(config).half().save_pretrained(folder / shape)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / shape / name)
    return folder / shape


def make_text(folder: Path, tokens: int) -> Path:
    """A .txt dataset long enough for ``tokens`` (the demo text repeated)."""
    text = DEMO_TEXT.read_text()
    repeats = max(1, tokens // 6000 + 1)  # the demo text is ~7.6K tokens with the tiny tokenizer
    path = folder / "text.txt"
    path.write_text("\n\n".join([text.strip()] * repeats))
    return path


@torch.no_grad()
def forward_only(model_path: Path, ctx: int, batch: int, n_batches: int, device: str, dtype: str) -> float:
    """Tokens/s of the base model's forward on random tokens (the limit without storage)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype]).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=device)
    model.base_model(input_ids=ids, use_cache=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        model.base_model(input_ids=ids, use_cache=False)
    sync(device)
    return batch * ctx * n_batches / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_write(folder: Path, chunk_bytes: int, total_bytes: int) -> float:
    """Bytes/s of plain sequential writes of chunk-sized files (what a perfect writer gets)."""
    target = Path(tempfile.mkdtemp(dir=folder))
    data = os.urandom(chunk_bytes)
    start = time.perf_counter()
    for i in range(max(1, total_bytes // chunk_bytes)):
        with open(target / f"{i}", "wb") as f:
            f.write(data)
    seconds = time.perf_counter() - start
    written = max(1, total_bytes // chunk_bytes) * chunk_bytes
    shutil.rmtree(target)
    return written / seconds


def run_harvest(model: Path, text: Path, folder: Path, args) -> tuple[float, float, int, int, int]:
    """(tokens/s, bytes/s, bytes per token, bytes per chunk, bytes written) of saecache's
    forward-and-write loop."""
    cache = Path(tempfile.mkdtemp(dir=folder)) / "cache.zarr"
    cfg = HarvestConfig(cache=str(cache), model=str(model), dataset=DatasetSpec(str(text)),
                        tokens=args.tokens, ctx=args.ctx, batch_size=args.batch_size,
                        device=args.device, dtype=args.dtype, chunk_rows=args.chunk_rows,
                        writer_threads=args.writer_threads, progress=False)
    result = harvest(cfg)
    lay = result.cache.layout
    shutil.rmtree(cache.parent)
    per_token = len(lay.layers) * lay.d * 2
    return (result.tokens_harvested / result.seconds, result.bytes_written / result.seconds,
            per_token, lay.rows_per_block * lay.d * 2, result.bytes_written)


def time_stats(device: str, dtype: str, repeat: int, shape=(8, 2048, 1024)) -> dict:
    """Best-of-``repeat`` seconds of the old and new per-sequence statistics on one batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.reference import reference_sequence_sums

    x = torch.randn(shape, device=device).to(DTYPES[dtype])
    best = {}
    for name, fn in (("old", reference_sequence_sums), ("new", stats.sequence_sums)):
        fn(x)  # warm-up
        times = []
        for _ in range(repeat):
            sync(device)
            start = time.perf_counter()
            fn(x)
            sync(device)
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return dict(shape=list(shape), device=device, dtype=dtype, old_s=best["old"], new_s=best["new"],
                speedup=best["old"] / best["new"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--dir", action="append", help="target folder(s) for the cache")
    parser.add_argument("--tokens", type=parse_count, default=parse_count("256K"))
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--writer-threads", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--stats", action="store_true", help="time the statistics kernels only")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.stats:
        r = time_stats(args.device, args.dtype, args.repeat)
        print(f"stats {tuple(r['shape'])} {r['dtype']} on {r['device']} "
              f"(threads={torch.get_num_threads()}): old {1e3 * r['old_s']:.1f} ms, "
              f"new {1e3 * r['new_s']:.1f} ms, old/new {r['speedup']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.shape, Path(tmp))
        text = make_text(Path(tmp), args.tokens)
        n_batches = max(2, args.tokens // (args.batch_size * args.ctx))
        fwd = forward_only(model, args.ctx, args.batch_size, n_batches, args.device, args.dtype)
        rows = []
        for folder in args.dir or ["/tmp"]:
            tok_s, bytes_s, per_token, chunk_bytes, written = run_harvest(model, text, Path(folder), args)
            raw = raw_write(Path(folder), chunk_bytes, written)
            limit = min(fwd, raw / per_token)
            rows.append(dict(dir=folder, forward_tok_s=fwd, raw_write_bytes_s=raw, harvest_tok_s=tok_s,
                             harvest_bytes_s=bytes_s, limit_tok_s=limit, ratio=tok_s / limit,
                             bound="forward" if fwd <= raw / per_token else "disk"))
    print(f"shape={args.shape} ctx={args.ctx} batch={args.batch_size} tokens={args.tokens} "
          f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}")
    print("| target | forward-only tok/s | raw write MB/s | harvest tok/s | harvest MB/s | limit | harvest / limit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dir']} | {r['forward_tok_s']:,.0f} | {r['raw_write_bytes_s'] / 1e6:,.0f} | "
              f"{r['harvest_tok_s']:,.0f} | {r['harvest_bytes_s'] / 1e6:,.0f} | {r['bound']} | "
              f"{100 * r['ratio']:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))


if __name__ == "__main__":
    main()
