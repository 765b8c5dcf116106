"""Finding a decoder's blocks, and harvest storing exactly what a forward hook on each block sees."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from saecache.core.errors import SaecacheError
from saecache.harvest.loop import harvest
from saecache.harvest.prepare import blocks_path_of
from saecache.harvest.models import find_blocks, load_config, load_model
from tests.conftest import harvest_config

# name → (blocks path, builder of a tiny random model; None: the conftest GPT-NeoX)
ARCHS = {
    "gpt_neox": ("gpt_neox.layers", None),
    "gpt2": ("transformer.h", lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=512, n_embd=48, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0))),
    "llama": ("model.layers", lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0))),
}


@pytest.fixture(scope="session")
def model_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Each architecture saved with random weights and the tiny tokenizer, loadable by path."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dirs = {"gpt_neox": tiny_model}
    for name, (_, build) in ARCHS.items():
        if build is None:
            continue
        folder = tmp_path_factory.mktemp(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[name] = folder
    return dirs


# ---- finding the blocks --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks(arch, model_dirs):
    expected, _ = ARCHS[arch]
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    n = model.config.num_hidden_layers
    path, blocks = find_blocks(model, n)
    assert path == expected
    assert blocks is model.get_submodule(expected) and len(blocks) == n


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_path_of_config_agrees(arch, model_dirs):
    config = AutoConfig.from_pretrained(model_dirs[arch])
    assert blocks_path_of(config, config.num_hidden_layers) == ARCHS[arch][0]


def test_find_blocks_with_the_wrong_layer_count_is_refused(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    with pytest.raises(SaecacheError, match="no list of 5 blocks"):
        find_blocks(model, 5)


def test_find_blocks_takes_the_shallowest_list_of_that_length():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))  # also 3 long, deeper

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.blocks = nn.ModuleList(Block() for _ in range(3))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()
            self.extra = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    model = Wrapper()
    path, blocks = find_blocks(model, 3)
    assert path == "decoder.blocks" and blocks is model.decoder.blocks


# ---- harvest stores what a forward hook returns -------------------------------------------------


def reference(folder: Path, blocks_path: str, tokens: np.ndarray, batch_size: int):
    """Each block's output as an independent forward hook sees it, (n_seq·ctx, d) float16 per
    block, and the final hidden state Hugging Face reports (final norm applied)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval()
    blocks = model.get_submodule(blocks_path)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]

    def keep(layer, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen[layer].append(hidden.detach().clone())

    handles = [block.register_forward_hook(partial(keep, i)) for i, block in enumerate(blocks)]
    final = []
    try:
        with torch.no_grad():
            for start in range(0, len(tokens), batch_size):
                ids = torch.from_numpy(tokens[start:start + batch_size]).long()
                out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
                final.append(out.hidden_states[-1])
    finally:
        for handle in handles:
            handle.remove()
    d = model.config.hidden_size
    return [torch.cat(s).reshape(-1, d) for s in seen], torch.cat(final).reshape(-1, d)


@pytest.fixture(scope="module", params=list(ARCHS))
def harvested(request, model_dirs, tmp_path_factory):
    """(arch, cache path, reference per-block outputs, reference final hidden state)."""
    arch = request.param
    if arch == "gpt_neox":
        path = request.getfixturevalue("cache_path")  # conftest's harvest of the same model
    else:
        path = tmp_path_factory.mktemp(f"cache-{arch}") / "cache.zarr"
        harvest(harvest_config(path, model_dirs[arch]))
    cfg = harvest_config(path, model_dirs[arch])
    assert cfg.dtype == "float16"  # the reference below runs the model in the same dtype
    tokens = zarr.open_group(str(path), mode="r")["tokens"][:]
    per_block, final = reference(model_dirs[arch], ARCHS[arch][0], tokens, cfg.batch_size)
    return arch, path, per_block, final


def test_harvest_stores_each_block_output_exactly(harvested):
    arch, path, per_block, _ = harvested
    group = zarr.open_group(str(path), mode="r")
    n_seq, ctx = group["tokens"].shape
    assert sorted(group["resid"].array_keys()) == [f"{i:02d}" for i in range(len(per_block))]
    for layer, expected in enumerate(per_block):
        stored = group[f"resid/{layer:02d}"][:]
        assert stored.dtype == np.float16 and stored.shape == (n_seq * ctx, expected.shape[1])
        stored = torch.from_numpy(stored)
        assert torch.equal(stored, expected), (
            f"{arch} block {layer}: {int((stored != expected).sum())} values differ, "
            f"max |diff| {(stored.float() - expected.float()).abs().max().item()}")


def test_reference_tells_blocks_and_final_norm_apart(harvested):
    """The exact comparison above would catch an off-by-one block or a stored final norm."""
    _, _, per_block, final = harvested
    for earlier, later in zip(per_block, per_block[1:]):
        assert not torch.equal(earlier, later)
    assert not torch.allclose(per_block[-1].float(), final.float(), atol=1e-3)


def test_harvest_of_some_layers_stops_early_and_stays_exact(model_dirs, tmp_path):
    path = tmp_path / "cache.zarr"
    cfg = harvest_config(path, model_dirs["llama"], layers="1", tokens=512)  # blocks after 1 skipped
    harvest(cfg)
    group = zarr.open_group(str(path), mode="r")
    assert list(group["resid"].array_keys()) == ["01"]
    per_block, _ = reference(model_dirs["llama"], "model.layers", group["tokens"][:], cfg.batch_size)
    assert torch.equal(torch.from_numpy(group["resid/01"][:]), per_block[1])


# ---- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [
    load_config,
    partial(load_model, revision=None, dtype="float16", device="cpu"),
], ids=["load_config", "load_model"])
@pytest.mark.parametrize("name", ["{tmp}/no-such-model", "nobody/no-such-model"], ids=["path", "hub-id"])
def test_loading_a_model_that_does_not_exist_is_one_line(load, name, tmp_path):
    name = name.format(tmp=tmp_path)
    with pytest.raises(SaecacheError) as excinfo:  # tests run with HF_HUB_OFFLINE=1
        load(name)
    assert "\n" not in str(excinfo.value) and repr(name) in str(excinfo.value)
