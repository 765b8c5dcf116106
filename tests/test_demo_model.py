"""The demo's shipped model: what it claims to be, and that it has learnt the bundled text."""

from __future__ import annotations

import json
from dataclasses import asdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saecache.demo.tiny import (BUNDLED_MODEL, DEMO_MODEL, DEMO_TEXT, MARKER, TinyModelConfig,
                                build_tiny_model, build_tokenizer)


def _ce(model, tokenizer, windows: int = 8, ctx: int = 64) -> float:
    """Mean next-token CE on the first ``windows`` windows of the bundled text."""
    ids = tokenizer(DEMO_TEXT.read_text()[:20000], add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[:windows * ctx]).reshape(windows, ctx)
    with torch.no_grad():
        return float(model(batch, labels=batch).loss)


def test_the_shipped_model_is_the_demo_config():
    assert json.loads((BUNDLED_MODEL / MARKER).read_text()) == asdict(DEMO_MODEL)
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        DEMO_MODEL.n_layers, DEMO_MODEL.d_model, DEMO_MODEL.vocab_size)


def test_the_shipped_tokenizer_is_the_one_built_from_the_text():
    shipped = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    built = build_tokenizer(vocab_size=DEMO_MODEL.vocab_size, model_max_length=DEMO_MODEL.max_ctx)
    assert shipped.get_vocab() == built.get_vocab()
    text = DEMO_TEXT.read_text()[:2000]
    assert shipped(text)["input_ids"] == built(text)["input_ids"]


def test_the_shipped_model_has_learnt_the_text(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    trained = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    untrained = build_tiny_model(tmp_path / "random", TinyModelConfig())
    random_model = AutoModelForCausalLM.from_pretrained(untrained).eval()
    # ln(512) = 6.2 for a uniform guess; the docstring's 300 steps reach ~3.1
    assert _ce(random_model, tokenizer) > 5.5
    assert _ce(trained, tokenizer) < 4.0


def test_building_the_demo_model_copies_the_shipped_one(tmp_path):
    path = build_tiny_model(tmp_path / "model", DEMO_MODEL)
    for file in BUNDLED_MODEL.iterdir():
        assert (path / file.name).read_bytes() == file.read_bytes(), file.name
    (path / MARKER).unlink()  # a copy cut short: copied again
    (path / "model.safetensors").write_bytes(b"cut")
    build_tiny_model(path, DEMO_MODEL)
    assert (path / "model.safetensors").read_bytes() == (BUNDLED_MODEL / "model.safetensors").read_bytes()


def test_another_config_is_built_not_copied(tmp_path):
    path = build_tiny_model(tmp_path / "model", TinyModelConfig(seed=1))
    assert json.loads((path / MARKER).read_text())["seed"] == 1
    assert (path / "model.safetensors").read_bytes() != (BUNDLED_MODEL / "model.safetensors").read_bytes()
