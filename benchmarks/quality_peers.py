"""The field's SAE trainers, each driven step by step on saecache's batches (bench_quality.py).

Every adapter trains with the peer's own model class, loss, optimiser and training step, at the
peer's own defaults (or its documented recipe for that architecture), on the batches it is
handed; the harness hands every trainer the same batches. Architectures are named as in
saecache (``relu`` is the L1 "standard"/April-update SAE). Each adapter says, per
architecture, how its sparsity is set:

    Sparsity("k")                    exact L0 per token or per batch (TopK, BatchTopK)
    Sparsity("target")               the trainer takes a target L0 itself
    Sparsity("coef", start, name)    a penalty coefficient, searched by the harness

Deviations from the peers' defaults, the same for all and stated in docs/quality.md:
inputs are scaled to E‖x‖ = √d by the harness (the peer's own normalisation is off), defaults
given in absolute steps for runs of tens of thousands of steps (warm-ups, threshold start) are
capped at 5% of the run (dictionary-learning's BatchTopK threshold start: its default when the
run is longer, else 90% of the run), wandb/progress bars are off, float32 on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

STEP_CAP = 0.05
"""Absolute-step defaults (warm-ups, threshold start) are capped at this fraction of the run."""


@dataclass(frozen=True)
class Sparsity:
    kind: str
    """"k", "target" or "coef"."""
    start: float | None = None
    """coef: the coefficient the search starts from (the peer's default or documented value)."""
    name: str = ""
    """coef: what the coefficient is called (λ, l0_coefficient)."""


@dataclass
class Trained:
    """A trained SAE as the harness evaluates it, on inputs scaled to E‖x‖ = √d."""

    forward: Callable[[Tensor], tuple[Tensor, Tensor]]
    """x (N, d) → (x̂ (N, d), acts (N, F)), with the peer's own inference path."""
    decoder: Tensor
    """(F, d): the decoder rows (feature directions)."""
    note: str = ""
    """What the table should say about the setting (e.g. the final coefficient)."""


@dataclass(frozen=True)
class Setup:
    """What every trainer of one data set gets, identically."""

    d: int
    n_features: int
    batch_size: int
    seed: int
    device: str


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def _cap(default: int | None, steps: int) -> int | None:
    if default is None:
        return None
    return min(int(default), max(1, int(steps * STEP_CAP)))


class Peer:
    """One of the field's trainers."""

    name = ""
    dist = ""
    """Its PyPI name."""
    module = ""
    """What to import to see whether it is installed."""

    def __init__(self):
        self.version = _version(self.dist)
        self.reason: str | None = None
        """Why it cannot run here (None: it can)."""
        try:
            importlib.import_module(self.module)
        except Exception as err:  # ImportError, or a broken dependency raising anything
            self.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    def archs(self, d: int) -> dict[str, Sparsity]:
        """The architectures it trains (saecache's names) and how each one's sparsity is set,
        for inputs of width d."""
        raise NotImplementedError

    def recipe(self, arch: str) -> str:
        """One line: the settings used for ``arch``."""
        raise NotImplementedError

    def train(self, arch: str, value: float, setup: Setup, steps: int,
              batches: Iterable[Tensor]) -> Trained:
        raise NotImplementedError


# ----------------------------------------------------------------------------- SAELens


class SAELens(Peer):
    """sae-lens: its TrainingSAE classes trained by its own SAETrainer (Adam, its clipping at
    1.0, its dead-feature bookkeeping) on our batches as the data provider; evaluated through
    the inference SAE it saves (BatchTopK is saved as JumpReLU with the learnt threshold)."""

    name, dist, module = "SAELens", "sae-lens", "sae_lens"

    def archs(self, d: int) -> dict[str, Sparsity]:
        return {"topk": Sparsity("k"), "batchtopk": Sparsity("k"),
                # training_saes.md: l1_coefficient=5 (standard), l0_coefficient=5 (tanh JumpReLU)
                "relu": Sparsity("coef", 5.0, "l1_coefficient"),
                "jumprelu": Sparsity("coef", 5.0, "l0_coefficient")}

    def recipe(self, arch: str) -> str:
        common = "SAETrainer defaults: Adam lr 3e-4 constant, clip 1.0, b_dec 0, decoder init norm 0.1"
        return {
            "topk": f"TopKTrainingSAE defaults (aux_loss_coefficient 1, rescale_acts_by_decoder_norm); {common}",
            "batchtopk": f"BatchTopKTrainingSAE defaults (topk_threshold_lr 0.01); {common}",
            "relu": f"StandardTrainingSAE as in training_saes.md (l1_warm_up_steps = steps/20, "
                    f"lr_decay_steps = steps/5); {common}",
            "jumprelu": "JumpReLUTrainingSAE, the tanh recipe of training_saes.md (tanh scale 4, "
                        "bandwidth 2, init threshold 0.1, pre_act_loss 3e-6, l0_warm_up_steps = "
                        f"steps, lr_decay_steps = steps/5); {common}",
        }[arch]

    def train(self, arch, value, setup, steps, batches):
        import sae_lens
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(setup.seed)
        base = dict(d_in=setup.d, d_sae=setup.n_features, dtype="float32", device=setup.device)
        decay = 0
        if arch == "topk":
            sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=int(value), **base))
        elif arch == "batchtopk":
            sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(k=int(value), **base))
        elif arch == "relu":
            sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
                l1_coefficient=float(value), l1_warm_up_steps=steps // 20, **base))
            decay = steps // 5
        elif arch == "jumprelu":
            sae = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
                l0_coefficient=float(value), jumprelu_sparsity_loss_mode="tanh",
                jumprelu_tanh_scale=4.0, jumprelu_bandwidth=2.0, jumprelu_init_threshold=0.1,
                pre_act_loss_coefficient=3e-6, l0_warm_up_steps=steps, **base))
            decay = steps // 5
        else:
            raise ValueError(arch)
        lr = _default(SAETrainerConfig, "lr")
        cfg = SAETrainerConfig(total_training_samples=steps * setup.batch_size,
                               train_batch_size_samples=setup.batch_size, lr=lr, lr_end=lr / 10,
                               lr_decay_steps=decay, device=setup.device,
                               logger=LoggingConfig(log_to_wandb=False))
        trained = SAETrainer(cfg, sae, data_provider=iter(batches)).fit()
        with tempfile.TemporaryDirectory() as tmp:
            trained.save_inference_model(tmp)
            inference = sae_lens.SAE.load_from_disk(tmp, device=setup.device)
        inference.eval()

        def forward(x):
            acts = inference.encode(x)
            return inference.decode(acts), acts

        return Trained(forward, inference.W_dec.detach())


# ----------------------------------------------------------------------------- sparsify


class Sparsify(Peer):
    """eai-sparsify: its SparseCoder, loss (FVU + auxk_alpha·AuxK) and optimiser
    (sign-SGD in a schedule-free wrapper by default) as its Trainer sets them up, with the
    Trainer's per-step order (b_dec = mean of the first batch, unit-norm decoder before each
    forward, parallel gradient removed, no clipping); evaluated on the schedule-free average
    (optimizer.eval(), as its checkpoints are saved). Its Trainer needs a language model and
    a token dataset, so the step is replayed here from its source; TopK only."""

    name, dist, module = "sparsify", "eai-sparsify", "sparsify"

    def archs(self, d: int) -> dict[str, Sparsity]:
        return {"topk": Sparsity("k")}

    def _cfg(self, k: int, n_features: int):
        from sparsify.config import SparseCoderConfig, TrainConfig

        return TrainConfig(SparseCoderConfig(k=k, num_latents=n_features))

    def recipe(self, arch: str) -> str:
        cfg = self._cfg(32, 2 ** 14)
        return (f"TrainConfig defaults: optimizer {cfg.optimizer}, lr auto (5e-3/√(F/2¹⁴) signum, "
                f"2e-4/√(F/2¹⁴) adam), auxk_alpha {cfg.auxk_alpha}, loss {cfg.loss_fn}, "
                f"b_dec = first-batch mean, no clipping")

    def train(self, arch, value, setup, steps, batches):
        from sparsify import SparseCoder

        if arch != "topk":
            raise ValueError(arch)
        cfg = self._cfg(int(value), setup.n_features)
        torch.manual_seed(setup.seed)
        sae = SparseCoder(setup.d, cfg.sae, setup.device, dtype=torch.float32)
        optimizers, schedulers = self._optimizers(cfg, sae, steps)
        since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=setup.device)
        for step, x in enumerate(batches):
            if step == 0:
                sae.b_dec.data = x.mean(0).to(sae.dtype)
            if sae.cfg.normalize_decoder:
                sae.set_decoder_norm_to_unit_norm()
            dead = since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
            variance = (x - x.mean(0)).pow(2).sum()
            out = sae(x=x, y=x, dead_mask=dead, total_variance=variance)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=setup.device)
            fired[out.latent_indices.flatten()] = True
            if sae.cfg.normalize_decoder:
                sae.remove_gradient_parallel_to_decoder_directions()
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
            for sched in schedulers:
                sched.step()
            with torch.no_grad():
                since_fired += x.shape[0]
                since_fired[fired] = 0
        for opt in optimizers:
            if hasattr(opt, "eval"):  # schedule-free: evaluate (and save) the averaged weights
                opt.eval()

        def forward(x):
            enc = sae.encode(x)
            acts = torch.zeros(x.shape[0], sae.num_latents, dtype=x.dtype, device=x.device)
            acts.scatter_(-1, enc.top_indices, enc.top_acts.to(x.dtype))
            return sae.decode(enc.top_acts, enc.top_indices), acts

        return Trained(forward, sae.W_dec.detach(), note=f"optimizer {cfg.optimizer}")

    @staticmethod
    def _optimizers(cfg, sae, steps: int):
        scale = (sae.num_latents / 2 ** 14) ** 0.5
        if cfg.optimizer == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=cfg.lr or 5e-3 / scale)]),
                                      momentum=0.95)
            opt.train()
            return [opt], []
        if cfg.optimizer == "adam":
            from transformers import get_linear_schedule_with_warmup

            opt = torch.optim.Adam([dict(params=sae.parameters(), lr=cfg.lr or 2e-4 / scale)])
            warmup = _cap(cfg.lr_warmup_steps, steps)
            return [opt], [get_linear_schedule_with_warmup(opt, warmup, steps)]
        raise NotImplementedError(f"sparsify optimizer {cfg.optimizer!r} is not replayed here")


# ----------------------------------------------------------------------------- dictionary-learning


class DictionaryLearning(Peer):
    """dictionary-learning: its trainer classes, each ``update(step, x)`` called on our batches
    exactly as its trainSAE loop does; evaluated with each dictionary's own ``encode`` /
    ``decode`` (BatchTopK with its learnt inference threshold)."""

    name, dist, module = "dictionary-learning", "dictionary-learning", "dictionary_learning"

    def archs(self, d: int) -> dict[str, Sparsity]:
        # l1_penalty starts from the middle of dictionary_learning_demo's penalties (0.012-0.06,
        # for E‖x‖² = 1), scaled to our inputs (E‖x‖ = √d): the penalty scales with the input
        return {"topk": Sparsity("k"), "batchtopk": Sparsity("k"), "jumprelu": Sparsity("target"),
                "relu": Sparsity("coef", 0.03 * d ** 0.5, "l1_penalty")}

    def _trainer_class(self, arch: str):
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
        from dictionary_learning.trainers.jumprelu import JumpReluTrainer
        from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
        from dictionary_learning.trainers.top_k import TopKTrainer

        return {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "jumprelu": JumpReluTrainer,
                "relu": StandardTrainerAprilUpdate}[arch]

    def recipe(self, arch: str) -> str:
        cls = self._trainer_class(arch)
        lr = _default(cls, "lr")
        lr_text = "auto 2e-4/√(F/2¹⁴)" if lr is None else f"{lr:g}"
        extra = {"topk": "auxk_alpha 1/32, geometric-median b_dec",
                 "batchtopk": "auxk_alpha 1/32, threshold_beta 0.999, geometric-median b_dec",
                 "jumprelu": "bandwidth 0.001, sparsity_penalty 1 around target_l0",
                 "relu": "April update: decoder norms in the penalty, clip 1.0"}[arch]
        return (f"{cls.__name__} defaults: lr {lr_text}, {extra}; warm-ups capped at 5% of the "
                f"run, decay_start 0.8·steps (dictionary_learning_demo), no input normalisation")

    def train(self, arch, value, setup, steps, batches):
        cls = self._trainer_class(arch)
        params = inspect.signature(cls).parameters
        kwargs = dict(steps=steps, activation_dim=setup.d, dict_size=setup.n_features, layer=0,
                      lm_name="saecache-benchmark", device=setup.device, seed=setup.seed)
        for name in ("warmup_steps", "sparsity_warmup_steps"):
            if name in params:
                kwargs[name] = _cap(params[name].default, steps)
        if "threshold_start_step" in params:
            # the inference threshold tracks the trained model from this step on (EMA, β 0.999):
            # the default when the run is longer, else late in the run (90%)
            default = params["threshold_start_step"].default
            kwargs["threshold_start_step"] = default if default < steps else int(steps * 0.9)
        if "decay_start" in params:
            kwargs["decay_start"] = int(steps * 0.8)
        if arch in ("topk", "batchtopk"):
            kwargs["k"] = int(value)
        elif arch == "jumprelu":
            kwargs["target_l0"] = float(value)
        else:
            kwargs["l1_penalty"] = float(value)
        trainer = cls(**kwargs)
        for step, x in enumerate(batches):
            trainer.update(step, x)
        ae = trainer.ae
        ae.eval()

        def forward(x):
            acts = ae.encode(x)
            return ae.decode(acts), acts

        if hasattr(ae, "W_dec"):
            decoder = ae.W_dec.detach()  # (F, d)
        else:
            decoder = ae.decoder.weight.detach().T  # nn.Linear(F, d).weight is (d, F)
        return Trained(forward, decoder)


PEERS: tuple[type[Peer], ...] = (SAELens, Sparsify, DictionaryLearning)
