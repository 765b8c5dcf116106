"""Learning-rate and L1 schedules, and the controller that steers L1 toward a target L0."""

from __future__ import annotations

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
    """Proportional-integral controller on log λ, run on the device (no host sync):

        ema ← β·ema + (1−β)·L0(batch);   e = log(ema / target)
        I ← I + ki·e;                     λ = λ₀ · exp(I + kp·e)

    λ rises while recent batches are denser than the target and falls while sparser; the
    proportional term damps the overshoot a pure integral controller shows when the SAE's L0
    lags the coefficient. A fixed run (target None) keeps λ = λ₀.
    """

    def __init__(self, start: float, target: float | None, device, ki: float = 0.02,
                 kp: float = 1.0, beta: float = 0.9):
        self.start, self.target, self.ki, self.kp, self.beta = start, target, ki, kp, beta
        self.coefficient = torch.tensor(start, dtype=torch.float32, device=device)
        self.ema = torch.tensor(-1.0, dtype=torch.float32, device=device)  # -1: no batch yet
        self.integral = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, l0: torch.Tensor) -> None:
        """l0: scalar tensor, this batch's mean active features per token."""
        if self.target is None:
            return
        self.ema.copy_(torch.where(self.ema < 0, l0, self.beta * self.ema + (1 - self.beta) * l0))
        error = torch.log(self.ema.clamp_min(1e-3) / self.target)
        self.integral.add_(self.ki * error).clamp_(-30.0, 30.0)
        self.coefficient.copy_(self.start * torch.exp(self.integral + self.kp * error))

    def state_dict(self) -> dict:
        return {"coefficient": self.coefficient.clone(), "ema": self.ema.clone(),
                "integral": self.integral.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("coefficient", "ema", "integral"):
            getattr(self, name).copy_(state[name])
