"""The two data sets of bench_quality.py, each a saecache cache whose last blocks are held out.

- ``ground_truth``: activations built from known feature directions (synthetic_cache).
- ``real``: layer 1 of the demo's tiny GPT-NeoX (pretrained 300 steps on the bundled text),
  harvested by saecache. The bundled text is split by document (paragraph): the training
  blocks hold only training documents, the held-out blocks (the cache's last) only documents
  the training rows never contain.

Both are rebuilt only when their settings change (a ``dataset.json`` beside the cache).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthetic_cache import LAYER as GROUND_TRUTH_LAYER
from synthetic_cache import make_ground_truth_cache

from saecache.storage.cache import Cache
from saecache.train.config import ReaderConfig
from saecache.train.reader import read_heldout, split_blocks

REAL_LAYER = 1
REAL_CTX = 64
HELDOUT_DOC_FRACTION = 0.12  # of the bundled paragraphs, kept for the held-out blocks


@dataclass
class DataSet:
    """One cache to benchmark on, with everything the harness needs to know about it."""

    name: str
    title: str
    cache: Cache
    layer: int
    holdout_fraction: float
    """ReaderConfig.holdout_fraction that holds out exactly the blocks built as held out."""
    heldout: torch.Tensor
    """(H, d) float32 raw (unscaled) held-out rows."""
    directions: np.ndarray | None = None
    """(n_true, d) true feature directions (ground truth only)."""
    info: dict | None = None
    """Generator settings and facts for the report."""


def _reuse(folder: Path, settings: dict) -> bool:
    """Whether ``folder`` holds a complete build of exactly ``settings``; clears it otherwise."""
    record = folder / "dataset.json"
    if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
        try:
            return Cache.open(str(folder / "cache.zarr")).complete
        except Exception:  # a half-written folder from an interrupted build
            pass
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return False


def _holdout_fraction(n_blocks: int, n_held: int) -> float:
    """The ReaderConfig.holdout_fraction that holds out exactly the last ``n_held`` blocks."""
    fraction = n_held / n_blocks
    _, held = split_blocks(_Layout(n_blocks), fraction)
    assert len(held) == n_held, (n_blocks, n_held, fraction)
    return fraction


class _Layout:
    """Just enough of a CacheLayout for split_blocks."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks


def ground_truth(root: Path, *, d: int, n_true: int, train_tokens: int, heldout_tokens: int,
                 chunk_rows: int, mean_l0: float = 8.0, seed: int = 0) -> DataSet:
    """The ground-truth cache under ``root/ground_truth``."""
    folder = root / "ground_truth"
    train_blocks, held_blocks = train_tokens // chunk_rows, -(-heldout_tokens // chunk_rows)
    settings = dict(d=d, n_true=n_true, mean_l0=mean_l0, train_blocks=train_blocks,
                    held_blocks=held_blocks, chunk_rows=chunk_rows, seed=seed, version=1)
    location = str(folder / "cache.zarr")
    if _reuse(folder, settings):
        record = json.loads((folder / "dataset.json").read_text())
        cache, directions, info = Cache.open(location), np.load(folder / "directions.npy"), record["info"]
    else:
        truth = make_ground_truth_cache(location, d=d, n_true=n_true, blocks=train_blocks + held_blocks,
                                        chunk_rows=chunk_rows, mean_l0=mean_l0, seed=seed)
        cache, directions, info = truth.cache, truth.directions, truth.info
        np.save(folder / "directions.npy", directions)
        (folder / "dataset.json").write_text(json.dumps(dict(settings=settings, info=info), indent=1))
    fraction = _holdout_fraction(train_blocks + held_blocks, held_blocks)
    heldout = read_heldout(cache, GROUND_TRUTH_LAYER, ReaderConfig(holdout_fraction=fraction))
    title = (f"Ground truth: d = {d}, {n_true} true features (power-law firing, E[L0] = "
             f"{info['mean_l0']:g}), mean offset {100 * info['mean_fraction']:.0f}% of E‖x‖², "
             f"noise {100 * info['noise_fraction']:g}% of the signal")
    return DataSet("ground_truth", title, cache, GROUND_TRUTH_LAYER, fraction,
                   heldout[:heldout_tokens].float(), directions, info)


def _documents(tokenizer, seed: int) -> tuple[list[str], list[str], list[int], list[int]]:
    """(training paragraphs, held-out paragraphs, their token counts with EOS) of the demo text."""
    from saecache.demo.tiny import DEMO_TEXT, _paragraphs

    paragraphs = [p.strip("\n") for p in _paragraphs(DEMO_TEXT)]
    order = np.random.default_rng(seed).permutation(len(paragraphs))
    n_held = max(1, round(len(paragraphs) * HELDOUT_DOC_FRACTION))
    held = [paragraphs[i] for i in sorted(order[:n_held])]
    train = [paragraphs[i] for i in sorted(order[n_held:])]
    count = lambda docs: [len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in docs]
    return train, held, count(train), count(held)


def _repeat(docs: list[str], lengths: list[int], tokens: int, rng) -> list[str]:
    """Epochs of ``docs`` (each in a new random order) until they hold at least ``tokens``."""
    out, total = [], 0
    while total < tokens:
        for i in rng.permutation(len(docs)):
            out.append(docs[i])
            total += lengths[i]
            if total >= tokens:
                break
    return out


def real(root: Path, *, train_tokens: int, heldout_tokens: int, chunk_rows: int,
         seed: int = 0) -> DataSet:
    """Layer 1 of the tiny trained GPT-NeoX on the bundled text, under ``root/real``."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from saecache.demo.tiny import TinyModelConfig, build_tiny_model
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.corpus import DatasetSpec
    from saecache.harvest.loop import harvest

    folder = root / "real"
    model_cfg = TinyModelConfig(pretrain_steps=300)
    seqs_per_block = chunk_rows // REAL_CTX
    rows = seqs_per_block * REAL_CTX
    # one block more than the held-out rows need: the spill of training text is dropped below
    train_blocks, held_blocks = train_tokens // rows, -(-(heldout_tokens + REAL_CTX) // rows)
    settings = dict(model=str(model_cfg), train_blocks=train_blocks, held_blocks=held_blocks,
                    rows=rows, seed=seed, version=1)
    location = str(folder / "cache.zarr")
    if not _reuse(folder, settings):
        model = build_tiny_model(folder / "model", model_cfg)
        tokenizer = AutoTokenizer.from_pretrained(model)
        hf_logging.set_verbosity_error()  # paragraphs longer than max_ctx are only counted here
        train, held, train_len, held_len = _documents(tokenizer, seed)
        rng = np.random.default_rng([seed, 1])
        # training documents fill the training blocks (the last one may spill a little into
        # the first held-out block; those rows are left out of the held-out set below)
        docs = _repeat(train, train_len, train_blocks * rows, rng)
        n_train_docs = len(docs)
        docs += _repeat(held, held_len, held_blocks * rows + REAL_CTX, rng)
        corpus = folder / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        harvest(HarvestConfig(cache=location, model=str(model), dataset=DatasetSpec(str(corpus)),
                              tokens=(train_blocks + held_blocks) * rows, ctx=REAL_CTX,
                              layers=str(REAL_LAYER), batch_size=32, chunk_rows=rows,
                              dtype="float32", device="cpu", writer_threads=2, progress=False))
        info = dict(model=f"tiny GPT-NeoX {model_cfg}", documents=len(train) + len(held),
                    train_documents=len(train), heldout_documents=len(held),
                    n_train_stream_docs=n_train_docs)
        (folder / "dataset.json").write_text(json.dumps(dict(settings=settings, info=info), indent=1))
    record = json.loads((folder / "dataset.json").read_text())
    info = record["info"]
    cache = Cache.open(location)
    fraction = _holdout_fraction(train_blocks + held_blocks, held_blocks)
    heldout = read_heldout(cache, REAL_LAYER, ReaderConfig(holdout_fraction=fraction))  # (H, d)
    # keep only the held-out sequences that start in a held-out document (drops the spill)
    _, held_idx = split_blocks(cache.layout, fraction)
    first_seq = cache.layout.block_seqs(int(held_idx[0])).start
    source = cache.source[first_seq:cache.layout.n_seq]  # (n_held_seqs, 2): (doc, offset)
    keep = np.repeat(source[:, 0] >= info["n_train_stream_docs"], REAL_CTX)
    # a sequence starting in the last training document may run into held-out text: drop it too
    heldout = heldout[torch.from_numpy(keep)][:heldout_tokens]
    info = {**info, "heldout_rows_dropped": int((~keep).sum())}
    title = (f"Real: layer {REAL_LAYER} of the demo's tiny GPT-NeoX (d = {cache.layout.d}, "
             f"pretrained {model_cfg.pretrain_steps} steps) on the bundled text; held-out rows "
             f"from {info['heldout_documents']} documents never trained on")
    return DataSet("real", title, cache, REAL_LAYER, fraction, heldout.float(), None, info)
