"""Build the tiny built-in GPT-NeoX model and its tokenizer, offline.

The folder written by :func:`build_tiny_model` loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` exactly as EleutherAI/pythia-410m does (same architecture, same tokenizer class
and special tokens), but holds random weights and a byte-level BPE trained on the bundled demo text, so demos and
tests run in seconds without the Hugging Face Hub.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.utils import logging as hf_logging
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXTokenizer, PreTrainedTokenizerFast

DEMO_TEXT = Path(__file__).resolve().parent / "data" / "demo.txt"
"""Bundled English sample: one document per paragraph, paragraphs separated by a blank line."""

BUNDLED_MODEL = Path(__file__).resolve().parent / "data" / "tiny-model"
"""The demo's model, built once by :func:`build_tiny_model` with :data:`DEMO_MODEL` and
shipped (870 KB): pre-training it takes 10 s on two quiet CPU cores but minutes on busy ones,
and a demo should spend its minute on saecache. Rebuild it after changing the model code with
``build_tiny_model(BUNDLED_MODEL, DEMO_MODEL, bundled=False)`` (tests check it still loads,
matches its config and tokenizer, and has learnt the text)."""

EOS_TOKEN = "<|endoftext|>"
"""Pythia's end-of-text token, also used as bos and unk (id 0)."""

PAD_TOKEN = "<|padding|>"
"""Pythia's padding token (id 1)."""

MARKER = "saecache_tiny.json"
"""File in the model folder recording the config it was built from."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny random GPT-NeoX."""

    n_layers: int = 3
    """Number of transformer blocks."""
    d_model: int = 64
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads per block."""
    d_mlp: int = 256
    """Hidden width of each MLP."""
    vocab_size: int = 512
    """Tokenizer vocabulary and embedding rows."""
    max_ctx: int = 256
    """Maximum sequence length (positions and tokenizer ``model_max_length``)."""
    seed: int = 0
    """Seed for the random weights."""
    pretrain_steps: int = 0
    """Steps of next-token training on the bundled text (0: random weights), so that a demo's
    CE figures mean something; 300 steps take ~10 s on two quiet CPU cores (loss 6.3 → 3.1)."""


DEMO_MODEL = TinyModelConfig(pretrain_steps=300)
"""The demo's model: the default shape, pre-trained for 300 steps (shipped: BUNDLED_MODEL)."""


def _paragraphs(text_path: Path | str) -> Iterator[str]:
    """Yield the non-empty paragraphs of a text file."""
    for paragraph in Path(text_path).read_text(encoding="utf-8").split("\n\n"):
        if paragraph.strip():
            yield paragraph


def _train_bpe(text_path: Path | str, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with Pythia's normalizer, pre-tokenizer and special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_paragraphs(text_path), trainer=trainer)
    return tokenizer


def build_tokenizer(
    text_path: Path | str = DEMO_TEXT,
    vocab_size: int = 512,
    model_max_length: int = TinyModelConfig.max_ctx,
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on ``text_path`` and wrap it as Pythia's tokenizer class."""
    bpe = json.loads(_train_bpe(text_path, vocab_size).to_str())["model"]
    return GPTNeoXTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(merge) for merge in bpe["merges"]],
        unk_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def _neox_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPTNeoXConfig:
    """GPT-NeoX config shaped by ``cfg``, with Pythia's rotary and residual layout."""
    return GPTNeoXConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.max_ctx,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _pretrain(model: GPTNeoXForCausalLM, tokenizer, cfg: TinyModelConfig, ctx: int = 64,
              batch: int = 16) -> None:
    """A few AdamW steps of next-token prediction on random windows of the bundled text."""
    if not cfg.pretrain_steps:
        return
    # verbose=False: a paragraph may be longer than model_max_length; the windows below cut it
    ids = [i for doc in _paragraphs(DEMO_TEXT)
           for i in tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
           + [tokenizer.eos_token_id]]
    stream = torch.tensor(ids)  # (n,)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(cfg.pretrain_steps):
        starts = torch.randint(0, len(stream) - ctx, (batch,), generator=generator)
        windows = torch.stack([stream[s:s + ctx] for s in starts.tolist()])  # (batch, ctx)
        loss = model(windows, labels=windows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _is_built(path: Path, cfg: TinyModelConfig) -> bool:
    """Whether ``path`` already holds a complete tiny model built from ``cfg``."""
    marker = path / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == asdict(cfg)


def build_tiny_model(path: Path | str, cfg: TinyModelConfig = TinyModelConfig(),
                     bundled: bool = True) -> Path:
    """Write the tiny model and tokenizer to ``path`` (reusing a matching build) and return the
    path. The shipped build of ``cfg`` is copied when there is one and ``bundled`` allows it."""
    path = Path(path)
    if _is_built(path, cfg):
        return path
    if bundled and _is_built(BUNDLED_MODEL, cfg):
        return _copy_bundled(path)
    tokenizer = build_tokenizer(vocab_size=cfg.vocab_size, model_max_length=cfg.max_ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPTNeoXForCausalLM(_neox_config(cfg, tokenizer))
        _pretrain(model, tokenizer, cfg)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / MARKER).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return path


def _copy_bundled(path: Path) -> Path:
    """Copy the shipped model folder to ``path``, its marker last (a cut copy is rebuilt)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    for file in sorted(BUNDLED_MODEL.iterdir()):
        if file.name != MARKER:
            shutil.copyfile(file, path / file.name)
    shutil.copyfile(BUNDLED_MODEL / MARKER, path / MARKER)
    return path
