"""The SAE architectures, one object each, holding everything that differs between them.

Code elsewhere asks its architecture (``arch_of(spec.arch)``) and never compares arch strings:
the activation, the initial decoder norm, the loss and the constraints applied around the
optimiser step, how a run of it is named and described, and its SAELens equivalent.

    relu       f = ReLU(pre)             loss = MSE + λ·Σ f_i‖W_dec_i‖     (Anthropic, April 2024)
    topk       f = ReLU(TopK_k(pre))     loss = MSE + aux_coeff·AuxK      (Gao et al. 2024)
    batchtopk  training: ReLU of the k·B largest pre of the (B, F) batch; inference:
               f = pre·H(pre − θ), θ a running mean of the smallest kept activation
                                         loss = MSE + aux_coeff·AuxK      (Bussmann et al. 2024)
    jumprelu   f = pre·H(pre − θ), θ (F,) learnt directly through straight-through
               estimators                loss = MSE + λ·Σ_i H(pre_i − θ_i)
                                                                  (Rajamanoharan et al. 2024)

Run folders: relu l1-0.0003 / adaptive-l0-150, topk and batchtopk k32, jumprelu lambda-0.001 /
adaptive-l0-150 (--l1 gives jumprelu's λ, the coefficient of its L0 penalty).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from saecache.core.units import format_coefficient
from saecache.sae import l1 as l1_units
from saecache.sae.activations import (batch_topk_relu, jumprelu, threshold_relu, topk_relu,
                                      update_running_threshold_)
from saecache.sae.losses import LossOutput, jumprelu_l0_loss, relu_l1_loss, topk_aux_loss

if TYPE_CHECKING:  # types only: the model imports this module
    from saecache.sae.model import SAE, ForwardOutput, SAEConfig

DEFAULT_ADAPTIVE_START = 5e-4  # the model card's adaptive run starts at 5e-4
_ADAPTIVE = re.compile(r"^adaptive:([0-9.eE+-]+)(?::([0-9.eE+-]+))?$")
JUMPRELU_BANDWIDTH = 0.05
"""ε, the width of the rectangle kernel of jumprelu's straight-through gradients: SAELens 6's
default, in the same input units (E‖x‖ = √d); the paper's 0.001 is for E‖x‖² = 1 and, on these
inputs, let almost no pre-activation near θ (L0 stayed at 72 of 256 whatever λ)."""
JUMPRELU_INIT_THRESHOLD = 0.01
"""jumprelu's θ at initialisation (SAELens 6's default)."""
BATCHTOPK_THRESHOLD_RATE = 0.01
"""Weight of each batch in batchtopk's running threshold (SAELens' topk_threshold_lr)."""


class LossTerms(NamedTuple):
    """What a training step knows that a loss may need."""

    l1: Tensor | float
    """The sparsity coefficient in force at this step, after its warm-up (penalised archs)."""
    dead: Callable[[], Tensor | None]
    """(F,) bool mask of dead features, computed only when asked for; None while the host knows
    that none can be dead yet (fewer tokens seen than the dead window: AuxK is skipped)."""
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
    """Whether the run has a penalty coefficient, --l1 (relu's L1, jumprelu's λ on L0): warmed
    up, adaptive if asked, logged and saved in snapshots."""
    saelens = ""
    """The SAELens architecture with the same inference forward pass."""
    extra_tensors: tuple[str, ...] = ()
    """Snapshot tensors beyond model.SNAPSHOT_TENSORS, each (F,); SAELens' weights file holds
    them under the same names."""

    def check(self, cfg: SAEConfig) -> None:
        """Raise ValueError when ``cfg`` is not a valid SAE of this architecture."""
        if cfg.k is not None:
            raise ValueError(f"k is only for arch {_k_archs()}; arch {self.name!r} got k={cfg.k!r}")

    def add_state(self, sae: SAE) -> None:
        """Register this architecture's own parameters and buffers on a new SAE."""

    def init_state_(self, sae: SAE) -> None:
        """Give them their values for training (SAE.initialized)."""

    def activate(self, pre_acts: Tensor, sae: SAE) -> Tensor:
        """(N, F) activations from (N, F) encoder outputs; ``sae.training`` may matter."""
        raise NotImplementedError

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        raise NotImplementedError

    def before_step(self, sae: SAE) -> None:
        """Adjust the gradients after backward, before clipping and the optimiser step."""

    def after_step(self, sae: SAE, out: ForwardOutput) -> None:
        """Re-impose weight constraints (and update running state, from this step's ``out``)
        after the optimiser step."""

    def sparsities(self, l1: tuple[str, ...], k: tuple[int, ...], d: int,
                   n_features: int | None = None) -> list[dict[str, Any]]:
        """The sparsity settings (RunSpec fields) of one run each, from --l1 and --k, at width d
        with n_features features (None: not known yet, so not checked against them); a
        ValueError names the option that does not fit."""
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

    def anthropic_lambda(self, coefficient: float | None, d: int) -> float | None:
        """The sparsity coefficient on the Anthropic-form loss (squared error summed over d;
        docs/l1-units.md), None for an architecture without one."""
        return None

    def snapshot_sparsity(self, spec, coefficient: float, d: int) -> dict[str, Any]:
        """Snapshot cfg entries for the sparsity (the same keys for every architecture)."""
        penalised = self.penalised
        return {"l1": spec.l1 if penalised else None, "target_l0": spec.target_l0,
                "l1_final": float(coefficient) if penalised else None,
                "l1_anthropic": self.anthropic_lambda(float(coefficient), d)}

    def saelens_fields(self, snap_cfg: dict) -> dict[str, Any]:
        """Architecture-specific entries of the SAELens cfg.json."""
        return {}

    def snapshot_extra(self, sae: SAE) -> dict[str, Tensor]:
        """The ``extra_tensors`` of a snapshot, for raw activations (float64)."""
        return {}

    def load_extra_(self, sae: SAE, tensors: dict[str, Tensor]) -> None:
        """Set this architecture's state from a snapshot's ``extra_tensors`` (shapes checked)."""


class ReLU(Architecture):
    name = "relu"
    help = "L1 penalty weighted by decoder norms"
    title = "ReLU, L1 penalty"
    init_norm = 0.1  # Anthropic, April 2024 update
    penalised = True
    saelens = "standard"

    def activate(self, pre_acts: Tensor, sae: SAE) -> Tensor:
        return torch.relu(pre_acts)

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        return relu_l1_loss(sae, x, out, l1_units.loss_coefficient(terms.l1, sae.cfg.d))

    def sparsities(self, l1: tuple[str, ...], k: tuple[int, ...], d: int,
                   n_features: int | None = None) -> list[dict[str, Any]]:
        if k:
            raise ValueError(f"--k is for --arch {_k_archs()}; --arch {self.name} takes --l1")
        return [dict(zip(("l1", "target_l0"), parse_l1(value, d, self.from_anthropic))) for value in l1]

    def from_anthropic(self, lam: float, d: int) -> float:
        """The --l1 coefficient whose anthropic_lambda is ``lam``."""
        return l1_units.from_anthropic(lam, d)

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

    def anthropic_lambda(self, coefficient: float | None, d: int) -> float | None:
        return None if coefficient is None else l1_units.to_anthropic(coefficient, d)


class TopK(Architecture):
    name = "topk"
    help = "TopK with AuxK"
    title = "TopK (ReLU on the k largest)"
    apply_b_dec_to_input = True
    saelens = "topk"

    def check(self, cfg: SAEConfig) -> None:
        if not _is_int(cfg.k) or not 1 <= cfg.k <= cfg.n_features:
            raise ValueError(f"arch {self.name!r} needs k with 1 <= k <= n_features "
                             f"({cfg.n_features}), got k={cfg.k!r}")

    def activate(self, pre_acts: Tensor, sae: SAE) -> Tensor:
        return topk_relu(pre_acts, sae.cfg.k)

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        return topk_aux_loss(sae, x, out, terms.dead(), terms.aux_k, terms.aux_coeff)

    def before_step(self, sae: SAE) -> None:
        sae.remove_parallel_grad_()

    def after_step(self, sae: SAE, out: ForwardOutput) -> None:
        sae.normalize_decoder_()

    def sparsities(self, l1: tuple[str, ...], k: tuple[int, ...], d: int,
                   n_features: int | None = None) -> list[dict[str, Any]]:
        if not k:
            raise ValueError(f"--arch {self.name} needs at least one --k")
        too_many = [value for value in k if n_features is not None and value > n_features]
        if too_many:
            raise ValueError(f"--k {too_many[0]} is more than the SAE's {n_features} features "
                             f"(--expansion × d = {n_features // d} × {d}): use --k {n_features} "
                             "or less, or a larger --expansion")
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


class BatchTopK(TopK):
    """TopK over the whole batch in training; at inference a threshold learnt from it."""

    name = "batchtopk"
    help = "BatchTopK with AuxK: k per row on average over a batch"
    title = "BatchTopK (ReLU on the k·B largest of a batch; threshold at inference)"
    saelens = "jumprelu"  # SAELens saves its batchtopk SAEs as jumprelu ones, θ per feature
    extra_tensors = ("threshold",)

    def add_state(self, sae: SAE) -> None:
        # (F,), every entry the same: the running threshold (0: none estimated yet)
        sae.register_buffer("threshold", torch.zeros_like(sae.b_enc.detach()))

    def activate(self, pre_acts: Tensor, sae: SAE) -> Tensor:
        if sae.training:
            return batch_topk_relu(pre_acts, sae.cfg.k)
        return threshold_relu(pre_acts, sae.threshold)

    def after_step(self, sae: SAE, out: ForwardOutput) -> None:
        sae.normalize_decoder_()
        update_running_threshold_(sae.threshold, out.acts, BATCHTOPK_THRESHOLD_RATE)

    def saelens_fields(self, snap_cfg: dict) -> dict[str, Any]:
        return {}  # SAELens' jumprelu has no fields of its own

    def snapshot_extra(self, sae: SAE) -> dict[str, Tensor]:
        return {"threshold": sae.threshold.detach().double()}  # on pre-activations: no folding

    def load_extra_(self, sae: SAE, tensors: dict[str, Tensor]) -> None:
        sae.threshold.copy_(_checked_threshold(tensors["threshold"]))


class JumpReLU(ReLU):
    """f = pre·H(pre − θ) with θ (F,) learnt, and L0 penalised (λ from --l1).

    θ is the parameter itself, not exp(log θ): Adam moves a parameter by about lr per step, so a
    log-parameterised θ starting at 0.001 barely moved in a short run (0.001 → 0.0012 in 937
    steps); SAELens went to a direct threshold for the same reason. It is kept ≥ 0."""

    name = "jumprelu"
    help = "JumpReLU with an L0 penalty (--l1 gives its λ)"
    title = "JumpReLU, L0 penalty"
    init_norm = 1.0  # unit-norm decoder rows, kept so (paper, dictionary-learning)
    saelens = "jumprelu"
    extra_tensors = ("threshold",)

    def add_state(self, sae: SAE) -> None:
        sae.threshold = nn.Parameter(torch.zeros_like(sae.b_enc.detach()))  # (F,)

    def init_state_(self, sae: SAE) -> None:
        sae.threshold.fill_(JUMPRELU_INIT_THRESHOLD)

    def activate(self, pre_acts: Tensor, sae: SAE) -> Tensor:
        return jumprelu(pre_acts, sae.threshold, JUMPRELU_BANDWIDTH)

    def loss(self, sae: SAE, x: Tensor, out: ForwardOutput, terms: LossTerms) -> LossOutput:
        return jumprelu_l0_loss(x, out, terms.l1, sae.threshold, JUMPRELU_BANDWIDTH)

    def before_step(self, sae: SAE) -> None:
        sae.remove_parallel_grad_()

    def after_step(self, sae: SAE, out: ForwardOutput) -> None:
        sae.normalize_decoder_()
        sae.threshold.data.clamp_(min=0.0)  # f = pre·H(pre − θ) with θ < 0 would pass negatives

    def run_label(self, spec) -> str:
        return super().run_label(spec) if spec.target_l0 is not None else f"lambda-{spec.l1:g}"

    def anthropic_lambda(self, coefficient: float | None, d: int) -> float | None:
        # λ weighs the L0 term of the per-element loss: ×d on the summed squared error
        return None if coefficient is None else coefficient * d

    def from_anthropic(self, lam: float, d: int) -> float:
        return lam / d

    def describe(self, spec) -> str:
        text = f"λ = {format_coefficient(spec.l1)} on L0"
        if spec.target_l0 is not None:
            return f"{text} (adaptive), target L0 ≈ {spec.target_l0:g}"
        return f"{text} (fixed)"

    def snapshot_extra(self, sae: SAE) -> dict[str, Tensor]:
        return {"threshold": sae.threshold.detach().double()}  # on pre-activations: no folding

    def load_extra_(self, sae: SAE, tensors: dict[str, Tensor]) -> None:
        sae.threshold.copy_(_checked_threshold(tensors["threshold"]))


def _checked_threshold(threshold: Tensor) -> Tensor:
    """A snapshot's threshold, refused unless every entry is finite and ≥ 0 (SAELens' relu(θ))."""
    if not bool(torch.isfinite(threshold).all()) or bool((threshold < 0).any()):
        raise ValueError("snapshot threshold must be finite and >= 0 for every feature")
    return threshold


def _k_archs() -> str:
    """The archs that take k ("topk or batchtopk"), for messages."""
    return " or ".join(name for name, arch in ARCHS.items() if isinstance(arch, TopK))


def parse_l1(text: str, d: int = 1,
             from_anthropic: Callable[[float, int], float] = l1_units.from_anthropic) -> tuple[float, float | None]:
    """(coefficient in saecache units, target L0 or None) of an --l1 value at width d:
    ``3e-4`` → (3e-4, None); ``anthropic:5`` → (from_anthropic(5, d): 5 / d^1.5 for an L1
    penalty, None); ``adaptive:150`` → (5e-4, 150.0); ``adaptive:150:1e-3`` → (1e-3, 150.0).
    See saecache.sae.l1."""
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
    return (from_anthropic(value, d) if anthropic else value), None


ARCHS: dict[str, Architecture] = {arch.name: arch
                                   for arch in (ReLU(), TopK(), BatchTopK(), JumpReLU())}
"""Every architecture by name, in the order --help lists them."""


def arch_of(name: str) -> Architecture:
    """The architecture called ``name``; ValueError naming the known ones otherwise."""
    if name not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {name!r}")
    return ARCHS[name]
