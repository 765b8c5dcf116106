"""Training losses: ReLU SAEs with a decoder-norm-weighted L1 penalty, TopK SAEs with AuxK.

Both take the batch x the SAE saw (already scaled by the trainer) and its :class:`ForwardOutput`,
so that one forward pass serves the loss and the metrics. Under bf16 autocast the forward
outputs are bf16; the squared error is taken on fp32 differences (:func:`_error`), so every mse
is an fp32 mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from saecache.sae.activations import step

if TYPE_CHECKING:  # the model imports the architectures, which import these losses
    from saecache.sae.model import SAE, ForwardOutput

AUX_COEFF = 1 / 32
"""Weight of the AuxK term in the TopK loss (Gao et al. 2024)."""


class LossOutput(NamedTuple):
    """One batch's loss and its parts."""

    loss: Tensor
    """Scalar to backpropagate."""
    mse: Tensor
    """Scalar, detached: mean over rows and dims of (x − x̂)²."""
    sparsity: Tensor
    """Scalar, detached: relu: mean over rows of Σ_i acts_i·||W_dec_i||₂ (unweighted by l1_coeff);
    topk: 0."""
    aux: Tensor
    """Scalar, detached: topk: the AuxK loss before aux_coeff; relu: 0."""


def _wide(t: Tensor) -> torch.dtype:
    """The dtype a loss term of t is reduced in: fp32, or t's own if wider (float64 tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _error(x: Tensor, x_hat: Tensor) -> Tensor:
    """x − x̂ (N, d) in fp32 (at least): under bf16 autocast x̂ is bf16, and a bf16 difference
    would round every entry to 8 bits before the mean over N·d (4M) of its squares; in fp32
    the entries keep 24 bits and the mean is the fp32 reduction's. fp32 inputs: no copy."""
    dtype = _wide(x)
    return x.to(dtype) - x_hat.to(dtype)


def relu_l1_loss(sae: SAE, x: Tensor, out: ForwardOutput, l1_coeff: float) -> LossOutput:
    """Anthropic's April 2024 loss for ReLU SAEs, decoder norms in the penalty (not constrained):

        loss = mean_n( Σ_j (x_nj − x̂_nj)² ) / d  +  l1_coeff · mean_n( Σ_i f_ni · ||W_dec_i||₂ )

    where n runs over the N rows, j over the d dims and i over the F features. The first term is
    the plain mean of (x − x̂)² over all N·d entries.
    """
    mse = _error(x, out.x_hat).pow(2).mean()
    # (N, F) @ (F,) → (N,) → scalar; under autocast the (N,) products are bf16, their mean fp32
    sparsity = (out.acts @ sae.decoder_norms()).mean(dtype=_wide(out.acts))
    loss = mse + l1_coeff * sparsity
    return LossOutput(loss, mse.detach(), sparsity.detach(), torch.zeros_like(mse).detach())


def topk_aux_loss(sae: SAE, x: Tensor, out: ForwardOutput, dead: Tensor | None, aux_k: int,
                  aux_coeff: float = AUX_COEFF) -> LossOutput:
    """Gao et al. 2024's TopK loss: mse + aux_coeff · aux, with

        mse = mean over rows and dims of (x − x̂)²
        e   = x − x̂, detached: the residual error, the AuxK target
        ê   = Σ over the aux_k largest pre_acts among DEAD features (ReLU'd) of f_i · W_dec_i,
              with no b_dec
        aux = Σ_n ||e_n − ê_n||² / Σ_n ||e_n − mean_n(e)||²   (summed over the batch)

    and aux = 0 when `dead` (F,) bool marks no feature. Fewer than aux_k dead features: all
    of them are used. A batch whose errors have no variance (e.g. a single row) gives aux = 0.
    No host sync. ``dead`` None says that the caller knows on the host that nothing can be
    dead yet (fewer tokens seen than the dead window): aux = 0, and its term is not computed.
    """
    if aux_k < 1:
        raise ValueError(f"aux_k must be at least 1, got {aux_k}")
    diff = _error(x, out.x_hat)  # (N, d) fp32
    mse = diff.pow(2).mean()
    if dead is None:  # the same loss and gradients as an all-False mask, without the work
        aux = torch.zeros_like(mse)
    else:
        aux = _aux_term(sae, diff.detach(), out.pre_acts, dead, aux_k)
    loss = mse + aux_coeff * aux
    return LossOutput(loss, mse.detach(), torch.zeros_like(mse).detach(), aux.detach())


def _aux_term(sae: SAE, e: Tensor, pre_acts: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """The AuxK ratio (scalar) for residual error e (N, d); see :func:`topk_aux_loss`."""
    dead = dead.to(device=pre_acts.device, dtype=torch.bool)
    if dead.shape != pre_acts.shape[-1:]:
        raise ValueError(f"dead mask has shape {tuple(dead.shape)}, expected "
                         f"({pre_acts.shape[-1]},)")
    k = min(aux_k, pre_acts.shape[-1])
    live_masked = pre_acts.masked_fill(~dead, float("-inf"))  # (N, F): live features never chosen
    values, indices = torch.topk(live_masked, k, dim=-1, sorted=False)  # (N, k) each
    weights = torch.relu(values)  # (N, k); -inf (live, picked for want of dead) → 0
    # ê = Σ_k w_nk · W_dec[idx_nk] as one dense matmul of the weights scattered into (N, F).
    # Its memory is O(N·F): the (N, F) matrix, saved for the backward, and its gradient, 0.5 GiB
    # in bf16 at N = 4096, F = 32768 (1 GiB in fp32), where embedding_bag's backward allocated
    # an (N·k, d) fp32 scratch (8 GiB at k = 512, d = 1024). The weights keep pre_acts' dtype
    # (bf16 under autocast, where the matmul runs in bf16 anyway).
    dense = torch.zeros_like(pre_acts).scatter(-1, indices, weights)  # (N, F)
    e_hat = dense @ sae.W_dec  # (N, d), no b_dec
    num = _error(e, e_hat).pow(2).sum()
    den = (e - e.mean(dim=0)).pow(2).sum()
    ok = den > 0
    aux = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    return aux * dead.any()  # 0 when nothing is dead, without asking the host


def jumprelu_l0_loss(x: Tensor, out: ForwardOutput, l0_coeff: Tensor | float, threshold: Tensor,
                     bandwidth: float) -> LossOutput:
    """Rajamanoharan et al. 2024's JumpReLU loss, the L0 penalised directly:

        loss = mean over rows and dims of (x − x̂)²  +  l0_coeff · mean_n( Σ_i H(pre_ni − θ_i) )

    for thresholds θ (F,). H passes no gradient to the pre-activations and a straight-through
    one to θ (sae.activations.step, kernel width ``bandwidth``). ``sparsity`` is the L0 term
    before l0_coeff; ``aux`` is 0.
    """
    mse = _error(x, out.x_hat).pow(2).mean()
    # counts summed in fp32 at least: a bf16 sum (autocast) is exact only up to 256 features
    l0 = step(out.pre_acts, threshold, bandwidth).sum(dim=-1, dtype=_wide(out.pre_acts)).mean()
    loss = mse + l0_coeff * l0
    return LossOutput(loss, mse.detach(), l0.detach(), torch.zeros_like(mse).detach())
