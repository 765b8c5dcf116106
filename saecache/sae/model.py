"""A sparse autoencoder's parameters, forward pass and snapshots (architectures: sae.archs).

    f = act((x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc)      # (N, F)
    x̂ = f @ W_dec + b_dec                                         # (N, d)

act is the architecture's (sae.archs): ReLU, TopK, BatchTopK (k·B largest of a batch in
training, pre·H(pre − threshold) in eval mode), JumpReLU (pre·H(pre − threshold)). The trainer
feeds scaled activations x' = scale·x (so that their size does not depend on the layer);
:meth:`SAE.snapshot` folds the scale back into the weights, so a snapshot runs on raw
activations with the plain forward pass above (docs/cache-format.md, "Snapshots").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from saecache.sae.archs import ARCHS, arch_of

SNAPSHOT_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
"""Tensor keys of every snapshot dict; its configuration is under "cfg"."""

SNAPSHOT_TENSORS_BY_ARCH = {name: SNAPSHOT_TENSORS + arch.extra_tensors
                            for name, arch in ARCHS.items()}
"""Every tensor key of a snapshot, by arch: relu and topk have SNAPSHOT_TENSORS only; batchtopk
and jumprelu also "threshold" (F,), the inference threshold on the pre-activations
(f = pre·(pre > threshold); the same for raw and scaled inputs, so saved unfolded)."""

_SNAPSHOT_CFG_KEYS = ("arch", "k", "apply_b_dec_to_input", "d", "F")
_JSON_SCALARS = (bool, int, float, str, type(None))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SAEConfig:
    """The shape and architecture of one sparse autoencoder."""

    d: int
    """Input width: the residual stream's dimension."""
    n_features: int
    """F, the number of dictionary features (d × expansion factor)."""
    arch: str = "relu"
    """A name in sae.archs.ARCHS: "relu" (L1 penalty on the activations), "topk" (k largest
    kept), "batchtopk" (k·B largest of a batch) or "jumprelu" (learnt thresholds, L0 penalty)."""
    k: int | None = None
    """Active features per token for "topk" and "batchtopk" (on average; 1 ≤ k ≤ n_features);
    must be None for "relu" and "jumprelu"."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from x before encoding."""

    def __post_init__(self):
        if not _is_int(self.d) or self.d < 1:
            raise ValueError(f"d must be a positive integer, got {self.d!r}")
        if not _is_int(self.n_features) or self.n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {self.n_features!r}")
        arch_of(self.arch).check(self)  # ValueError naming arch or k
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ValueError(f"apply_b_dec_to_input must be a bool, "
                             f"got {self.apply_b_dec_to_input!r}")


class ForwardOutput(NamedTuple):
    """What :meth:`SAE.forward` returns for a batch x of N rows."""

    x_hat: Tensor
    """(N, d) reconstruction of x."""
    acts: Tensor
    """(N, F) feature activations: after the architecture's activation (0 where inactive)."""
    pre_acts: Tensor
    """(N, F) encoder outputs before the activation (the AuxK loss selects among these)."""


class SAE(nn.Module):
    """A sparse autoencoder with parameters W_enc (d, F), b_enc (F), W_dec (F, d), b_dec (d), and
    its architecture's own state (batchtopk: buffer ``threshold`` (F,); jumprelu: parameter
    ``threshold`` (F,)). Its ``training`` flag picks batchtopk's forward pass."""

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        """All parameters zero: :meth:`initialized` to train, :meth:`from_snapshot` to load."""
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d, cfg.n_features
        zeros = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.zeros(d, n, **zeros))  # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(n, **zeros))  # (F,)
        self.W_dec = nn.Parameter(torch.zeros(n, d, **zeros))  # (F, d)
        self.b_dec = nn.Parameter(torch.zeros(d, **zeros))  # (d,)
        arch_of(cfg.arch).add_state(self)

    @classmethod
    def initialized(cls, cfg: SAEConfig, seed: int, device=None, dtype=torch.float32,
                    b_dec: Tensor | None = None) -> SAE:
        """A fresh SAE, identical for the same seed on any device.

        W_dec rows are Gaussian directions scaled to the architecture's ``init_norm`` (0.1 for
        relu, 1 for the others); W_enc is a copy of W_dec.T; b_enc is zero and b_dec is
        ``b_dec`` (d,), the data's mean as sparsify does, or zero; jumprelu's threshold is
        0.001. The draw uses its own CPU generator, so the global RNG is untouched and the
        result does not depend on the device.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows = torch.randn(cfg.n_features, cfg.d, generator=gen, dtype=torch.float64)  # (F, d)
        norm = arch_of(cfg.arch).init_norm
        rows = rows * (norm / rows.norm(dim=1, keepdim=True))
        sae = cls(cfg, device=device, dtype=dtype)
        with torch.no_grad():
            sae.W_dec.copy_(rows)
            sae.W_enc.copy_(rows.T)
            if b_dec is not None:
                sae.b_dec.copy_(b_dec)
            arch_of(cfg.arch).init_state_(sae)
        return sae

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(acts, pre_acts), both (N, F), for x (N, d): rows only (torch.addmm is 2-D)."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        # One fused bias matmul, not x @ W_enc + b_enc: under bf16 autocast the add would run
        # in fp32 (bf16 + fp32 parameter promotes), returning fp32 (N, F) pre-activations and
        # activations and making the decoder cast them back to bf16. addmm stays bf16.
        pre_acts = torch.addmm(self.b_enc, x, self.W_enc)  # (N, F)
        return arch_of(self.cfg.arch).activate(pre_acts, self), pre_acts

    def decode(self, acts: Tensor) -> Tensor:
        """x̂ (N, d) from acts (N, F)."""
        return torch.addmm(self.b_dec, acts, self.W_dec)  # fused, as in encode: bf16 stays bf16

    def forward(self, x: Tensor) -> ForwardOutput:
        acts, pre_acts = self.encode(x)
        return ForwardOutput(self.decode(acts), acts, pre_acts)

    def decoder_norms(self) -> Tensor:
        """(F,) L2 norm of each decoder row (the weight of each feature in the L1 penalty)."""
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every W_dec row to unit norm (TopK SAEs keep this after every step)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)  # (F, 1)
        self.W_dec.div_(norms.clamp_min(torch.finfo(norms.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad each row's component along that W_dec row.

        With unit-norm decoder rows the parallel component would only change the norms, which
        :meth:`normalize_decoder_` undoes; removing it keeps Adam's moments about directions
        (sparsify's trick). Exact for any row norm: g_i -= (g_i·w_i / ||w_i||²) w_i.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        sq_norms = (w * w).sum(dim=1, keepdim=True)  # (F, 1)
        along = (grad * w).sum(dim=1, keepdim=True) / sq_norms.clamp_min(torch.finfo(w.dtype).tiny)
        grad.sub_(along * w)

    def snapshot(self, scale: float, **extra) -> dict:
        """The DESIGN.md snapshot dict of this SAE for raw activations x, trained on x' = scale·x.

        Folding: f = act((x·s − b_dec·a) @ W_enc + b_enc) = act((x − (b_dec/s)·a) @ (s·W_enc)
        + b_enc), so W_enc_raw = s·W_enc, b_dec_raw = b_dec/s, b_enc is unchanged and the
        activations are identical; x̂_raw = x̂'/s = f @ (W_dec/s) + b_dec/s. The pre-activations
        are identical too, so a threshold on them (batchtopk, jumprelu) is saved as it is.

        Returns {"W_enc", "b_enc", "W_dec", "b_dec" (and the architecture's own: "threshold"):
        CPU float32 contiguous tensors, "cfg": a plain dict with arch, k, apply_b_dec_to_input,
        d, F and every `extra` (JSON scalars or strings: layer, l1, tokens_seen, ...)}; the
        keys per arch are SNAPSHOT_TENSORS_BY_ARCH. Loads with torch.load(weights_only=True).
        """
        s = _check_scale(scale)
        cfg = {"arch": self.cfg.arch, "k": self.cfg.k,
               "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
               "d": self.cfg.d, "F": self.cfg.n_features}
        cfg.update(_check_extra(extra))
        p = {key: getattr(self, key).detach().double() for key in SNAPSHOT_TENSORS}  # fold in f64
        folded = {"W_enc": p["W_enc"] * s, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / s,
                  "b_dec": p["b_dec"] / s, **arch_of(self.cfg.arch).snapshot_extra(self)}
        # .clone(): never alias a parameter, whatever its dtype and device
        state = {key: t.to("cpu", torch.float32).contiguous().clone() for key, t in folded.items()}
        state["cfg"] = cfg
        return state

    @classmethod
    def from_snapshot(cls, state: dict, device=None, dtype=torch.float32) -> SAE:
        """An SAE for raw activations from a :meth:`snapshot` dict (extra cfg keys are ignored),
        in eval mode: batchtopk runs on its threshold, as at inference."""
        cfg = state.get("cfg")
        if not isinstance(cfg, dict):
            raise ValueError("snapshot has no 'cfg' dict")
        missing = [key for key in _SNAPSHOT_CFG_KEYS if key not in cfg]
        if missing:
            raise ValueError(f"snapshot lacks {', '.join(missing)}")
        sae_cfg = SAEConfig(d=cfg["d"], n_features=cfg["F"], arch=cfg["arch"], k=cfg["k"],
                            apply_b_dec_to_input=cfg["apply_b_dec_to_input"])  # names a bad field
        missing = [key for key in SNAPSHOT_TENSORS_BY_ARCH[sae_cfg.arch] if key not in state]
        if missing:
            raise ValueError(f"snapshot lacks {', '.join(missing)}")
        sae = cls(sae_cfg, device=device, dtype=dtype)
        with torch.no_grad():
            for key in SNAPSHOT_TENSORS:
                getattr(sae, key).copy_(_shaped(state, key, getattr(sae, key).shape, cfg))
            arch = arch_of(sae_cfg.arch)
            arch.load_extra_(sae, {key: _shaped(state, key, (sae_cfg.n_features,), cfg)
                                   for key in arch.extra_tensors})
        return sae.eval()


def _shaped(state: dict, key: str, shape, cfg: dict) -> Tensor:
    """state[key], refused unless its shape is ``shape``."""
    if tuple(state[key].shape) != tuple(shape):
        raise ValueError(f"snapshot {key} has shape {tuple(state[key].shape)}, expected "
                         f"{tuple(shape)} for d={cfg['d']}, F={cfg['F']}")
    return state[key]


def _check_scale(scale: float) -> float:
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"snapshot scale must be a positive finite number, got {scale!r}")
    return s


def _check_extra(extra: dict) -> dict:
    """The snapshot's extra cfg entries, refused if they clash or are not JSON scalars."""
    for key, value in extra.items():
        if key in _SNAPSHOT_CFG_KEYS:
            raise ValueError(f"snapshot extra {key!r} would override the SAE's own config")
        if not isinstance(value, _JSON_SCALARS) or (isinstance(value, float)
                                                    and not math.isfinite(value)):
            raise ValueError(f"snapshot extra {key}={value!r} is not a finite JSON scalar "
                             f"(int, float, str, bool or None)")
    return dict(extra)
