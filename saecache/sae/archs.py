"""The SAE architectures, one object each, holding everything that differs between them.

Code elsewhere asks its architecture (``arch_of(spec.arch)``) and never compares arch strings:
the activation, the initial decoder norm, the loss and the constraints applied around the
optimiser step, how a run of it is named and described, and its SAELens equivalent.

    relu   f = ReLU(pre)                 loss = MSE + λ·Σ f_i‖W_dec_i‖    (Anthropic, April 2024)
    topk   f = ReLU(TopK_k(pre))         loss = MSE + aux_coeff·AuxK     (Gao et al. 2024)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from saecache.core.units import format_coefficient
from saecache.sae import l1 as l1_units
from saecache.sae.losses import LossOutput, relu_l1_loss, topk_aux_loss

if TYPE_CHECKING:  # types only: the model imports this module
    from saecache.sae.model import SAE, ForwardOutput, SAEConfig

DEFAULT_ADAPTIVE_START = 5e-4  # the model card's adaptive run starts at 5e-4
_ADAPTIVE = re.compile(r"^adaptive:([0-9.eE+-]+)(?::([0-9.eE+-]+))?$")


class LossTerms(NamedTuple):
    """What a training step knows that a loss may need."""

    l1: Tensor | float
    """The sparsity coefficient in force at this step, after its warm-up (penalised archs)."""
    dead: Callable[[], Tensor]
    """(F,) bool mask of dead features, computed only when asked for."""
    aux_k: int
    """AuxK: dead features used to model the residual error."""
    aux_coeff: float
    """AuxK loss weight."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Architecture:
    """The behaviour shared by every architecture; subclasses override what differs."""

    name = ""
    """The --arch value and the ``arch`` of snapshots and run.json."""
    help = ""
    """One phrase for --help."""
    title = ""
    """How the model card names it."""
    init_norm = 1.0
    """Decoder row norm at initialisation."""
    apply_b_dec_to_input = False
    """Whether b_dec is subtracted from x before encoding."""
    penalised = False
    """Whether the run has an L1 coefficient (logged, saved in snapshots)."""
    saelens = ""
    """The SAELens architecture with the same inference forward pass."""

    def check(self, cfg: SAEConfig) -> None:
        """Raise ValueError when ``cfg`` is not a valid SAE of this architecture."""
        if cfg.k is not None:
            raise ValueError(f"k is only for arch 'topk'; arch {self.name!r} got k={cfg.k!r}")

    def activate(self, pre_acts: Tensor, cfg: SAEConfig) -> Tensor:
        """(N, F) activations from (N, F) encoder outputs."""
        raise NotImplementedError

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        raise NotImplementedError

    def before_step(self, sae: SAE) -> None:
        """Adjust the gradients after backward, before clipping and the optimiser step."""

    def after_step(self, sae: SAE, out: ForwardOutput) -> None:
        """Re-impose weight constraints (and update running state, from this step's ``out``)
        after the optimiser step."""

    def sparsities(self, l1: tuple[str, ...], k: tuple[int, ...], d: int) -> list[dict[str, Any]]:
        """The sparsity settings (RunSpec fields) of one run each, from --l1 and --k, at width d."""
        raise NotImplementedError

    def run_label(self, spec) -> str:
        """The sparsity part of a run's folder name (``l1-0.0003``, ``k64``)."""
        raise NotImplementedError

    def describe(self, spec) -> str:
        """The sparsity setting in words for the model card."""
        raise NotImplementedError

    def table_cells(self, spec) -> tuple[str, str]:
        """(sparsity, target) cells of the model card's sister-run table."""
        raise NotImplementedError

    def option(self, spec) -> str:
        """The `saecache train` option that reproduces the sparsity setting."""
        raise NotImplementedError

    def snapshot_sparsity(self, spec, coefficient: float, d: int) -> dict[str, Any]:
        """Snapshot cfg entries for the sparsity (the same keys for every architecture)."""
        return {"l1": None, "target_l0": spec.target_l0, "l1_final": None, "l1_anthropic": None}

    def saelens_fields(self, snap_cfg: dict) -> dict[str, Any]:
        """Architecture-specific entries of the SAELens cfg.json."""
        return {}


class ReLU(Architecture):
    name = "relu"
    help = "L1 penalty weighted by decoder norms"
    title = "ReLU, L1 penalty"
    init_norm = 0.1  # Anthropic, April 2024 update
    penalised = True
    saelens = "standard"

    def activate(self, pre_acts: Tensor, cfg: SAEConfig) -> Tensor:
        return torch.relu(pre_acts)

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        return relu_l1_loss(sae, x, out, l1_units.loss_coefficient(terms.l1, sae.cfg.d))

    def sparsities(self, l1: tuple[str, ...], k: tuple[int, ...], d: int) -> list[dict[str, Any]]:
        if k:
            raise ValueError(f"--k is for --arch topk; --arch {self.name} takes --l1")
        return [dict(zip(("l1", "target_l0"), parse_l1(value, d))) for value in l1]

    def run_label(self, spec) -> str:
        if spec.target_l0 is not None:
            return f"adaptive-l0-{spec.target_l0:g}"
        return f"l1-{spec.l1:g}"

    def describe(self, spec) -> str:
        if spec.target_l0 is not None:
            return f"{format_coefficient(spec.l1)} (adaptive), target L0 ≈ {spec.target_l0:g}"
        return f"{format_coefficient(spec.l1)} (fixed)"

    def table_cells(self, spec) -> tuple[str, str]:
        if spec.target_l0 is not None:
            return f"{format_coefficient(spec.l1)} (adaptive)", f"L0 ≈ {spec.target_l0:g}"
        return format_coefficient(spec.l1), "fixed"

    def option(self, spec) -> str:
        if spec.target_l0 is not None:
            return f"--l1 adaptive:{spec.target_l0:g}:{format_coefficient(spec.l1)}"
        return f"--l1 {format_coefficient(spec.l1)}"

    def snapshot_sparsity(self, spec, coefficient: float, d: int) -> dict[str, Any]:
        return {"l1": spec.l1, "target_l0": spec.target_l0, "l1_final": float(coefficient),
                "l1_anthropic": l1_units.to_anthropic(float(coefficient), d)}


class TopK(Architecture):
    name = "topk"
    help = "TopK with AuxK"
    title = "TopK (ReLU on the k largest)"
    apply_b_dec_to_input = True
    saelens = "topk"

    def check(self, cfg: SAEConfig) -> None:
        if not _is_int(cfg.k) or not 1 <= cfg.k <= cfg.n_features:
            raise ValueError(f"arch 'topk' needs k with 1 <= k <= n_features "
                             f"({cfg.n_features}), got k={cfg.k!r}")

    def activate(self, pre_acts: Tensor, cfg: SAEConfig) -> Tensor:
        return topk_relu(pre_acts, cfg.k)

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        return topk_aux_loss(sae, x, out, terms.dead(), terms.aux_k, terms.aux_coeff)

    def before_step(self, sae: SAE) -> None:
        sae.remove_parallel_grad_()

    def after_step(self, sae: SAE, out: ForwardOutput) -> None:
        sae.normalize_decoder_()

    def sparsities(self, l1: tuple[str, ...], k: tuple[int, ...], d: int) -> list[dict[str, Any]]:
        if not k:
            raise ValueError("--arch topk needs at least one --k")
        return [{"k": value} for value in k]

    def run_label(self, spec) -> str:
        return f"k{spec.k}"

    def describe(self, spec) -> str:
        return f"k = {spec.k}"

    def table_cells(self, spec) -> tuple[str, str]:
        return f"k = {spec.k}", "—"

    def option(self, spec) -> str:
        return f"--k {spec.k}"

    def saelens_fields(self, snap_cfg: dict) -> dict[str, Any]:
        # plain TopK on the pre-activations, as saecache's forward pass
        return {"k": snap_cfg["k"], "rescale_acts_by_decoder_norm": False}


def parse_l1(text: str, d: int = 1) -> tuple[float, float | None]:
    """(coefficient in saecache units, target L0 or None) of an --l1 value at width d:
    ``3e-4`` → (3e-4, None); ``anthropic:5`` → (5 / d^1.5, None); ``adaptive:150`` →
    (5e-4, 150.0); ``adaptive:150:1e-3`` → (1e-3, 150.0). See saecache.sae.l1."""
    text = text.strip()
    match = _ADAPTIVE.match(text)
    try:
        if match:
            target = float(match.group(1))
            start = float(match.group(2)) if match.group(2) else DEFAULT_ADAPTIVE_START
            if not (0 < target < math.inf and 0 < start < math.inf):
                raise ValueError
            return start, target
        anthropic = text.startswith(l1_units.ANTHROPIC)
        value = float(text.removeprefix(l1_units.ANTHROPIC))
    except ValueError:
        raise ValueError(f"--l1 {text!r} is not a coefficient: write 3e-4, anthropic:5 (λ in "
                         "Anthropic/SAELens units), adaptive:150 or adaptive:150:5e-4 (target L0, "
                         "then starting coefficient)") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"--l1 {text!r} is not a finite coefficient ≥ 0: write 3e-4 or adaptive:150")
    return (l1_units.from_anthropic(value, d) if anthropic else value), None


def topk_relu(pre_acts: Tensor, k: int) -> Tensor:
    """(N, F): the k largest pre_acts of each row, ReLU'd, and zeros elsewhere."""
    values, indices = torch.topk(pre_acts, k, dim=-1, sorted=False)  # (N, k) each
    return torch.zeros_like(pre_acts).scatter(-1, indices, torch.relu(values))


ARCHS: dict[str, Architecture] = {arch.name: arch for arch in (ReLU(), TopK())}
"""Every architecture by name, in the order --help lists them."""


def arch_of(name: str) -> Architecture:
    """The architecture called ``name``; ValueError naming the known ones otherwise."""
    if name not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {name!r}")
    return ARCHS[name]
