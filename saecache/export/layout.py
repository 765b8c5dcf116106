"""What an export folder holds and what its files are called.

    pt        sae_layer{LL}_{SNAP}.pt                      (the run folder's own snapshot names)
    saelens   blocks.{L}.hook_resid_post/cfg.json          one SAELens folder per run
              blocks.{L}.hook_resid_post/sae_weights.safetensors
    both      README.md                                    the model card, marked as an export's
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saecache.export.runs import ExportRun
from saecache.train.runfolder import Snapshot

FORMATS = ("pt", "saelens")
CARD = "README.md"
CARD_MARKER = "<!-- saecache export"
"""First characters of the comment line that marks a folder's README.md as an export's card."""
SAELENS_CFG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAELENS_WEIGHTS = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
HOOK_FOLDER = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
"""The name of a SAELens folder: :func:`transformer_lens_hook` of its layer."""


def transformer_lens_hook(layer: int) -> str:
    """TransformerLens name of the residual stream after block ``layer`` (what saecache stores).

    For GPT-NeoX it is the output of ``gpt_neox.layers[layer]``; TransformerLens calls the
    output of any block ``blocks.{layer}.hook_resid_post``.
    """
    return f"blocks.{layer}.hook_resid_post"


@dataclass(frozen=True)
class ExportedFile:
    """One file of an export (README.md aside)."""

    run: ExportRun
    """The run it comes from."""
    snapshot: Snapshot
    """Which of the run's snapshots it holds (16K, final)."""
    name: str
    """Its path inside the export folder, "/"-separated."""
