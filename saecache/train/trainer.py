"""One training run: an SAE, its optimiser and controller, its log, snapshots and checkpoints."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch

from saecache.core.errors import SaecacheError
from saecache.sae.losses import relu_l1_loss, topk_aux_loss
from saecache.sae.metrics import FiringStats, RunningMetrics
from saecache.train.runfolder import (RunPaths, RunSpec, atomic_write, read_json, read_metrics,
                           snapshot_name, write_json)
from saecache.sae.model import SAE, SAEConfig
from saecache.train.schedule import L1Controller, l1_factor, lr_factor
from saecache.storage.cache import Cache

KEEP_CHECKPOINTS = 2  # the latest two: a kill between sister runs' saves leaves a common one


@dataclass(frozen=True)
class RunIdentity:
    """What a run was trained from and with; a resumed run must match it exactly."""

    train: dict
    """TrainConfig.identity(): hyper-parameters, seed, batch order settings."""
    cache: dict
    """The cache's provenance identity and layout."""
    scale: float
    """Input scale √d / E‖x‖ from the cache's statistics."""

    @classmethod
    def of(cls, cfg, cache: Cache, layer: int, scale: float) -> RunIdentity:
        p, lay = cache.provenance, cache.layout
        data = {"model": p.model, "revision": p.revision, "dtype": p.dtype,
                "vocab_hash": p.vocab_hash, "dataset": p.dataset, "dataset_config": p.dataset_config,
                "split": p.split, "dataset_revision": p.dataset_revision, "text_field": p.text_field,
                "token_budget": p.token_budget, "ctx": lay.ctx, "d": lay.d, "n_seq": lay.n_seq,
                "seqs_per_block": lay.seqs_per_block, "layer": layer}
        return cls(json.loads(json.dumps(cfg.identity())), data, scale)


class Run:
    """An SAE being trained on one layer with one configuration."""

    def __init__(self, paths: RunPaths, spec: RunSpec, identity: RunIdentity, cfg, d: int):
        self.paths, self.spec, self.identity, self.cfg = paths, spec, identity, cfg
        n_features = spec.expansion * d
        sae_cfg = SAEConfig(d=d, n_features=n_features, arch=spec.arch, k=spec.k,
                            apply_b_dec_to_input=spec.arch == "topk")
        self.sae = SAE.initialized(sae_cfg, seed=cfg.seed, device=cfg.device)
        cuda = torch.device(cfg.device).type == "cuda"
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, fused=cuda or None)
        self.controller = L1Controller(spec.l1 or 0.0, spec.target_l0, cfg.device)
        self.firing = FiringStats(n_features, device=cfg.device)
        self.aux_k = cfg.aux_k or d // 2
        self.warmup = int(cfg.steps * cfg.lr_warmup)
        self.l1_warmup = int(cfg.steps * cfg.l1_warmup)
        self.metrics = RunningMetrics()  # MSE, FVU, L0 since the last metrics line
        self._losses = torch.zeros(3, dtype=torch.float64, device=cfg.device)  # steps, Σloss, Σaux
        self._l1_now = 0.0
        self._lr = cfg.lr

    # ---- creating and resuming ---------------------------------------------------------------

    @classmethod
    def open(cls, paths: RunPaths, spec: RunSpec, identity: RunIdentity, cfg, d: int) -> Run:
        """A new run, or an existing one whose settings and cache match; refuses others."""
        record = {"spec": spec.to_json(), "train": identity.train, "cache": identity.cache,
                  "scale": identity.scale}
        if paths.config.exists():
            saved = read_json(paths.config)
            saved.pop("cache_location", None)  # where the cache was then; it may have moved
            diff = _first_difference(saved, record)
            if diff:
                raise SaecacheError(f"run {paths.dir} exists with other settings ({diff}): use the "
                                    "same settings to resume, or another --out")
        else:
            write_json(paths.config, {**record, "cache_location": cfg.cache})
        return cls(paths, spec, identity, cfg, d)

    @staticmethod
    def common_step(runs: list[Run]) -> int:
        """The latest step every run has a checkpoint for (0: start from scratch)."""
        common = set.intersection(*(set(run.paths.checkpoint_steps()) for run in runs))
        return max(common, default=0)

    def resume(self, step: int) -> None:
        """Load the checkpoint of ``step`` and cut the log back to it."""
        if step:
            state = torch.load(self.paths.checkpoint(step), map_location=self.cfg.device,
                               weights_only=True)
            self.sae.load_state_dict(state["sae"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.controller.load_state_dict(state["controller"])
            self.firing.load_state_dict(state["firing"])
        self._truncate_log(step * self.cfg.batch_size)

    def _truncate_log(self, tokens: int) -> None:
        if not self.paths.metrics.exists():
            return
        keep = [line for line in read_metrics(self.paths.metrics) if line["tokens"] <= tokens]
        atomic_write(self.paths.metrics,
                     lambda f: f.write("".join(json.dumps(l) + "\n" for l in keep).encode()))

    # ---- one step ----------------------------------------------------------------------------

    def step(self, x: torch.Tensor, step: int) -> None:
        """One optimiser step on x: (B, d) float32, normalised."""
        cfg = self.cfg
        lr = cfg.lr * lr_factor(step, cfg.steps, self.warmup, cfg.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = (torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
                    if cfg.precision == "bf16" else contextlib.nullcontext())
        with autocast:
            out = self.sae(x)
            loss = self._loss(x, out, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.loss.backward()
        if self.spec.arch == "topk":
            self.sae.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.spec.arch == "topk":
            self.sae.normalize_decoder_()
        self._after_step(x, out, loss, lr)

    def _loss(self, x, out, step: int):
        if self.spec.arch == "topk":
            dead = self.firing.dead_mask(self.cfg.dead_window)
            return topk_aux_loss(self.sae, x, out, dead, self.aux_k, self.cfg.aux_coeff)
        self._l1_now = self.controller.coefficient * l1_factor(step, self.l1_warmup)
        return relu_l1_loss(self.sae, x, out, self._l1_now)

    @torch.no_grad()
    def _after_step(self, x, out, loss, lr: float) -> None:
        acts = out.acts.detach()  # (B, F)
        self.firing.update(acts)
        self.controller.update((acts != 0).sum(dim=-1).float().mean())
        self.metrics.update(x, out.x_hat.detach().float(), acts)  # sums on the device, no sync
        self._losses += torch.stack([torch.ones((), device=x.device), loss.loss.detach().float(),
                                     loss.aux.float()]).double()
        self._lr = lr

    # ---- outputs -----------------------------------------------------------------------------

    def log(self, step: int, timing: dict) -> None:
        """Append one metrics line averaged over the steps since the last one."""
        m = self.metrics.summary()
        n, loss, aux = self._losses.tolist()
        self.metrics.reset()
        self._losses.zero_()
        window = self.cfg.dead_window
        line = {"step": step + 1, "tokens": (step + 1) * self.cfg.batch_size, "split": "train",
                "loss": loss / n, "mse": m.mse, "fvu": m.fvu, "l0": m.l0,
                "dead_fraction": self.firing.dead_fraction(window), "dead_window_tokens": window,
                "dense_fraction": self.firing.dense_fraction(),
                "l1_coefficient": float(self._l1_now) if self.spec.arch == "relu" else None,
                "aux": aux / n, "lr": self._lr, **timing}
        self._append(line)

    def _append(self, line: dict) -> None:
        self.paths.metrics.parent.mkdir(parents=True, exist_ok=True)
        with open(self.paths.metrics, "a") as f:
            f.write(json.dumps(line) + "\n")

    @torch.no_grad()
    def save_snapshot(self, step: int, tokens: int | None, heldout: torch.Tensor) -> None:
        """Write sae_layer{LL}_{SNAP}.pt (weights for raw activations) and held-out metrics."""
        tokens_seen = (step + 1) * self.cfg.batch_size
        state = self.sae.snapshot(
            self.identity.scale, layer=self.spec.layer, expansion=self.spec.expansion,
            l1=self.spec.l1 if self.spec.arch == "relu" else None, target_l0=self.spec.target_l0,
            l1_final=float(self.controller.coefficient) if self.spec.arch == "relu" else None,
            tokens_seen=tokens_seen, input_scale=self.identity.scale,
            model=self.identity.cache["model"], dataset=self.identity.cache["dataset"],
            ctx=self.identity.cache["ctx"], run=self.spec.name)
        path = self.paths.snapshot_path(self.spec.layer, tokens)
        atomic_write(path, lambda f: torch.save(state, f))
        self._append({"step": step + 1, "tokens": tokens_seen, "split": "heldout",
                      "snapshot": snapshot_name(self.spec.layer, tokens), **self.evaluate(heldout)})

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, rows: int = 8192) -> dict:
        """MSE, FVU, L0 and never-firing fraction on x: (N, d) normalised, in slices."""
        metrics = RunningMetrics()
        fired = torch.zeros(self.sae.cfg.n_features, dtype=torch.bool, device=x.device)
        for part in x.split(rows):
            out = self.sae(part)
            metrics.update(part, out.x_hat, out.acts)
            fired |= (out.acts != 0).any(dim=0)
        m = metrics.summary()
        return {"mse": m.mse, "fvu": m.fvu, "l0": m.l0, "rows": m.tokens,
                "dead_fraction": 1.0 - float(fired.float().mean())}

    def summary(self) -> str:
        """The last held-out metrics, in one line."""
        lines = read_metrics(self.paths.metrics) if self.paths.metrics.exists() else []
        heldout = [line for line in lines if line["split"] == "heldout"]
        if not heldout:
            return "no held-out metrics yet"
        m = heldout[-1]
        return (f"{m['snapshot']}: held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, "
                f"MSE {m['mse']:.4g} (normalised units)")

    def checkpoint(self, step: int) -> None:
        """Save everything needed to continue at ``step`` exactly; keep the latest two."""
        state = {"step": step, "sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "controller": self.controller.state_dict(), "firing": self.firing.state_dict()}
        atomic_write(self.paths.checkpoint(step), lambda f: torch.save(state, f))
        for old in self.paths.checkpoint_steps()[:-KEEP_CHECKPOINTS]:
            self.paths.checkpoint(old).unlink(missing_ok=True)


def _first_difference(saved: dict, requested: dict, prefix: str = "") -> str | None:
    """'train.lr: 0.0003 (saved) vs 0.001' for the first differing leaf, else None."""
    for key in sorted(set(saved) | set(requested)):
        a, b = saved.get(key), requested.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} there, not {b!r}"
    return None
