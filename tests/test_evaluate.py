"""saecache eval: CE loss recovered and the rest against hand-built SAEs and hand-made forwards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from saecache.evaluate.splice import ce_loss_recovered, evaluate_sae
from saecache.sae.model import SAE, SAEConfig
from saecache.demo.tiny import TinyModelConfig, build_tiny_model
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.loop import train
from tests.test_cli import assert_one_line_error, run

D = 64


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens(train_cache):
    import zarr

    return torch.from_numpy(zarr.open_group(train_cache, mode="r")["tokens"][:6]).long()  # (6, 64)


def identity_sae() -> SAE:
    """x̂ = relu(x) − relu(−x) = x exactly: the SAE that reconstructs perfectly."""
    sae = SAE(SAEConfig(d=D, n_features=2 * D))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_ce_loss_recovered_formula():
    assert ce_loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert ce_loss_recovered(2.0, 3.0, 5.0) == pytest.approx(2 / 3)


def test_a_perfect_sae_recovers_everything(model, tokens):
    result = evaluate_sae(model, model.gpt_neox.layers[1], identity_sae(), tokens, batch_size=4)
    assert result.ce_spliced == result.ce_clean
    assert result.ce_loss_recovered == 1.0 and result.kl == pytest.approx(0, abs=1e-7)
    assert result.fvu == 0 and result.l0 == pytest.approx(D, abs=1)
    assert result.tokens == 6 * 64


def test_an_sae_that_outputs_zeros_recovers_nothing(model, tokens):
    zeros = SAE(SAEConfig(d=D, n_features=4 * D))
    result = evaluate_sae(model, model.gpt_neox.layers[1], zeros, tokens, batch_size=4)
    assert result.ce_spliced == result.ce_zero and result.ce_zero != result.ce_clean
    assert result.ce_loss_recovered == 0.0
    assert result.l0 == 0 and result.dead_fraction == 1.0 and result.dense_fraction == 0.0


def test_spliced_ce_equals_a_forward_with_the_block_output_replaced_by_hand(model, tokens):
    sae = SAE.initialized(SAEConfig(d=D, n_features=4 * D), seed=3)
    block = model.gpt_neox.layers[2]
    # by hand: the block's output, its reconstruction, then a forward that returns it
    kept = []
    handle = block.register_forward_hook(lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        clean_logits = model(tokens).logits
    handle.remove()
    x_hat = sae(kept[0].reshape(-1, D)).x_hat.reshape(kept[0].shape)
    handle = block.register_forward_hook(lambda m, a, out: (x_hat, *out[1:]) if isinstance(out, tuple) else x_hat)
    with torch.no_grad():
        logits = model(tokens).logits
    handle.remove()
    targets = tokens[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets).item()
    ce_clean = F.cross_entropy(clean_logits[:, :-1].reshape(-1, logits.shape[-1]), targets).item()
    p = F.log_softmax(clean_logits[:, :-1], -1)
    q = F.log_softmax(logits[:, :-1], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    result = evaluate_sae(model, block, sae, tokens, batch_size=4)
    assert result.ce_spliced == pytest.approx(ce, rel=1e-5)
    assert result.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert result.kl == pytest.approx(kl, rel=1e-4)


@pytest.fixture(scope="module")
def runs(train_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train(TrainConfig(cache=str(train_cache), out=str(out), layers=(1,), expansion=4, tokens=2560,
                      snapshots=(1280,), device="cpu", progress=False,
                      reader=ReaderConfig(batch_size=128, threads=2, mix_chunks=4)))
    return out


def test_eval_writes_eval_json_beside_the_run(runs, tiny_model):
    result = run("eval", runs, "--device", "cpu", "--snapshot", "all", "--max-seqs", 8)
    assert result.exit_code == 0, result.output
    data = json.loads((runs / "layer01-relu-x4-l1-0.0003" / "eval.json").read_text())
    assert set(data["snapshots"]) == {"sae_layer01_1280.pt", "sae_layer01_final.pt"}
    final = data["snapshots"]["sae_layer01_final.pt"]
    for key in ("ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered", "kl", "l0", "mse", "fvu",
                "dead_fraction", "dense_fraction", "tokens", "tokens_seen"):
        assert key in final, key
    assert final["tokens"] == 8 * 64 and final["tokens_seen"] == 2560
    assert "CE loss recovered" in result.output


def test_a_run_without_snapshots_is_one_line(runs, tmp_path):
    bare = tmp_path / "layer01-relu-x4-l1-0.0003"
    bare.mkdir()
    shutil.copy(runs / "layer01-relu-x4-l1-0.0003" / "run.json", bare)
    assert_one_line_error(run("eval", bare, "--device", "cpu"), "has no snapshots")


def test_a_model_of_another_width_is_one_line(runs, tmp_path):
    other = build_tiny_model(tmp_path / "wide", TinyModelConfig(d_model=32))
    result = run("eval", runs, "--model", other, "--device", "cpu")
    assert_one_line_error(result, "d=64", "d=32")


def test_an_unknown_snapshot_lists_the_ones_there(runs):
    assert_one_line_error(run("eval", runs, "--snapshot", "7M", "--device", "cpu"), "'7M'", "final")
