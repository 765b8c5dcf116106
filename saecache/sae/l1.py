"""The units of ``--l1`` and their conversion to the other conventions (docs/l1-units.md).

saecache trains on inputs scaled so that E‖x‖ = √d and writes its loss as a mean over the
N·d elements of the batch:

    L = mean_nj (x − x̂)²  +  l1·√d · mean_n Σ_i f_ni ‖W_dec_i‖

Multiplied by d this is the Anthropic (April 2024) / SAELens-standard / dictionary-learning
loss ``mean_n ‖x − x̂‖² + λ · mean_n Σ_i f_ni ‖W_dec_i‖`` with

    λ_Anthropic = l1 · d^1.5

which is also how the coefficient of the early SAELens GPT-2 SAEs (MSE over elements divided
by ‖x‖, plain L1 on raw activations, unit-norm decoder) translates: the model card's 3e-4
and 8e-5 at d = 1024 are λ_Anthropic 9.8 and 2.6, the range those recipes use (≈ 5).
"""

from __future__ import annotations

import math

POWER = 1.5
"""λ_Anthropic = l1 · d^POWER."""
ANTHROPIC = "anthropic:"
"""Prefix of an --l1 value given as λ_Anthropic (``anthropic:5``)."""


def to_anthropic(l1: float, d: int) -> float:
    """λ_Anthropic of a saecache ``--l1`` coefficient at width d."""
    return l1 * d ** POWER


def from_anthropic(lam: float, d: int) -> float:
    """The saecache ``--l1`` coefficient of λ_Anthropic at width d."""
    return lam / d ** POWER


def loss_coefficient(l1: float, d: int) -> float:
    """The weight of the decoder-norm L1 term in saecache's per-element loss: λ_Anthropic / d."""
    return l1 * math.sqrt(d)
