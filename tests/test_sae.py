"""SAE models and losses, checked against plain loops and values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tests.reference import default_aux_k
from saecache.sae.losses import LossOutput, relu_l1_loss, topk_aux_loss
from saecache.sae.model import SAE, ForwardOutput, SAEConfig

# ── a plain reference ────────────────────────────────────────────────────────────────────────


def reference_forward(sae: SAE, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_hat, acts, pre_acts) computed row by row, feature by feature, in float64 numpy."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().numpy()
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    cfg, xs = sae.cfg, x.double().numpy()
    d, n_feat = W_enc.shape
    pre, acts, x_hat = (np.zeros((len(xs), n_feat)), np.zeros((len(xs), n_feat)),
                        np.zeros((len(xs), d)))
    for n, row in enumerate(xs):
        inp = row - b_dec if cfg.apply_b_dec_to_input else row
        for i in range(n_feat):
            pre[n, i] = sum(inp[j] * W_enc[j, i] for j in range(d)) + b_enc[i]
        keep = range(n_feat) if cfg.arch == "relu" else np.argsort(-pre[n])[:cfg.k]
        for i in keep:
            acts[n, i] = max(pre[n, i], 0.0)
        for j in range(d):
            x_hat[n, j] = sum(acts[n, i] * W_dec[i, j] for i in range(n_feat)) + b_dec[j]
    return x_hat, acts, pre


def random_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """An SAE with every parameter random (biases included), as if trained."""
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def hand_sae(arch: str = "relu", k: int | None = None, apply: bool = False) -> SAE:
    """d=4, F=6: features 0-3 read x_0..x_3, feature 4 reads −x_0, feature 5 reads x_1/2 + x_2."""
    sae = SAE(SAEConfig(d=4, n_features=6, arch=arch, k=k, apply_b_dec_to_input=apply))
    W_enc = torch.zeros(4, 6)
    W_enc[:, :4] = torch.eye(4)
    W_enc[0, 4] = -1.0
    W_enc[1, 5], W_enc[2, 5] = 0.5, 1.0
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(torch.tensor([0.0, 0, 0, 0, 0.5, -1.5]))
        sae.W_dec.copy_(W_enc.T)
    return sae


CONFIGS = [SAEConfig(d=4, n_features=6, arch=arch, k=k, apply_b_dec_to_input=apply)
           for arch, k in (("relu", None), ("topk", 1), ("topk", 2), ("topk", 6))
           for apply in (False, True)]

# ── config ───────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kwargs, field", [
    (dict(d=0, n_features=6), "d"),
    (dict(d=4, n_features=0), "n_features"),
    (dict(d=4, n_features=6, arch="gated"), "arch"),
    (dict(d=4, n_features=6, arch="topk"), "k"),
    (dict(d=4, n_features=6, arch="topk", k=7), "k"),
    (dict(d=4, n_features=6, arch="topk", k=0), "k"),
    (dict(d=4, n_features=6, arch="relu", k=2), "k"),
    (dict(d=4, n_features=6, apply_b_dec_to_input=1), "apply_b_dec_to_input"),
])
def test_config_rejects_bad_fields_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SAEConfig(**kwargs)


# ── forward ──────────────────────────────────────────────────────────────────────────────────


def test_relu_forward_by_hand():
    sae = hand_sae("relu")
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    # pre: x_0..x_3, then −1 + 0.5, then −1 + 3 − 1.5
    out = sae(x)
    assert_close(out.pre_acts, torch.tensor([[1.0, -2.0, 3.0, 0.5, -0.5, 0.5]]))
    assert_close(out.acts, torch.tensor([[1.0, 0.0, 3.0, 0.5, 0.0, 0.5]]))
    # x̂ = 1·e0 + 3·e2 + 0.5·e3 + 0.5·(0, 0.5, 1, 0)
    assert_close(out.x_hat, torch.tensor([[1.0, 0.25, 3.5, 0.5]]))


def test_topk_forward_by_hand_relus_the_survivors():
    sae = hand_sae("topk", k=2)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, -2.0, -3.0, -4.0]])
    out = sae(x)
    # row 0 keeps features 2 (3.0) and 0 (1.0); row 1 keeps 4 (1.5) and 0 (−1.0 → relu 0)
    assert_close(out.acts, torch.tensor([[1.0, 0, 3.0, 0, 0, 0], [0, 0, 0, 0, 1.5, 0]]))
    assert_close(out.x_hat, torch.tensor([[1.0, 0, 3.0, 0], [-1.5, 0, 0, 0]]))


def test_apply_b_dec_to_input_by_hand():
    sae = hand_sae("relu", apply=True)
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    out = sae(torch.tensor([[1.0, -2.0, 3.0, 0.5]]))
    # x − b_dec = [0, −2, 3, 0.5]: pre = x_0..x_3, then −0 + 0.5, then −1 + 3 − 1.5
    assert_close(out.pre_acts, torch.tensor([[0.0, -2.0, 3.0, 0.5, 0.5, 0.5]]))
    # x̂ = 3·e2 + 0.5·e3 + 0.5·(−e0) + 0.5·(0, 0.5, 1, 0) + b_dec
    assert_close(out.x_hat, torch.tensor([[0.5, 0.25, 3.5, 0.5]]))


def config_id(c: SAEConfig) -> str:
    return f"{c.arch}{c.k or ''}-apply{int(c.apply_b_dec_to_input)}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_forward_matches_loop_reference(cfg):
    sae = random_sae(cfg, seed=1)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    assert isinstance(out, ForwardOutput)
    assert out.x_hat.shape == (5, 4) and out.acts.shape == (5, 6) and out.pre_acts.shape == (5, 6)
    x_hat, acts, pre = reference_forward(sae, x)
    assert_close(out.pre_acts, torch.from_numpy(pre).float())
    assert_close(out.acts, torch.from_numpy(acts).float())
    assert_close(out.x_hat, torch.from_numpy(x_hat).float())
    assert_close(sae.decode(sae.encode(x)[0]), out.x_hat)
    if cfg.arch == "topk":
        assert ((out.acts != 0).sum(dim=1) <= cfg.k).all()


# ── initialisation and decoder constraints ───────────────────────────────────────────────────


@pytest.mark.parametrize("arch, k, norm", [("relu", None, 0.1), ("topk", 3, 1.0)])
def test_initialized_is_seeded_and_follows_the_recipe(arch, k, norm):
    cfg = SAEConfig(d=8, n_features=16, arch=arch, k=k)
    rng_before = torch.random.get_rng_state()
    a, b = SAE.initialized(cfg, seed=3), SAE.initialized(cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name))
    assert not torch.equal(a.W_dec, SAE.initialized(cfg, seed=4).W_dec)
    assert_close(a.decoder_norms(), torch.full((16,), norm))
    assert torch.equal(a.W_enc, a.W_dec.T)
    assert a.W_enc.data_ptr() != a.W_dec.data_ptr()
    assert not a.b_enc.any() and not a.b_dec.any()


def test_normalize_decoder():
    sae = random_sae(SAEConfig(d=4, n_features=6))
    directions = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    sae.normalize_decoder_()
    assert_close(sae.decoder_norms(), torch.ones(6))
    assert_close(sae.W_dec.detach(), directions)


def test_remove_parallel_grad_leaves_only_the_orthogonal_part():
    sae = random_sae(SAEConfig(d=4, n_features=6))  # rows deliberately not unit norm
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grad_()
    w, g = sae.W_dec.detach(), sae.W_dec.grad
    assert_close((g * w).sum(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    removed = grad - g  # must be a multiple of each row
    assert_close(removed, (removed * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w)
    sae.W_dec.grad = None
    sae.remove_parallel_grad_()  # no grad: nothing to do


# ── snapshots ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("cfg", [SAEConfig(8, 16, "relu"), SAEConfig(8, 16, "relu", None, True),
                                 SAEConfig(8, 16, "topk", 4), SAEConfig(8, 16, "topk", 4, True)],
                         ids=["relu", "relu-apply", "topk", "topk-apply"])
def test_snapshot_folds_the_scale_for_raw_activations(cfg, tmp_path):
    scale = 0.37
    sae = random_sae(cfg, seed=6)
    x_raw = 3.0 * torch.randn(32, 8, generator=torch.Generator().manual_seed(7))
    trained = sae(scale * x_raw)  # what the trainer saw

    path = tmp_path / "sae_layer05_final.pt"
    torch.save(sae.snapshot(scale, layer=5, l1=3e-4, tokens_seen=1000, run="adaptive:150"), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    raw = SAE.from_snapshot(state)(x_raw)

    assert_close(raw.acts, trained.acts)
    assert_close(raw.x_hat * scale, trained.x_hat)
    assert_close(raw.pre_acts, trained.pre_acts)


def test_snapshot_keys_shapes_and_cfg():
    sae = random_sae(SAEConfig(d=4, n_features=6, arch="topk", k=2)).double()
    state = sae.snapshot(2.0, layer=3, l1=8e-5, tokens_seen=50_000_000)
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec", "cfg"}
    shapes = {"W_enc": (4, 6), "b_enc": (6,), "W_dec": (6, 4), "b_dec": (4,)}
    for key, shape in shapes.items():
        t = state[key]
        assert t.shape == shape and t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.is_contiguous() and not t.requires_grad
    assert state["cfg"] == {"arch": "topk", "k": 2, "apply_b_dec_to_input": False, "d": 4,
                            "F": 6, "layer": 3, "l1": 8e-5, "tokens_seen": 50_000_000}
    assert_close(state["W_enc"], (sae.W_enc * 2).float().detach())
    assert_close(state["b_enc"], sae.b_enc.float().detach())
    assert_close(state["W_dec"], (sae.W_dec / 2).float().detach())
    assert_close(state["b_dec"], (sae.b_dec / 2).float().detach())


@pytest.mark.parametrize("scale, extra, match", [
    (0.0, {}, "scale"), (float("nan"), {}, "scale"),
    (1.0, {"d": 5}, "'d'"), (1.0, {"layers": [1, 2]}, "layers"),
    (1.0, {"w": torch.ones(1)}, "w="), (1.0, {"l1": float("inf")}, "l1"),
])
def test_snapshot_refuses_bad_scale_and_extras(scale, extra, match):
    with pytest.raises(ValueError, match=match):
        random_sae(SAEConfig(d=4, n_features=6)).snapshot(scale, **extra)


def test_from_snapshot_refuses_mismatched_state():
    state = random_sae(SAEConfig(d=4, n_features=6)).snapshot(1.0)
    with pytest.raises(ValueError, match="W_dec"):
        SAE.from_snapshot({**state, "W_dec": torch.zeros(6, 5)})
    with pytest.raises(ValueError, match="b_enc"):
        SAE.from_snapshot({k: v for k, v in state.items() if k != "b_enc"})
    with pytest.raises(ValueError, match="arch"):
        SAE.from_snapshot({**state, "cfg": {**state["cfg"], "arch": "gated"}})


# ── losses ───────────────────────────────────────────────────────────────────────────────────


def two_by_three_sae(rows: list[list[float]], arch="relu", k=None) -> SAE:
    """d=2, F=3 with the given decoder rows."""
    sae = SAE(SAEConfig(d=2, n_features=3, arch=arch, k=k))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(rows))
    return sae


def test_relu_l1_loss_by_hand():
    sae = two_by_three_sae([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])  # decoder norms 5, 2, 1
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 4.0]])  # squared errors per row: 1, 1
    acts = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.5, 0.0]])  # Σ f·||W_dec||: 7, 1
    out = relu_l1_loss(sae, x, ForwardOutput(x_hat, acts, acts), l1_coeff=0.1)
    assert isinstance(out, LossOutput)
    # mean_rows(Σ_d err²)/d = (1+1)/2/2 = 0.5; penalty = 0.1 · (7+1)/2 = 0.4
    assert_close(out.loss, torch.tensor(0.9))
    assert_close(out.mse, torch.tensor(0.5))
    assert_close(out.sparsity, torch.tensor(4.0))
    assert out.aux.item() == 0.0
    assert not (out.mse.requires_grad or out.sparsity.requires_grad or out.aux.requires_grad)


def test_relu_l1_loss_gradient_reaches_decoder_norms():
    sae = random_sae(SAEConfig(d=4, n_features=6), seed=8)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(9))
    relu_l1_loss(sae, x, sae(x), l1_coeff=1.0).loss.backward()
    for p in sae.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def aux_case():
    """d=2, F=3; only feature 2 is dead. Worked through in test_topk_aux_loss_by_hand."""
    sae = two_by_three_sae([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], arch="topk", k=1)
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    x_hat = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    pre = torch.tensor([[0.5, 1.0, 1.5], [1.0, 0.0, -1.0]])
    return sae, x, ForwardOutput(x_hat, torch.zeros(2, 3), pre), torch.tensor([False, False, True])


def test_topk_aux_loss_by_hand():
    sae, x, out, dead = aux_case()
    res = topk_aux_loss(sae, x, out, dead, aux_k=2)  # 2 > one dead feature: uses just it
    # e = x − x̂ = [[1, 0], [0, −1]]; mean(e) = [.5, −.5]; Σ||e − mean||² = 4·0.25 = 1
    # ê: feature 2's relu(pre) = [1.5, 0] → ê = [[3, 0], [0, 0]]; Σ||e − ê||² = 4 + 1 = 5
    assert_close(res.aux, torch.tensor(5.0))
    assert_close(res.mse, torch.tensor(0.5))  # (1 + 0 + 0 + 1) / 4
    assert_close(res.loss, torch.tensor(0.5 + 5.0 / 32))
    assert res.sparsity.item() == 0.0
    assert_close(topk_aux_loss(sae, x, out, dead, aux_k=2, aux_coeff=1.0).loss, torch.tensor(5.5))


def test_topk_aux_loss_is_zero_without_dead_features():
    sae, x, out, _ = aux_case()
    res = topk_aux_loss(sae, x, out, torch.zeros(3, dtype=torch.bool), aux_k=2)
    assert res.aux.item() == 0.0
    assert_close(res.loss, res.mse)


def test_topk_aux_loss_without_error_variance_is_zero():
    sae, x, out, dead = aux_case()
    res = topk_aux_loss(sae, x[:1], ForwardOutput(*(t[:1] for t in out)), dead, aux_k=2)
    assert res.aux.item() == 0.0 and torch.isfinite(res.loss)


def test_topk_aux_matches_dense_reference():
    sae = random_sae(SAEConfig(d=8, n_features=32, arch="topk", k=4), seed=10)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(11))
    out = sae(x)
    dead = torch.arange(32) % 3 == 0
    aux = topk_aux_loss(sae, x, out, dead, aux_k=5).aux
    masked = torch.where(dead, out.pre_acts, torch.tensor(float("-inf")))
    keep = torch.zeros_like(masked, dtype=torch.bool)
    keep.scatter_(1, masked.topk(5, dim=1).indices, True)
    z = torch.where(keep, torch.relu(out.pre_acts), torch.zeros(()))  # (N, F) dense
    e = (x - out.x_hat).detach()
    expected = ((e - z @ sae.W_dec) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert_close(aux, expected.detach())


def test_topk_aux_loss_gradient_reaches_dead_features():
    sae = random_sae(SAEConfig(d=4, n_features=6, arch="topk", k=1), seed=12)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre_act positive; k=1 leaves some features never chosen
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(13))
    out = sae(x)
    dead = (out.acts == 0).all(dim=0)
    assert dead.any()
    topk_aux_loss(sae, x, out, dead, aux_k=default_aux_k(sae.cfg)).loss.backward()
    assert sae.W_enc.grad[:, dead].abs().sum() > 0  # only AuxK can reach unused features
    assert sae.W_dec.grad[dead].abs().sum() > 0
    assert sae.W_dec.grad[~dead].abs().sum() > 0


def test_default_aux_k():
    assert default_aux_k(SAEConfig(d=1024, n_features=32768, arch="topk", k=32)) == 512
    assert default_aux_k(SAEConfig(d=4, n_features=6, arch="topk", k=2)) == 2
    assert default_aux_k(SAEConfig(d=1, n_features=1, arch="topk", k=1)) == 1


# ── training sanity ──────────────────────────────────────────────────────────────────────────


def sparse_data(steps: int, batch: int, d: int = 16, n_true: int = 32, seed: int = 14):
    """Batches of x = Σ c_i·g_i over ~3 of n_true random unit directions g_i."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    for _ in range(steps):
        on = torch.rand(batch, n_true, generator=gen) < 3 / n_true
        coeff = on * torch.rand(batch, n_true, generator=gen) * 2  # (batch, n_true)
        yield coeff @ dirs  # (batch, d)


@pytest.fixture
def one_thread():
    """Tiny tensors: thread hand-offs would cost more than the maths (10x on a 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch, k", [("relu", None), ("topk", 4)])
def test_training_reduces_the_loss(arch, k, one_thread):
    torch.manual_seed(0)
    cfg = SAEConfig(d=16, n_features=64, arch=arch, k=k)
    sae = SAE.initialized(cfg, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    dead = torch.zeros(64, dtype=torch.bool)
    losses = []
    for x in sparse_data(steps=200, batch=128):
        out = sae(x)
        res = (relu_l1_loss(sae, x, out, l1_coeff=1e-3) if arch == "relu"
               else topk_aux_loss(sae, x, out, dead, aux_k=8))
        opt.zero_grad()
        res.loss.backward()
        if arch == "topk":
            sae.remove_parallel_grad_()
        opt.step()
        if arch == "topk":
            sae.normalize_decoder_()
        losses.append(res.loss.item())
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:5])
