"""What the training settings mean (docs/l1-units.md): the loss and its clipping against the
Anthropic/SAELens-standard form, the L1 units, b_dec at the layer mean, the learning rate
scaled with F, and the adaptive controller on a synthetic plant."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saecache.sae import l1 as l1_units
from saecache.sae.archs import arch_of, parse_l1
from saecache.sae.model import SAE, SAEConfig
from saecache.sae.spec import RunSpec
from saecache.storage.cache import Cache
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.loop import train
from saecache.train.schedule import L1Controller
from saecache.train.trainer import SAETrainer

D, F, B = 16, 64, 256


def config(**changes) -> TrainConfig:
    base = dict(cache="unused", layers=(0,), expansion=F // D, tokens=B * 20, snapshots=(),
                lr=1e-3, lr_warmup=0.0, lr_decay=0.0, l1_warmup=0.0, device="cpu",
                reader=ReaderConfig(batch_size=B))
    return TrainConfig(**{**base, **changes})


def anthropic_reference(spec: RunSpec, cfg: TrainConfig, batches: list[torch.Tensor]) -> SAE:
    """The textbook step: L = mean_n ‖x − x̂‖² + λ·mean_n Σ_i f_i ‖W_dec_i‖, its gradient clipped
    at grad_clip, Adam at lr (the Anthropic / SAELens-standard / dictionary-learning form)."""
    sae = SAE.initialized(SAEConfig(d=D, n_features=F), seed=cfg.seed)
    lam = l1_units.to_anthropic(spec.l1, D)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=1e-8 * D)  # eps in these units
    for x in batches:
        out = sae(x)
        loss = (x - out.x_hat).pow(2).sum(-1).mean() + lam * (out.acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
    return sae


@pytest.mark.parametrize("grad_clip", [1e-3, 100.0])  # clipping binding every step, and never
def test_the_step_is_the_anthropic_step_whatever_the_reduction(grad_clip):
    spec, cfg = RunSpec(0, "relu", F // D, l1=3e-4), config(grad_clip=grad_clip)
    batches = [torch.randn(B, D, generator=torch.Generator().manual_seed(i)) * 2 for i in range(5)]
    trainer = SAETrainer(spec, cfg, D)
    for step, x in enumerate(batches):
        trainer.step(x, step)
    want = anthropic_reference(spec, cfg, batches)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(trainer.sae, name), getattr(want, name), rtol=2e-4, atol=2e-6)


def test_clipping_binds_at_the_peers_level():
    """At initialisation the Anthropic-form gradient is far above 1: clipping at 1 acts."""
    spec = RunSpec(0, "relu", F // D, l1=3e-4)
    sae = SAE.initialized(SAEConfig(d=D, n_features=F), seed=0)
    x = torch.randn(B, D) * 3
    out = sae(x)
    lam = l1_units.to_anthropic(spec.l1, D)
    ((x - out.x_hat).pow(2).sum(-1).mean() + lam * (out.acts * sae.W_dec.norm(dim=1)).sum(-1).mean()).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sae.parameters()]))
    assert norm > 1.0


def test_l1_units():
    assert l1_units.to_anthropic(3e-4, 1024) == pytest.approx(9.830, abs=1e-3)
    assert l1_units.to_anthropic(8e-5, 1024) == pytest.approx(2.621, abs=1e-3)
    assert l1_units.from_anthropic(l1_units.to_anthropic(3e-4, 64), 64) == pytest.approx(3e-4)
    assert l1_units.loss_coefficient(3e-4, 1024) * 1024 == pytest.approx(l1_units.to_anthropic(3e-4, 1024))
    assert parse_l1("anthropic:5", d=64) == (pytest.approx(5 / 512), None)
    assert parse_l1("3e-4", d=64) == (3e-4, None)
    jumprelu = arch_of("jumprelu")  # its λ weighs L0: ×d on the summed squared error
    assert jumprelu.sparsities(("anthropic:5",), (), 64) == [{"l1": 5 / 64, "target_l0": None}]
    assert jumprelu.anthropic_lambda(5 / 64, 64) == pytest.approx(5.0)
    for bad in ("anthropic:nan", "anthropic:-1", "inf", "nan", "-3e-4", "anthropic:"):
        with pytest.raises(ValueError, match="--l1"):
            parse_l1(bad)


def test_learning_rate_scales_with_f():
    cfg = config(lr=None)
    assert cfg.learning_rate(2**14) == pytest.approx(2e-4)
    assert cfg.learning_rate(2**16) == pytest.approx(1e-4)
    assert cfg.learning_rate(512) == pytest.approx(2e-4 * math.sqrt(32))
    assert config(lr=5e-5).learning_rate(512) == 5e-5


def test_b_dec_starts_at_the_layer_mean_and_runs_record_lambda(train_cache, tmp_path):
    """One step at a negligible learning rate: b_dec is still the cache's mean (raw units)."""
    cfg = TrainConfig(cache=str(train_cache), out=str(tmp_path), layers=(1,), expansion=4, tokens=128,
                      snapshots=(), lr=1e-12, device="cpu", progress=False, l1=("3e-4", "anthropic:2"),
                      reader=ReaderConfig(batch_size=128, threads=1))
    runs = train(cfg)
    mean = torch.from_numpy(Cache.open(str(train_cache)).layer_stats(1).mean).float()
    for run in runs:
        snapshot = torch.load(run.folder.snapshot_path(1, None), weights_only=True)
        torch.testing.assert_close(snapshot["b_dec"], mean, rtol=1e-4, atol=1e-5)
        record = json.loads(run.folder.config.read_text())
        assert record["l1_anthropic"] == pytest.approx(snapshot["cfg"]["l1_anthropic"])
    assert [round(json.loads(r.folder.config.read_text())["l1_anthropic"], 6) for r in runs] == \
        [round(3e-4 * 64**1.5, 6), 2.0]


def plant(controller: L1Controller, steps: int, target_for: float = 40.0, lag: float = 0.005,
          seed: int = 0) -> tuple[list[float], list[float]]:
    """A synthetic SAE: its L0 relaxes (first order, rate ``lag``) toward
    200 / (1 + (λ / λ*)^1.5), λ* chosen so that L0 = target_for at λ = 1e-2, with noise."""
    gen = torch.Generator().manual_seed(seed)
    lam_star = 1e-2 / (200 / target_for - 1) ** (1 / 1.5)
    l0, l0s, lams = 200.0, [], []
    for step in range(steps):
        lam = float(controller.coefficient) * min(1.0, (step + 1) / max(controller.warmup, 1))
        steady = 200 / (1 + (lam / lam_star) ** 1.5)
        l0 += lag * (steady - l0)
        noisy = l0 * (1 + 0.05 * float(torch.randn((), generator=gen)))
        controller.update(torch.tensor(noisy), step)
        l0s.append(l0)
        lams.append(float(controller.coefficient))
    return l0s, lams


@pytest.mark.parametrize("target", [16.0, 40.0, 100.0])
@pytest.mark.parametrize("lag", [0.05, 0.005])  # an SAE whose L0 follows λ quickly, and slowly
def test_the_controller_settles_without_overshoot(target, lag):
    controller = L1Controller(5e-4, target, "cpu", warmup=100, ramp=1000)
    l0s, lams = plant(controller, 2000, target_for=target, lag=lag)
    assert max(lams) < 0.02  # λ ≈ 1e-2 is what the target needs: it never runs far past it
    tail = l0s[-200:]
    assert abs(sum(tail) / len(tail) - target) <= 0.1 * target  # within ±10% at the end
    assert min(l0s) >= 0.8 * target  # never more than 20% sparser than asked


def test_a_target_without_ramp_overshoots():
    """The bound above is the ramp's doing: steering at once toward a far target overshoots
    (λ 500× what the target needs and L0 at a sixth of it, as the issue measured)."""
    l0s, lams = plant(L1Controller(5e-4, 16.0, "cpu", warmup=100, ramp=0), 2000, target_for=16.0)
    assert min(l0s) < 0.8 * 16.0 and max(lams) > 0.1


def test_the_controller_state_round_trips():
    a = L1Controller(5e-4, 32.0, "cpu", warmup=10, ramp=100)
    plant(a, 50)
    b = L1Controller(5e-4, 32.0, "cpu", warmup=10, ramp=100)
    b.load_state_dict(a.state_dict())
    for step in range(50, 60):
        for c in (a, b):
            c.update(torch.tensor(30.0), step)
    assert float(a.coefficient) == float(b.coefficient) and float(a.l0_start) == float(b.l0_start)
