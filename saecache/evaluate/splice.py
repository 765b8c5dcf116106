"""Splice an SAE into the model at its layer: CE loss recovered, KL and the SAE's own metrics.

For every batch of held-out sequences (read from the cache's ``tokens``, never re-tokenised)
three forwards run: clean; with the block's output replaced by the SAE's reconstruction
(spliced); with it replaced by zeros (zero-ablation). From them:

    CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    KL = mean over predicted tokens of KL(p_clean ‖ p_spliced)

and, from the SAE on the same residuals (raw units), L0, MSE, FVU, dead and dense fractions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saecache.sae.metrics import RunningMetrics
from saecache.sae.model import SAE

DENSE_THRESHOLD = 0.1  # a feature firing on more than 10% of tokens is dense


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
