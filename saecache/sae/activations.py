"""The activations other than a plain ReLU, and the straight-through gradients of the jumps.

    topk_relu(pre, k)           each row's k largest pre-activations, ReLU'd       (topk)
    batch_topk_relu(pre, k)     the k·N largest of the whole (N, F) batch, ReLU'd  (batchtopk)
    threshold_relu(pre, θ)      pre·H(pre − θ)                   (batchtopk at inference; jumprelu)
    jumprelu(pre, θ, ε)         pre·H(pre − θ), with ∂/∂θ = −(θ/ε)·K((pre − θ)/ε)
    step(pre, θ, ε)             H(pre − θ),     with ∂/∂θ = −(1/ε)·K((pre − θ)/ε) and ∂/∂pre = 0

H is the Heaviside step (H(0) = 0) and K the rectangle kernel, 1 on (−½, ½) and 0 elsewhere:
the pseudo-derivatives of Rajamanoharan et al. 2024 ("Jumping ahead", section 4), which let
the threshold θ (F,) learn through the jump and through an L0 penalty; ∂ jumprelu/∂pre is
H(pre − θ), the jump itself passing no gradient to the pre-activations.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_relu(pre_acts: Tensor, k: int) -> Tensor:
    """(N, F): the k largest pre_acts of each row, ReLU'd, and zeros elsewhere."""
    values, indices = torch.topk(pre_acts, k, dim=-1, sorted=False)  # (N, k) each
    return torch.zeros_like(pre_acts).scatter(-1, indices, torch.relu(values))


def batch_topk_relu(pre_acts: Tensor, k: int) -> Tensor:
    """(N, F): the k·N largest pre_acts of the whole batch, ReLU'd, and zeros elsewhere: k
    active features per row on average (Bussmann et al. 2024), however they fall on the rows."""
    flat = pre_acts.reshape(-1)  # (N·F,)
    values, indices = torch.topk(flat, k * pre_acts.shape[0], sorted=False)  # (k·N,) each
    return torch.zeros_like(flat).scatter(0, indices, torch.relu(values)).view_as(pre_acts)


def threshold_relu(pre_acts: Tensor, threshold: Tensor) -> Tensor:
    """(N, F): pre_acts where they exceed threshold (F,), zeros elsewhere (no gradient to θ)."""
    return pre_acts * (pre_acts > threshold)


def _kernel(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """(N, F) rectangle kernel K((pre − θ)/ε): 1 within ε/2 of the threshold, 0 elsewhere."""
    u = (pre_acts - threshold) / bandwidth
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return threshold_relu(pre_acts, threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre_acts, threshold = ctx.saved_tensors
        kernel = _kernel(pre_acts, threshold, ctx.bandwidth)  # (N, F)
        grad_threshold = -(threshold / ctx.bandwidth) * kernel * grad  # (N, F), summed to (F,)
        return (grad * (pre_acts > threshold), grad_threshold.sum_to_size(threshold.shape)
                .to(threshold.dtype), None)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre_acts, threshold = ctx.saved_tensors
        grad_threshold = -_kernel(pre_acts, threshold, ctx.bandwidth) * grad / ctx.bandwidth
        return None, grad_threshold.sum_to_size(threshold.shape).to(threshold.dtype), None


def jumprelu(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """(N, F) pre·H(pre − θ) for threshold θ (F,), with the straight-through ∂/∂θ above."""
    return _JumpReLU.apply(pre_acts, threshold, bandwidth)


def step(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """(N, F) H(pre − θ) for threshold θ (F,): gradient to θ only, straight-through (above)."""
    return _Step.apply(pre_acts, threshold, bandwidth)


@torch.no_grad()
def update_running_threshold_(threshold: Tensor, acts: Tensor, rate: float) -> None:
    """Move threshold (F,) toward the smallest positive value of acts (N, F), in place:

        θ ← (1 − rate)·θ + rate·min(acts > 0)      (θ = 0, not yet estimated: θ ← the minimum)

    BatchTopK's inference threshold: the smallest activation a batch kept, averaged over
    batches (dictionary-learning's BatchTopKTrainer, SAELens' topk_threshold). A batch with
    nothing active leaves θ as it is. No host sync.
    """
    # in acts' own dtype: a minimum is exact in any dtype, and no fp32 copy of a bf16 (N, F)
    smallest = acts.detach().masked_fill(acts <= 0, float("inf")).amin()  # scalar
    smallest = smallest.to(threshold.dtype)
    moved = torch.where(threshold > 0, (1 - rate) * threshold + rate * smallest, smallest)
    threshold.copy_(torch.where(torch.isfinite(smallest), moved, threshold))
