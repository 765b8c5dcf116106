"""`saecache eval`: splice each SAE into the model at its layer on the cache's held-out sequences.

For every batch of held-out sequences (read from the cache's ``tokens``, never re-tokenised)
three forwards run: clean; with the block's output replaced by the SAE's reconstruction
(spliced); with it replaced by zeros (zero-ablation). From them:

    CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    KL = mean over predicted tokens of KL(p_clean ‖ p_spliced)

and, from the SAE on the same residuals (raw units), L0, MSE, FVU, dead and dense fractions.
Results go to ``eval.json`` beside the run, keyed by snapshot file name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saecache.core.errors import SaecacheError
from saecache.core.devices import default_device
from saecache.sae.metrics import RunningMetrics
from saecache.harvest.models import find_blocks, load_model
from saecache.train.runfolder import RunPaths, atomic_write, read_json
from saecache.sae.model import SAE
from saecache.storage.cache import Cache
from saecache.train.reader import heldout_seqs

DENSE_THRESHOLD = 0.1  # a feature firing on more than 10% of tokens is dense


@dataclass
class EvalConfig:
    """What `saecache eval` evaluates, and how."""

    runs: str
    """A run folder, or a RUNS folder holding run folders."""
    model: str | None = None
    """Model to splice into (None: the model the cache was harvested from)."""
    cache: str | None = None
    """Cache holding the held-out tokens (None: where run.json says)."""
    snapshot: str = "final"
    """Which snapshot: final, all, or a name such as 50M."""
    max_seqs: int | None = None
    """Held-out sequences to use (None: all of them)."""
    batch_size: int = 8
    """Sequences per forward."""
    device: str = field(default_factory=default_device)
    """torch device."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a URL cache."""


class SpliceResult(NamedTuple):
    """One SAE's evaluation on held-out tokens."""

    ce_clean: float
    """Mean next-token cross-entropy (nats) of the unmodified model."""
    ce_spliced: float
    """Same, with the block's output replaced by the SAE's reconstruction."""
    ce_zero: float
    """Same, with the block's output replaced by zeros."""
    ce_loss_recovered: float
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 perfect, 0 as bad as zero-ablation."""
    kl: float
    """Mean KL(p_clean ‖ p_spliced) per predicted token (nats)."""
    l0: float
    mse: float
    """Mean squared error per element, raw activation units."""
    fvu: float
    dead_fraction: float
    """Features that never fired on these tokens."""
    dense_fraction: float
    """Features firing on more than 10% of these tokens."""
    tokens: int
    """Residual rows (tokens) the SAE metrics cover."""


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """The fraction of the CE increase from zero-ablation that the SAE recovers."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if gap else float("nan")


@contextmanager
def replaced_output(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, its output hidden states h become fn(h) for the rest of the model."""

    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T−1, V) float32 log-probabilities of each next token's distribution."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def _ce(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the actual next tokens: scalar."""
    return -logp.gather(-1, ids[:, 1:, None]).sum()


@torch.no_grad()
def evaluate_sae(model: nn.Module, block: nn.Module, sae: SAE, tokens: torch.Tensor,
                 batch_size: int) -> SpliceResult:
    """Splice ``sae`` (raw-activation weights) after ``block`` on tokens: (N, T) int64."""
    sums = torch.zeros(4, dtype=torch.float64)  # CE clean, CE spliced, CE zero, KL
    metrics, fired = RunningMetrics(), None
    captured: list[torch.Tensor] = []
    predicted = 0
    for batch in tokens.split(batch_size):

        def capture(h):
            captured.append(h)
            return h

        with replaced_output(block, capture):  # the clean forward, keeping the block's output
            clean = _next_token_logprobs(model, batch)
        x = captured.pop()  # (B, T, d) model dtype
        out = sae(x.reshape(-1, x.shape[-1]).float())  # raw units
        with replaced_output(block, lambda h: out.x_hat.reshape(h.shape).to(h.dtype)):
            spliced = _next_token_logprobs(model, batch)
        with replaced_output(block, torch.zeros_like):
            zero = _next_token_logprobs(model, batch)
        kl = (clean.exp() * (clean - spliced)).sum()
        sums += torch.stack([_ce(clean, batch), _ce(spliced, batch), _ce(zero, batch), kl]).double().cpu()
        predicted += batch.shape[0] * (batch.shape[1] - 1)
        metrics.update(x.reshape(-1, x.shape[-1]).float(), out.x_hat, out.acts)
        counts = (out.acts != 0).sum(dim=0)  # (F,) tokens each feature fired on
        fired = counts if fired is None else fired + counts
    ce_clean, ce_spliced, ce_zero, kl = (sums / predicted).tolist()
    m = metrics.summary()
    frequency = fired.double() / m.tokens
    return SpliceResult(ce_clean, ce_spliced, ce_zero, ce_loss_recovered(ce_clean, ce_spliced, ce_zero),
                        kl, m.l0, m.mse, m.fvu, float((fired == 0).double().mean()),
                        float((frequency > DENSE_THRESHOLD).double().mean()), m.tokens)


# ---- over run folders -------------------------------------------------------------------------


def run_folders(root: str | Path) -> list[Path]:
    """The run folders at ``root`` (itself, or its sub-folders holding run.json)."""
    root = Path(root)
    if RunPaths(root).config.exists():
        return [root]
    found = sorted(p.parent for p in root.glob(f"*/{RunPaths(root).config.name}"))
    if not found:
        raise SaecacheError(f"no runs in {root}: give a run folder or a RUNS folder from saecache train")
    return found


def snapshots_of(run: Path, which: str) -> list[Path]:
    """Snapshot files of a run: ``final``, ``all``, or one by name (``50M`` or the file name)."""
    files = RunPaths(run).snapshots()
    if not files:
        raise SaecacheError(f"run {run} has no snapshots: train it first")
    if which == "all":
        return files
    chosen = [f for f in files if f.name == which or f.stem.rsplit("_", 1)[1] == which]
    if not chosen:
        names = ", ".join(f.stem.rsplit("_", 1)[1] for f in files)
        raise SaecacheError(f"run {run} has no snapshot {which!r} (it has {names})")
    return chosen


def evaluate(cfg: EvalConfig) -> dict[Path, dict]:
    """Evaluate the chosen snapshot(s) of every run; returns {run: eval.json contents}."""
    runs = run_folders(cfg.runs)
    plans = [(run, read_json(RunPaths(run).config), snapshots_of(run, cfg.snapshot)) for run in runs]
    models: dict[tuple, nn.Module] = {}
    results = {}
    for run, record, snapshots in plans:
        model_id = cfg.model or record["cache"]["model"]
        key = (model_id, record["cache"]["revision"], record["cache"]["dtype"])
        if key not in models:
            models = {key: load_model(model_id, key[1], key[2], cfg.device)}  # one model at a time
        results[run] = _evaluate_run(cfg, run, record, snapshots, models[key], model_id)
    return results


def _evaluate_run(cfg: EvalConfig, run: Path, record: dict, snapshots: list[Path],
                  model: nn.Module, model_id: str) -> dict:
    layer, d = record["spec"]["layer"], record["cache"]["d"]
    if model.config.hidden_size != d:
        raise SaecacheError(f"run {run} has SAEs of width d={d}, but {model_id} has d="
                            f"{model.config.hidden_size}: pass the model its cache was harvested from")
    tokens = _heldout_tokens(cfg, record).to(cfg.device)
    _, blocks = find_blocks(model, model.config.num_hidden_layers)
    path = RunPaths(run).eval
    data = json.loads(path.read_text()) if path.exists() else {"snapshots": {}}
    data["model"] = model_id
    for snapshot in snapshots:
        state = torch.load(snapshot, map_location="cpu", weights_only=True)
        sae = SAE.from_snapshot(state, device=cfg.device)
        result = evaluate_sae(model, blocks[layer], sae, tokens, cfg.batch_size)
        data["snapshots"][snapshot.name] = {"tokens_seen": state["cfg"].get("tokens_seen"),
                                            **result._asdict()}
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))
    return data


def _heldout_tokens(cfg: EvalConfig, record: dict) -> torch.Tensor:
    """(N, ctx) int64: the cache's held-out sequences, as the run left them out."""
    location = cfg.cache or record.get("cache_location")
    if location is None:
        raise SaecacheError("run.json does not say where the run's cache is: pass --cache")
    cache = Cache.open(location, storage_options=cfg.storage_options)
    seqs = heldout_seqs(cache.layout, record["train"]["holdout_fraction"])
    stop = seqs.stop if cfg.max_seqs is None else min(seqs.stop, seqs.start + cfg.max_seqs)
    return torch.from_numpy(cache.tokens[seqs.start:stop]).long()
