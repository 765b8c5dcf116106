"""Loading a Hugging Face decoder and finding its blocks through the model's own structure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from saecache.core.errors import SaecacheError, first_line

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _load(what: str, loader, name: str, revision: str | None, **kwargs):
    """Call a ``from_pretrained``; turn "not found / offline" into one line."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise SaecacheError(f"model folder {name!r} does not exist: give a Hub id or a saved model")
    try:
        return loader(name, revision=revision, **kwargs)
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise SaecacheError(
            f"could not load the {what} of {name!r}: {reason} (pass a local folder, or check the "
            "id, --revision and the network)"
        ) from None


def load_config(name: str, revision: str | None = None):
    """The model's configuration (cheap: no weights)."""
    from transformers import AutoConfig

    return _load("config", AutoConfig.from_pretrained, name, revision)


def load_tokenizer(name: str, revision: str | None = None):
    """The model's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, name, revision)
    if tokenizer.eos_token_id is None:
        raise SaecacheError(f"the tokenizer of {name!r} has no EOS token to join documents with")
    return tokenizer


def load_model(name: str, revision: str | None, dtype: str, device: str) -> nn.Module:
    """The causal LM in eval mode, on ``device``, in ``dtype``, with gradients off."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # saecache shows its own progress

    if dtype not in DTYPES:
        raise SaecacheError(f"--dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    model = _load("weights", AutoModelForCausalLM.from_pretrained, name, revision,
                  dtype=DTYPES[dtype])
    model.requires_grad_(False)
    return model.to(device).eval()


def vocab_hash(tokenizer) -> str:
    """sha256 of the vocabulary (token → id), independent of dict order."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return "sha256:" + hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def n_layers_of(config) -> int:
    """Number of blocks, under any of the names Hugging Face configs use."""
    return int(config.num_hidden_layers)


def max_ctx_of(config) -> int | None:
    """Longest context the model was built for, when the config says."""
    return getattr(config, "max_position_embeddings", None)


def find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The module list of the decoder's blocks: ``gpt_neox.layers``, ``transformer.h``,
    ``model.layers``… found as the shallowest ``ModuleList`` with one entry per layer."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if not candidates:
        raise SaecacheError(
            f"found no list of {n_layers} blocks in {type(model).__name__}; saecache supports "
            "Hugging Face decoders whose blocks sit in one nn.ModuleList"
        )
    return min(candidates, key=lambda c: c[0].count("."))


def block_output(output) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output
