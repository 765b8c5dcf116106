import os, torch
torch.set_num_threads(1)
from saecache.demo.tiny import build_tiny_model, TinyModelConfig, DEMO_TEXT
from saecache.harvest.corpus import DatasetSpec
from saecache.harvest.config import HarvestConfig
from saecache.harvest.loop import harvest
from saecache.train.loop import TrainConfig, train
m = build_tiny_model("model", TinyModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=300, max_ctx=64))
harvest(HarvestConfig(cache="cache.zarr", model=str(m), dataset=DatasetSpec(str(DEMO_TEXT)), tokens=1024, ctx=16,
        chunk_rows=64, batch_size=4, device="cpu", writer_threads=1, buffers=1, progress=False))
for r in train(TrainConfig(cache="cache.zarr", out="runs", layers=(1,), expansion=2, l1=("3e-4",), tokens=512,
        snapshots=(256,), batch_size=32, log_every=4, mix_chunks=2, reader_threads=1, device="cpu", progress=False, dead_window=128)):
    print(r.paths.dir, r.summary())
for r in train(TrainConfig(cache="cache.zarr", out="runs", layers=(0,), arch="topk", k=(4,), expansion=2, tokens=512,
        snapshots=(256,), batch_size=32, log_every=4, mix_chunks=2, reader_threads=1, device="cpu", progress=False, dead_window=128)):
    print(r.paths.dir, r.summary())
