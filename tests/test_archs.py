"""BatchTopK and JumpReLU: their forward passes and gradients against plain references, their
snapshots, `saecache train` / `eval` / `export` end to end, and the SAELens round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close

from saecache.cli import cli
from saecache.export.export import export_saelens
from saecache.sae.activations import update_running_threshold_
from saecache.sae.archs import (ARCHS, JUMPRELU_BANDWIDTH, JUMPRELU_INIT_THRESHOLD, LossTerms,
                                arch_of)
from saecache.sae.model import SAE, SNAPSHOT_TENSORS_BY_ARCH, SAEConfig
from saecache.sae.spec import RunSpec
from saecache.storage.cache import Cache
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.reader import read_heldout
from saecache.train.trainer import SAETrainer
from tests.reference import l0, load_saelens_folder
from tests.test_cli import assert_one_line_error
from tests.test_sae import random_sae

BATCHTOPK_RUN, JUMPRELU_RUN = "layer01-batchtopk-x4-k8", "layer01-jumprelu-x4-lambda-0.001"
ADAPTIVE_RUN = "layer01-jumprelu-x4-adaptive-l0-32"
FINAL = "sae_layer01_final.pt"
TRAIN = ["--layer", "1", "--expansion", "4", "--tokens", "60000", "--snapshots", "20K",
         "--batch-size", "64", "--lr", "1e-3", "--log-every", "50", "--dead-window", "10000",
         "--mix-chunks", "4", "--reader-threads", "2", "--device", "cpu", "--no-progress"]


def invoke(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def lines(run: Path, split: str) -> list[dict]:
    return [line for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if line["split"] == split]


@pytest.fixture(scope="module")
def runs(train_cache, tmp_path_factory) -> Path:
    """`saecache train` of a batchtopk run (k 8), then of two jumprelu runs (λ 1e-3, L0 → 32)."""
    out = tmp_path_factory.mktemp("arch-runs")
    invoke("train", train_cache, *TRAIN, "--arch", "batchtopk", "--k", "8", "--out", out)
    invoke("train", train_cache, *TRAIN, "--arch", "jumprelu", "--l1", "1e-3", "--l1",
           "adaptive:32", "--out", out)
    return out


@pytest.fixture(scope="module")
def residuals(train_cache) -> torch.Tensor:
    """(512, 64) float32 raw held-out residuals of layer 1: what a snapshot takes."""
    return read_heldout(Cache.open(str(train_cache)), 1, ReaderConfig(batch_size=128), 512).float()


# ── BatchTopK ────────────────────────────────────────────────────────────────────────────────


def batchtopk_sae(k: int = 3, seed: int = 0) -> SAE:
    """d=8, F=32, every parameter random; b_enc raised so that most pre-activations are > 0."""
    sae = random_sae(SAEConfig(d=8, n_features=32, arch="batchtopk", k=k), seed=seed)
    with torch.no_grad():
        sae.b_enc.add_(4.0)
    return sae


def test_batchtopk_keeps_exactly_k_times_b_of_the_batch_in_training():
    sae = batchtopk_sae(k=3).train()
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    kept = out.acts != 0
    assert int(kept.sum()) == 3 * 10  # k·B over the batch ...
    assert len(set(kept.sum(dim=1).tolist())) > 1  # ... not k per row
    cut = out.pre_acts.flatten().sort(descending=True).values[3 * 10 - 1]  # the k·B-th largest
    assert torch.equal(kept, out.pre_acts >= cut)
    assert_close(out.acts, torch.where(kept, out.pre_acts, torch.zeros(())))
    out.pre_acts.retain_grad()
    out.acts.sum().backward()
    assert torch.equal(out.pre_acts.grad != 0, kept)  # only the survivors learn


def test_batchtopk_in_eval_mode_keeps_what_exceeds_its_threshold():
    sae = batchtopk_sae()
    with torch.no_grad():
        sae.threshold.fill_(4.5)
    sae.eval()
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    assert_close(out.acts, out.pre_acts * (out.pre_acts > 4.5))
    assert 0 < int((out.acts != 0).sum()) != 3 * 10


def test_the_running_threshold_by_hand():
    threshold = torch.zeros(4)  # 0: none estimated yet
    update_running_threshold_(threshold, torch.tensor([[0.0, 2.0, 0.0, 3.0], [1.5, 0, 0, 0]]), 0.1)
    assert_close(threshold, torch.full((4,), 1.5))  # the first batch's smallest kept activation
    update_running_threshold_(threshold, torch.tensor([[0.0, 2.5, 0.0, 0.0]]), 0.1)
    assert_close(threshold, torch.full((4,), 0.9 * 1.5 + 0.1 * 2.5))
    update_running_threshold_(threshold, torch.zeros(2, 4), 0.1)  # nothing active: unchanged
    assert_close(threshold, torch.full((4,), 0.9 * 1.5 + 0.1 * 2.5))


def test_heldout_metrics_run_in_eval_mode_and_return_to_train_mode():
    cfg = TrainConfig(cache="unused", layers=(0,), arch="batchtopk", k=(4,), expansion=4,
                      tokens=1024, device="cpu", progress=False, reader=ReaderConfig(batch_size=64))
    trainer = SAETrainer(cfg.run_specs(0, d=16)[0], cfg, d=16)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    for step in range(3):
        trainer.step(x, step)
    assert trainer.sae.training and bool((trainer.sae.threshold > 0).all())
    heldout = trainer.heldout_metrics(x)
    assert trainer.sae.training
    with torch.no_grad():
        expected = trainer.sae.eval()(x).acts
    trainer.sae.train()
    assert heldout["l0"] == pytest.approx(l0(expected))
    assert heldout["l0"] != 4.0  # the threshold's L0, not the batch's exact k


# ── JumpReLU against the paper's formulas ────────────────────────────────────────────────────


def jumprelu_case(lam: float = 0.1):
    """A float64 jumprelu SAE (d=4, F=6) on x (5, 4), three thresholds within ε/2 of a pre-act."""
    sae = random_sae(SAEConfig(d=4, n_features=6, arch="jumprelu"), seed=4).double()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.add_(6.0)  # every pre-activation positive
        z = x @ sae.W_enc + sae.b_enc  # (5, 6)
        theta = torch.full((6,), 1.0, dtype=torch.float64)
        theta[0], theta[1] = z[0, 0] - 0.3 * JUMPRELU_BANDWIDTH, z[1, 1] + 0.2 * JUMPRELU_BANDWIDTH
        theta[2] = z[:, 2].max() + 1.0  # never fires
        theta[3] = z[2, 3] - 0.1 * JUMPRELU_BANDWIDTH
        sae.threshold.copy_(theta)
    return sae, x, lam


def paper_reference(sae: SAE, x: torch.Tensor, lam: float) -> dict:
    """Loss and gradients written out from Rajamanoharan et al. 2024 (float64, no autograd):

        z = x W_enc + b_enc;  f = z·H(z − θ);  x̂ = f W_dec + b_dec
        L = mean((x − x̂)²) + λ·mean_n Σ_i H(z_ni − θ_i)
        ∂f/∂z = H(z − θ);  ∂f/∂θ = −(θ/ε)·K((z − θ)/ε);  ∂H/∂θ = −(1/ε)·K((z − θ)/ε);  ∂H/∂z = 0
        K(u) = 1 for |u| < 1/2, else 0;  θ a parameter
    """
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    theta, eps = sae.threshold.detach(), JUMPRELU_BANDWIDTH
    n, d = x.shape
    z = x @ W_enc + b_enc
    H = (z > theta).double()
    K = ((z - theta).abs() / eps < 0.5).double()
    f = z * H
    x_hat = f @ W_dec + b_dec
    g_xhat = -2 * (x - x_hat) / (n * d)
    g_f = g_xhat @ W_dec.T
    g_z = g_f * H
    g_theta = (g_f * -(theta / eps) * K).sum(0) + lam / n * (-(1 / eps) * K).sum(0)
    return {"acts": f, "x_hat": x_hat, "loss": ((x - x_hat) ** 2).mean() + lam * H.sum(1).mean(),
            "l0": H.sum(1).mean(), "kernel": K, "pre_acts": g_z, "threshold": g_theta,
            "W_enc": x.T @ g_z, "b_enc": g_z.sum(0), "W_dec": f.T @ g_xhat, "b_dec": g_xhat.sum(0)}


def test_jumprelu_forward_and_gradients_match_the_paper():
    sae, x, lam = jumprelu_case()
    out = sae(x)
    out.pre_acts.retain_grad()
    terms = LossTerms(lam, lambda: torch.zeros(6, dtype=torch.bool), 2, 1 / 32)
    loss = arch_of("jumprelu").loss(sae, x, out, terms)
    loss.loss.backward()
    want = paper_reference(sae, x, lam)
    assert want["kernel"].sum() == 3  # the three thresholds put next to a pre-activation
    assert_close(out.acts, want["acts"])
    assert_close(out.x_hat, want["x_hat"])
    assert_close(loss.loss, want["loss"])
    assert_close(loss.sparsity, want["l0"])
    assert_close(out.pre_acts.grad, want["pre_acts"])
    for name in ("threshold", "W_enc", "b_enc", "W_dec", "b_dec"):
        assert_close(getattr(sae, name).grad, want[name], msg=name)
    assert (sae.threshold.grad[[0, 1, 3]] != 0).all() and sae.threshold.grad[2] == 0


def test_jumprelu_starts_at_the_papers_threshold_with_unit_decoder_rows():
    sae = SAE.initialized(SAEConfig(d=8, n_features=16, arch="jumprelu"), seed=0)
    assert_close(sae.threshold, torch.full((16,), JUMPRELU_INIT_THRESHOLD))
    assert_close(sae.decoder_norms(), torch.ones(16))
    assert [name for name, _ in sae.named_parameters()][-1] == "threshold"
    x = torch.randn(4, 8)
    assert torch.equal(sae.train()(x).acts, sae.eval()(x).acts)  # one forward in both modes


# ── snapshots ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("arch, k", [("batchtopk", 3), ("jumprelu", None)])
def test_snapshot_folds_the_scale_and_keeps_the_threshold(arch, k, tmp_path):
    scale = 0.37
    sae = random_sae(SAEConfig(8, 32, arch, k, arch_of(arch).apply_b_dec_to_input), seed=6)
    with torch.no_grad():
        if arch == "batchtopk":
            sae.threshold.fill_(0.8)
        else:
            sae.threshold.copy_(torch.linspace(-3, 1, 32).exp())
    x_raw = 3.0 * torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
    trained = sae.eval()(scale * x_raw)  # the trained SAE on what the trainer saw, at inference
    torch.save(sae.snapshot(scale, layer=5, tokens_seen=1000), tmp_path / FINAL)
    state = load(tmp_path / FINAL)
    assert tuple(k for k in state if k != "cfg") == SNAPSHOT_TENSORS_BY_ARCH[arch]
    assert state["threshold"].shape == (32,) and state["threshold"].dtype == torch.float32
    raw = SAE.from_snapshot(state)
    assert not raw.training
    assert_close(raw(x_raw).acts, trained.acts)
    assert_close(raw(x_raw).x_hat, trained.x_hat / scale)
    assert 0 < int((trained.acts != 0).sum()) < trained.acts.numel()


def test_snapshot_keys_of_relu_and_topk_are_unchanged():
    assert SNAPSHOT_TENSORS_BY_ARCH == {
        "relu": ("W_enc", "b_enc", "W_dec", "b_dec"), "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
        "batchtopk": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
        "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    for arch, k in (("relu", None), ("topk", 2)):
        sae = random_sae(SAEConfig(4, 6, arch, k))
        assert list(sae.snapshot(1.0)) == ["W_enc", "b_enc", "W_dec", "b_dec", "cfg"]
        assert [name for name, _ in sae.named_buffers()] == []


@pytest.mark.parametrize("arch, k", [("batchtopk", 2), ("jumprelu", None)])
def test_from_snapshot_refuses_a_missing_or_bad_threshold(arch, k):
    state = random_sae(SAEConfig(4, 6, arch, k)).snapshot(1.0)
    with pytest.raises(ValueError, match="lacks threshold"):
        SAE.from_snapshot({key: v for key, v in state.items() if key != "threshold"})
    with pytest.raises(ValueError, match="threshold has shape"):
        SAE.from_snapshot({**state, "threshold": torch.ones(5)})
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        SAE.from_snapshot({**state, "threshold": torch.full((6,), -1.0)})


# ── the registry: names, options, labels ─────────────────────────────────────────────────────


def test_run_names_and_how_the_card_describes_them():
    jump, adaptive = RunSpec(5, "jumprelu", 32, l1=1e-3), RunSpec(5, "jumprelu", 32, 5e-4, 150.0)
    batch = RunSpec(5, "batchtopk", 32, k=32)
    assert (jump.name, adaptive.name, batch.name) == (
        "layer05-jumprelu-x32-lambda-0.001", "layer05-jumprelu-x32-adaptive-l0-150",
        "layer05-batchtopk-x32-k32")
    assert arch_of("jumprelu").option(jump) == "--l1 1e-3"
    assert arch_of("jumprelu").option(adaptive) == "--l1 adaptive:150:5e-4"
    assert arch_of("jumprelu").describe(jump) == "λ = 1e-3 on L0 (fixed)"
    assert arch_of("batchtopk").option(batch) == "--k 32"
    assert arch_of("jumprelu").penalised and not arch_of("batchtopk").penalised
    assert (arch_of("batchtopk").saelens, arch_of("jumprelu").saelens) == ("jumprelu", "jumprelu")


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="batchtopk"), "arch 'batchtopk' needs k"),
    (dict(arch="jumprelu", k=2), "k is only for arch topk or batchtopk"),
])
def test_configs_check_k(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d=4, n_features=6, **kwargs)


@pytest.mark.parametrize("args, needle", [
    (["--arch", "batchtopk"], "--arch batchtopk needs at least one --k"),
    (["--arch", "jumprelu", "--k", "8"], "--k is for --arch topk or batchtopk; --arch jumprelu"),
])
def test_cli_refuses_the_wrong_sparsity_option(train_cache, tmp_path, args, needle):
    result = CliRunner().invoke(cli, ["train", str(train_cache), "--layer", "1", "--out",
                                      str(tmp_path / "runs"), "--device", "cpu", *args])
    assert_one_line_error(result, needle)


def test_train_help_lists_every_architecture():
    output = invoke("train", "--help")
    assert all(name in output for name in ARCHS)


# ── end to end: saecache train, eval, export ─────────────────────────────────────────────────


def test_batchtopk_threshold_reproduces_the_training_l0_on_heldout_data(runs):
    run = runs / BATCHTOPK_RUN
    train_lines, heldout = lines(run, "train"), lines(run, "heldout")
    assert all(line["l0"] == pytest.approx(8) for line in train_lines)  # exactly k·B per batch
    assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
    assert [line["snapshot"] for line in heldout] == ["sae_layer01_20K.pt", FINAL]
    assert heldout[-1]["l0"] == pytest.approx(train_lines[-1]["l0"], rel=0.1), heldout[-1]
    state = load(run / FINAL)
    assert state["cfg"]["arch"] == "batchtopk" and state["cfg"]["k"] == 8
    assert state["cfg"]["apply_b_dec_to_input"] is True
    assert (state["threshold"] > 0).all() and state["threshold"].unique().numel() == 1


def test_jumprelu_trains_and_its_threshold_learns(runs):
    run = runs / JUMPRELU_RUN
    train_lines = lines(run, "train")
    assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
    assert all(line["l1_coefficient"] == pytest.approx(1e-3) for line in train_lines)
    state = load(run / FINAL)
    assert (state["cfg"]["arch"], state["cfg"]["l1"], state["cfg"]["k"]) == ("jumprelu", 1e-3, None)
    assert state["cfg"]["apply_b_dec_to_input"] is False
    assert (state["threshold"] > 0).all()
    assert not torch.allclose(state["threshold"], torch.full((256,), JUMPRELU_INIT_THRESHOLD))
    assert_close(state["W_dec"].norm(dim=1) * state["cfg"]["input_scale"], torch.ones(256))


def test_the_adaptive_controller_steers_jumprelus_coefficient(runs):
    coefficients = [line["l1_coefficient"] for line in lines(runs / ADAPTIVE_RUN, "train")]
    assert lines(runs / ADAPTIVE_RUN, "train")[0]["l0"] > 32
    assert coefficients[-1] > 2 * coefficients[0]  # denser than the target: λ rises


@pytest.mark.parametrize("name", [BATCHTOPK_RUN, JUMPRELU_RUN])
def test_snapshot_runs_the_documented_forward_pass(runs, residuals, name):
    state = load(runs / name / FINAL)
    raw = SAE.from_snapshot(state)(residuals)
    pre = residuals - state["b_dec"] * state["cfg"]["apply_b_dec_to_input"]
    pre = pre @ state["W_enc"] + state["b_enc"]  # the documented forward pass, by hand
    acts = pre * (pre > state["threshold"])
    assert_close(raw.acts, acts)
    assert_close(raw.x_hat, acts @ state["W_dec"] + state["b_dec"])
    assert 0 < l0(raw.acts) < 256


def saelens_jumprelu_forward(cfg: dict, w: dict, x: torch.Tensor) -> tuple:
    """(acts, x̂) as SAELens 6's JumpReLUSAE computes them from cfg.json and the weights file:
    sae_in = x − b_dec·apply_b_dec_to_input; h = sae_in @ W_enc + b_enc;
    acts = relu(h)·(h > relu(threshold)); x̂ = acts @ W_dec + b_dec."""
    assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "none"
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    acts = hidden_pre.relu() * (hidden_pre > w["threshold"].relu())
    return acts, acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("name", [BATCHTOPK_RUN, JUMPRELU_RUN])
def test_saelens_export_round_trips(runs, residuals, name, tmp_path):
    export_saelens([runs / name], tmp_path / "saelens")
    cfg, weights = load_saelens_folder(tmp_path / "saelens" / "blocks.1.hook_resid_post")
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert weights["threshold"].shape == (256,) and weights["threshold"].dtype == torch.float32
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", 64, 256)
    assert "k" not in cfg and cfg["metadata"]["saecache"]["arch"] == name.split("-")[1]
    state = load(runs / name / FINAL)
    assert cfg["apply_b_dec_to_input"] is state["cfg"]["apply_b_dec_to_input"]
    assert torch.equal(weights["threshold"], state["threshold"])
    reference = SAE.from_snapshot(state)(residuals)
    acts, x_hat = saelens_jumprelu_forward(cfg, weights, residuals)
    assert_close(acts, reference.acts)
    assert_close(x_hat, reference.x_hat)
    assert (acts != 0).any()


def test_eval_runs_on_both_architectures(runs):
    output = invoke("eval", runs, "--device", "cpu", "--max-seqs", "4")
    assert "CE loss recovered" in output
    for name in (BATCHTOPK_RUN, JUMPRELU_RUN):
        final = json.loads((runs / name / "eval.json").read_text())["snapshots"][FINAL]
        assert math.isfinite(final["ce_loss_recovered"]) and final["tokens"] == 4 * 64
    batch = json.loads((runs / BATCHTOPK_RUN / "eval.json").read_text())["snapshots"][FINAL]
    assert batch["l0"] == pytest.approx(8, rel=0.25)  # the threshold at work, not k per row
