"""Learning-rate and L1 schedules, and the controller that steers L1 toward a target L0."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up over ``warmup`` steps, flat, then linear decay to 0 over the last
    ``decay_fraction`` of training (Anthropic, April 2024)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = total - int(total * decay_fraction)
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def l1_factor(step: int, warmup: int) -> float:
    """L1 coefficient ramps linearly from 0 over ``warmup`` steps."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


class L1Controller:
    """Proportional-integral controller on log λ toward a target L0 that it approaches
    gradually, run on the device (no host sync):

        ema ← β·ema + (1−β)·L0(batch)
        during the L1 warm-up: nothing else (the penalty is still ramping: no integral wind-up)
        at its end:  L0₀ = ema;  afterwards the target moves geometrically from L0₀ to the
        target over ``ramp`` steps:  target(t) = L0₀^(1−r) · target^r,  r = (t − warmup) / ramp
        e = log(ema / target(t));   I ← I + ki·e;   λ = λ₀ · exp(I + kp·e)

    Steering toward a target that moves with the SAE, instead of one far away, keeps the error
    small all along: λ never shoots up while L0 lags it, so reconstruction does not collapse
    (a fixed far target overshot λ by 500× within 200 steps). A fixed run (target None) keeps
    λ = λ₀.
    """

    def __init__(self, start: float, target: float | None, device, warmup: int = 0, ramp: int = 0,
                 ki: float = 0.02, kp: float = 1.0, beta: float = 0.9):
        self.start, self.target, self.ki, self.kp, self.beta = start, target, ki, kp, beta
        self.warmup, self.ramp = warmup, ramp
        self.coefficient = torch.tensor(start, dtype=torch.float32, device=device)
        self.ema = torch.tensor(-1.0, dtype=torch.float32, device=device)  # -1: no batch yet
        self.integral = torch.zeros((), dtype=torch.float32, device=device)
        self.l0_start = torch.tensor(-1.0, dtype=torch.float32, device=device)  # L0₀, once set

    @torch.no_grad()
    def update(self, l0: torch.Tensor, step: int) -> None:
        """l0: scalar tensor, this step's mean active features per token."""
        if self.target is None:
            return
        self.ema.copy_(torch.where(self.ema < 0, l0, self.beta * self.ema + (1 - self.beta) * l0))
        if step + 1 < self.warmup:
            return
        self.l0_start.copy_(torch.where(self.l0_start < 0, self.ema, self.l0_start))
        error = torch.log(self.ema.clamp_min(1e-3) / self.target_at(step))
        self.integral.add_(self.ki * error).clamp_(-30.0, 30.0)
        self.coefficient.copy_(self.start * torch.exp(self.integral + self.kp * error))

    def target_at(self, step: int) -> torch.Tensor:
        """The L0 steered toward at ``step`` (a scalar tensor on the device)."""
        r = min(1.0, max(0.0, (step + 1 - self.warmup) / self.ramp)) if self.ramp else 1.0
        start = self.l0_start.clamp_min(1e-3)
        return torch.exp((1 - r) * torch.log(start) + r * math.log(self.target))

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in _STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in _STATE:
            getattr(self, name).copy_(state[name])


_STATE = ("coefficient", "ema", "integral", "l0_start")
