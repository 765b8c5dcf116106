"""One SAE in training: its weights, Adam, L1 controller and firing statistics, and the step.

No files here (the run's folder is train.sister's); what differs between architectures is
asked of sae.archs. One step on x (B, d), normalised so that E‖x‖ = √d:

    lr ← schedule;  out = sae(x);  loss = arch.loss(…)      (bf16 autocast when asked)
    backward;  arch.before_step (topk: drop W_dec's parallel gradient);  clip;  Adam
    arch.after_step (topk: unit-norm decoder rows);  firing, controller, metrics on the device
"""

from __future__ import annotations

import contextlib

import torch

from saecache.sae.archs import LossTerms, arch_of
from saecache.sae.metrics import FiringStats, RunningMetrics, fire_counts
from saecache.sae.model import SAE, SAEConfig
from saecache.sae.spec import RunSpec
from saecache.train.config import TrainConfig
from saecache.train.schedule import L1Controller, l1_factor, lr_factor


def set_precision(precision: str) -> None:
    """What TrainConfig.precision means for the fp32 matmuls (process-wide, as torch's flags
    are): "tf32" lets CUDA run them on TF32 tensor cores; "fp32" and "bf16" keep them in full
    fp32 (bf16's matmuls are autocast's, in SAETrainer.step). The training loop and the
    training benchmark's on-device limit both set it through here, so they measure one step."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


class SAETrainer:
    """Trains one SAE of a layer; sister trainers take the same batches."""

    def __init__(self, spec: RunSpec, cfg: TrainConfig, d: int, mean: torch.Tensor | None = None):
        """``mean``: (d,) the layer's mean in training units, where b_dec starts (None: 0)."""
        self.spec, self.cfg, self.arch, self.d = spec, cfg, arch_of(spec.arch), d
        n_features = spec.expansion * d
        sae_cfg = SAEConfig(d=d, n_features=n_features, arch=spec.arch, k=spec.k,
                            apply_b_dec_to_input=self.arch.apply_b_dec_to_input)
        self.sae = SAE.initialized(sae_cfg, seed=cfg.seed, device=cfg.device, b_dec=mean)
        self.lr = cfg.learning_rate(n_features)
        cuda = torch.device(cfg.device).type == "cuda"
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr, fused=cuda or None)
        self.warmup = int(cfg.steps * cfg.lr_warmup)
        self.l1_warmup = int(cfg.steps * cfg.l1_warmup)
        self.controller = L1Controller(spec.l1 or 0.0, spec.target_l0, cfg.device,
                                       warmup=self.l1_warmup, ramp=int(cfg.steps * cfg.l0_ramp))
        self.firing = FiringStats(n_features, device=cfg.device)
        self.aux_k = cfg.aux_k or d // 2
        self.metrics = RunningMetrics()  # MSE, FVU, L0 since the last metrics line
        self._losses = torch.zeros(3, dtype=torch.float64, device=cfg.device)  # steps, Σloss, Σaux
        self._l1_now = 0.0
        self._lr = self.lr

    def step(self, x: torch.Tensor, step: int) -> None:
        """One optimiser step on x: (B, d) float32, normalised."""
        cfg = self.cfg
        lr = self.lr * lr_factor(step, cfg.steps, self.warmup, cfg.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = (torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
                    if cfg.precision == "bf16" else contextlib.nullcontext())
        with autocast:
            out = self.sae(x)
            loss = self.arch.loss(self.sae, x, out, self._terms(step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.loss.backward()
        self.arch.before_step(self.sae)
        # The loss is a mean over the batch's N·d elements, the Anthropic loss divided by d:
        # clipping its gradient at grad_clip / d is clipping the Anthropic loss's at grad_clip.
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip / self.d)
        self.optimizer.step()
        self.arch.after_step(self.sae, out)
        self._after_step(x, out, loss, lr, step)

    def _terms(self, step: int) -> LossTerms:
        if self.arch.penalised:
            self._l1_now = self.controller.coefficient * l1_factor(step, self.l1_warmup)
        return LossTerms(self._l1_now, self._dead, self.aux_k, self.cfg.aux_coeff)

    def _dead(self) -> torch.Tensor | None:
        """The dead mask, or None while fewer than dead_window tokens have been seen: then no
        feature can be dead (FiringStats.dead_mask is all False), and the host knows it."""
        window = self.cfg.dead_window
        return self.firing.dead_mask(window) if self.firing.tokens_seen >= window else None

    @torch.no_grad()
    def _after_step(self, x, out, loss, lr: float, step: int) -> None:
        # One pass over the (B, F) activations per step: the firing stats, the controller's L0
        # and the metrics' nonzero count all come from these (F,) counts.
        counts = fire_counts(out.acts.detach())  # (F,) int64
        nonzero = counts.sum()  # scalar int64: B·L0
        self.firing.add_counts(counts, x.shape[0])
        if self.controller.target is not None:  # fixed runs need no L0 per step
            self.controller.update(nonzero / x.shape[0], step)  # float32 mean L0
        self.metrics.update(x, out.x_hat.detach(), nonzero=nonzero)  # sums on the device, no sync
        self._losses += torch.stack([torch.ones((), device=x.device), loss.loss.detach().float(),
                                     loss.aux.float()]).double()
        self._lr = lr

    # ---- what it reports -----------------------------------------------------------------

    def metrics_line(self, step: int, timing: dict) -> dict:
        """One metrics line averaged over the steps since the last one (then reset)."""
        m = self.metrics.summary()
        n, loss, aux = self._losses.tolist()
        self.metrics.reset()
        self._losses.zero_()
        window = self.cfg.dead_window
        return {"step": step + 1, "tokens": (step + 1) * self.cfg.batch_size, "split": "train",
                "loss": loss / n, "mse": m.mse, "fvu": m.fvu, "l0": m.l0,
                "dead_fraction": self.firing.dead_fraction(window), "dead_window_tokens": window,
                "dense_fraction": self.firing.dense_fraction(),
                "l1_coefficient": float(self._l1_now) if self.arch.penalised else None,
                "l1_anthropic": self.arch.anthropic_lambda(float(self._l1_now), self.d),
                "aux": aux / n, "lr": self._lr, **timing}

    @torch.no_grad()
    def heldout_metrics(self, x: torch.Tensor, rows: int = 8192) -> dict:
        """MSE, FVU, L0 and never-firing fraction on x: (N, d) normalised, in slices, with the SAE
        in eval mode (batchtopk: its inference threshold), then back in train mode."""
        metrics = RunningMetrics()
        fired = torch.zeros(self.sae.cfg.n_features, dtype=torch.bool, device=x.device)
        self.sae.eval()
        try:
            for part in x.split(rows):
                out = self.sae(part)
                counts = fire_counts(out.acts)  # (F,): one pass over the (rows, F) activations
                metrics.update(part, out.x_hat, nonzero=counts.sum())
                fired |= counts > 0
        finally:
            self.sae.train()
        m = metrics.summary()
        return {"mse": m.mse, "fvu": m.fvu, "l0": m.l0, "rows": m.tokens,
                "dead_fraction": 1.0 - float(fired.float().mean())}

    def snapshot(self, scale: float, **extra) -> dict:
        """The snapshot dict (weights for raw activations) with the sparsity and ``extra``."""
        sparsity = self.arch.snapshot_sparsity(self.spec, float(self.controller.coefficient), self.d)
        return self.sae.snapshot(scale, layer=self.spec.layer, expansion=self.spec.expansion,
                                 **sparsity, **extra)

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (CPU and device tensors, weights_only-loadable)."""
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict(), "firing": self.firing.state_dict(),
                # the metrics line being accumulated: a checkpoint between two lines resumes it
                "window": {"metrics": self.metrics.state_dict(), "losses": self._losses.cpu().clone()}}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.firing.load_state_dict(state["firing"])
        if "window" in state:  # older checkpoints: the next line starts afresh
            self.metrics.load_state_dict(state["window"]["metrics"], self._losses.device)
            self._losses = state["window"]["losses"].to(self._losses.device, torch.float64).clone()
