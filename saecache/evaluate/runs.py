"""`saecache eval`: every chosen snapshot of every run, spliced on the cache's held-out sequences.

Results go to ``eval.json`` beside the run, keyed by snapshot file name; the held-out tokens
are the cache's own ``tokens`` of the blocks the run held out (never re-tokenised).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from saecache.core.atomic import write_json
from saecache.core.devices import default_device
from saecache.core.errors import SaecacheError
from saecache.core.settings import setting, validate
from saecache.evaluate.splice import evaluate_sae
from saecache.harvest.importer import IMPORTED, has_token_ids
from saecache.harvest.models import find_blocks, load_model
from saecache.sae.model import SAE
from saecache.storage.cache import Cache
from saecache.train.reader import heldout_seqs
from saecache.train.runfolder import RunFolder, RunRecord, Snapshot, find_runs


@dataclass
class EvalConfig:
    """What `saecache eval` evaluates, and how."""

    runs: str
    """A run folder, or a RUNS folder holding run folders."""
    model: str | None = None
    """Model to splice into. [default: the cache's model]"""
    cache: str | None = None
    """Cache with the held-out tokens. [default: from run.json]"""
    snapshot: str = "final"
    """final, all, or a name such as 50M."""
    max_seqs: int | None = setting(None, min=1)
    """Held-out sequences to use. [default: all]"""
    batch_size: int = setting(8, min=1)
    """Sequences per forward."""
    device: str = field(default_factory=default_device)
    """torch device. [default: cuda if available, else cpu]"""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a URL cache."""

    def __post_init__(self):
        validate(self)


def evaluate_runs(cfg: EvalConfig) -> dict[RunFolder, dict]:
    """Evaluate the chosen snapshot(s) of every run; returns {run: eval.json contents}."""
    plans = [(run, run.record(), run.select(cfg.snapshot)) for run in find_runs(cfg.runs)]
    for run, record, _ in plans:
        _check_imported(cfg, run, record)
    models: dict[tuple, nn.Module] = {}
    results = {}
    for run, record, snapshots in plans:
        model_id = cfg.model or record.model
        key = (model_id, record.cache["revision"], record.cache["dtype"])
        if key not in models:
            models = {key: load_model(model_id, key[1], key[2], cfg.device)}  # one model at a time
        results[run] = _evaluate_run(cfg, run, record, snapshots, models[key], model_id)
    return results


def _evaluate_run(cfg: EvalConfig, run: RunFolder, record: RunRecord, snapshots: list[Snapshot],
                  model: nn.Module, model_id: str) -> dict:
    layer, d = record.spec.layer, record.cache["d"]
    if model.config.hidden_size != d:
        raise SaecacheError(f"run {run.dir} has SAEs of width d={d}, but {model_id} has d="
                            f"{model.config.hidden_size}: pass the model its cache was harvested from")
    tokens = _heldout_tokens(cfg, record).to(cfg.device)
    _, blocks = find_blocks(model, model.config.num_hidden_layers)
    _check_fits(run, layer, tokens, blocks, model, model_id)
    data = {"snapshots": run.eval_results(), "model": model_id}
    for snapshot in snapshots:
        state = torch.load(snapshot.path, map_location="cpu", weights_only=True)
        sae = SAE.from_snapshot(state, device=cfg.device)
        result = evaluate_sae(model, blocks[layer], sae, tokens, cfg.batch_size)
        data["snapshots"][snapshot.path.name] = {"tokens_seen": state["cfg"].get("tokens_seen"),
                                                 **result._asdict()}
    write_json(run.eval, data)
    return data


def _check_fits(run: RunFolder, layer: int, tokens: torch.Tensor, blocks: nn.ModuleList,
                model: nn.Module, model_id: str) -> None:
    """One line, before any forward, when the model has no block ``layer`` or fewer embedding
    rows than the held-out tokens (N, ctx) need (an IndexError deep in torch otherwise)."""
    if layer >= len(blocks):
        n = len(blocks)
        raise SaecacheError(f"run {run.dir} is of layer {layer}, but {model_id} has {n} "
                            f"block{'s' if n != 1 else ''}: pass the model its cache was harvested from")
    vocab = model.get_input_embeddings().num_embeddings
    largest = int(tokens.max()) if tokens.numel() else -1
    if largest >= vocab:
        raise SaecacheError(f"the held-out tokens of run {run.dir} go up to id {largest}, but "
                            f"{model_id} has a vocabulary of {vocab}: pass the model its cache "
                            "was harvested from")


def _cache_of(cfg: EvalConfig, record: RunRecord) -> Cache:
    """The cache a run was trained on (or --cache)."""
    location = cfg.cache or record.cache_location
    if location is None:
        raise SaecacheError("run.json does not say where the run's cache is: pass --cache")
    return Cache.open(location, storage_options=cfg.storage_options)


def _heldout_tokens(cfg: EvalConfig, record: RunRecord) -> torch.Tensor:
    """(N, ctx) int64: the cache's held-out sequences, as the run left them out."""
    cache = _cache_of(cfg, record)
    with cache.where.lock(exclusive=False):  # refused while a harvest writes the cache
        seqs = heldout_seqs(cache.layout, record.train["holdout_fraction"])
        stop = seqs.stop if cfg.max_seqs is None else min(seqs.stop, seqs.start + cfg.max_seqs)
        return torch.from_numpy(cache.tokens[seqs.start:stop]).long()  # the store refuses a missing chunk


# ---- caches made by `saecache import` -------------------------------------------------------


def _check_imported(cfg: EvalConfig, run: RunFolder, record: RunRecord) -> None:
    """An imported cache has held-out tokens to splice on only if it was imported with its
    token ids, and a model only if --model names one: say so before any model loads."""
    if record.model != IMPORTED:
        return
    cache = _cache_of(cfg, record)
    if not has_token_ids(cache.provenance):
        raise SaecacheError(f"run {run.dir} trained on {cache.location}, imported without token ids: "
                            "CE loss needs them (import again with --tokens-file IDS); the run's "
                            "metrics.jsonl has its MSE, FVU and L0")
    if cfg.model is None:
        raise SaecacheError(f"run {run.dir} trained on {cache.location}, imported from files: pass "
                            "--model, the model its activations came from")
