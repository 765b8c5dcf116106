"""`saecache eval`: every chosen snapshot of every run, spliced on the cache's held-out sequences.

Results go to ``eval.json`` beside the run, keyed by snapshot file name; the held-out tokens
are the cache's own ``tokens`` of the blocks the run held out (never re-tokenised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
from saecache.storage.location import location_of
from saecache.storage.provenance import ancestors, resolve_model
from saecache.train.loop import run_identity
from saecache.train.reader import heldout_seqs
from saecache.train.runfolder import RunFolder, RunRecord, Snapshot, find_runs


@dataclass
class EvalConfig:
    """What `saecache eval` evaluates, and how."""

    runs: str
    """A run folder, or a RUNS folder holding run folders."""
    model: str | None = None
    """Model to splice into. [default: the cache's model]"""
    cache: str | None = setting(None, metavar="PATH")
    """The run's cache, where it is now (checked to be the one the run was trained on). [default: where run.json says]"""
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
    caches = {run: _cache_of(cfg, run, record) for run, record, _ in plans}  # all found, before any model
    for run, record, _ in plans:
        _check_imported(cfg, run, record, caches[run])
    models: dict[tuple, nn.Module] = {}
    results = {}
    for run, record, snapshots in plans:
        model_id = cfg.model or _model_of(run, record, caches[run])
        key = (model_id, record.cache["revision"], record.cache["dtype"])
        if key not in models:
            models = {key: load_model(model_id, key[1], key[2], cfg.device)}  # one model at a time
        results[run] = _evaluate_run(cfg, run, record, snapshots, models[key], model_id, caches[run])
    return results


def _model_of(run: RunFolder, record: RunRecord, cache: Cache) -> str:
    """The model the run's cache was harvested from: a local folder by its absolute path (a
    relative one of saecache before 0.3 looked for where the cache and the run are), else a Hub id."""
    model = resolve_model(record.model, ancestors(cache.location) + ancestors(str(run.dir)))
    if Path(model).is_absolute() and not Path(model).is_dir():
        raise SaecacheError(f"the model folder {model} that run {run.dir} was trained from does not "
                            "exist any more: pass --model, where that model is now")
    return model


def _evaluate_run(cfg: EvalConfig, run: RunFolder, record: RunRecord, snapshots: list[Snapshot],
                  model: nn.Module, model_id: str, cache: Cache) -> dict:
    layer, d = record.spec.layer, record.cache["d"]
    if model.config.hidden_size != d:
        raise SaecacheError(f"run {run.dir} has SAEs of width d={d}, but {model_id} has d="
                            f"{model.config.hidden_size}: pass the model its cache was harvested from")
    tokens = _heldout_tokens(cfg, record, cache).to(cfg.device)
    _, blocks = find_blocks(model, model.config.num_hidden_layers)
    _check_fits(run, layer, tokens, blocks, model, model_id)
    data = {"snapshots": run.eval_results(), "model": model_id}
    for snapshot in snapshots:
        state = torch.load(snapshot.path, map_location="cpu", weights_only=True)
        sae = SAE.from_snapshot(state, device=cfg.device)
        result = evaluate_sae(model, blocks[layer], sae, tokens, cfg.batch_size)
        data["snapshots"][snapshot.path.name] = {"tokens_seen": state["cfg"].get("tokens_seen"),
                                                 **result._asdict()}
    data["snapshots"] = dict(sorted(data["snapshots"].items(), key=lambda item: _order(item[0])))
    write_json(run.eval, data)
    return data


def _order(name: str) -> tuple[int, int]:
    """eval.json's snapshots by tokens, the final one last (an unknown name after them)."""
    snapshot = Snapshot.parse(Path(name))
    return (2, 0) if snapshot is None else snapshot.order


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


def _cache_of(cfg: EvalConfig, run: RunFolder, record: RunRecord) -> Cache:
    """The cache a run was trained on: --cache (checked to be that cache), or where run.json
    says it is."""
    if cfg.cache is not None:
        cache = Cache.open(cfg.cache, storage_options=cfg.storage_options)
        _check_same_cache(run, record, cache)
        return cache
    location = run.recorded_cache(record)
    if location is None:
        raise SaecacheError(f"run.json of run {run.dir} does not say where its cache is: pass "
                            "--cache PATH")
    if not location_of(location, cfg.storage_options).exists():
        raise SaecacheError(f"the cache run {run.dir} was trained on is not at {location} any more: "
                            "pass --cache PATH, where it is now")
    return Cache.open(location, storage_options=cfg.storage_options)


def _check_same_cache(run: RunFolder, record: RunRecord, cache: Cache) -> None:
    """Refuse a --cache that is not the run's: what the run recorded of its cache (provenance
    identity and layout, train.loop.run_identity) must be what this cache says of itself."""
    now = run_identity(cache, record.spec.layer)
    diffs = [key for key in record.cache if now.get(key) != record.cache[key]]
    if diffs:
        key = diffs[0]
        raise SaecacheError(f"--cache {cache.location} is not the cache run {run.dir} was trained on: "
                            f"its {key} is {now.get(key)!r}, the run's {record.cache[key]!r}; pass "
                            "the run's cache")


def _heldout_tokens(cfg: EvalConfig, record: RunRecord, cache: Cache) -> torch.Tensor:
    """(N, ctx) int64: the cache's held-out sequences, as the run left them out."""
    with cache.where.lock(exclusive=False):  # refused while a harvest writes the cache
        seqs = heldout_seqs(cache.layout, record.train["holdout_fraction"])
        stop = seqs.stop if cfg.max_seqs is None else min(seqs.stop, seqs.start + cfg.max_seqs)
        return torch.from_numpy(cache.tokens[seqs.start:stop]).long()  # the store refuses a missing chunk


# ---- caches made by `saecache import` -------------------------------------------------------


def _check_imported(cfg: EvalConfig, run: RunFolder, record: RunRecord, cache: Cache) -> None:
    """An imported cache has held-out tokens to splice on only if it was imported with its
    token ids, and a model only if --model names one: say so before any model loads."""
    if record.model != IMPORTED:
        return
    if not has_token_ids(cache.provenance):
        raise SaecacheError(f"run {run.dir} trained on {cache.location}, imported without token ids: "
                            "CE loss needs them (import again with --tokens-file IDS); the run's "
                            "metrics.jsonl has its MSE, FVU and L0")
    if cfg.model is None:
        raise SaecacheError(f"run {run.dir} trained on {cache.location}, imported from files: pass "
                            "--model, the model its activations came from")
