"""An export's model card (README.md), after the published pythia-410m card.

    front matter    Hub metadata (library_name, tags, base_model and datasets when Hub ids)
    title           what the SAEs are, on which blocks of which model
    contents        base model, layers, architecture, F, sparsity, tokens, snapshots, files
    layout          the file naming (pt) or the SAELens folders, and every file
    loading         a Python snippet for the format
    sister runs     other families found in the same RUNS folders
    metrics         held-out FVU / L0 / MSE / dead (+ CE loss recovered from eval.json)
    reproducing     the harvest and train commands

Each section is one function of a :class:`ModelCard`, the facts the sections are written from;
the sections about the runs (sister runs, metrics, reproducing) are in card_runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from saecache import __version__
from saecache.core.atomic import write_text
from saecache.core.units import format_count
from saecache.export.card_runs import layers_text, metrics, reproducing, sister_runs
from saecache.export.layout import (CARD, CARD_MARKER, FORMATS, SAELENS_CFG, SAELENS_WEIGHTS,
                                    ExportedFile)
from saecache.export.runs import ExportRun
from saecache.sae.archs import arch_of
from saecache.train.runfolder import FINAL, Snapshot

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelCard:
    """What an export's README.md is written from: its files, format and repository."""

    def __init__(self, files: list[ExportedFile], fmt: str, repo_id: str):
        self.files, self.fmt, self.repo_id = files, fmt, repo_id
        self.runs: list[ExportRun] = list(dict.fromkeys(f.run for f in files))
        """The exported runs, by layer."""
        self.snapshots: dict[ExportRun, list[Snapshot]] = {
            run: list(dict.fromkeys(f.snapshot for f in files if f.run is run))
            for run in self.runs}
        """Each run's exported snapshots, in order."""
        self.model = self.runs[0].record.model
        self.cache = self.runs[0].record.cache
        """The cache's provenance (the same model for every run)."""

    def each(self, text: Callable[[ExportRun], str]) -> str:
        """One value, or each different value once when the runs differ."""
        return "; ".join(dict.fromkeys(text(r) for r in self.runs))

    def layers(self) -> str:
        """The exported layers: 0–3, 8."""
        return layers_text(r.spec.layer for r in self.runs)

    def render(self) -> str:
        sections = (front_matter, title, contents, layout, loading, sister_runs, metrics,
                    reproducing)
        return "\n\n".join(text for text in (s(self) for s in sections) if text) + "\n"


def write_model_card(files: list[ExportedFile], out: Path, fmt: str, repo_id: str | None) -> Path:
    """README.md in ``out``: Hub front matter, contents, every file, loading, sister runs,
    held-out metrics and how to reproduce (after the published pythia-410m card).

    ``repo_id`` names the repository in the title and the loading snippet (None: a
    placeholder after ``out``'s name).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    card = ModelCard(files, fmt, repo_id or f"<user>/{out.resolve().name}")
    path = out / CARD
    write_text(path, card.render())
    return path


def front_matter(card: ModelCard) -> str:
    saelens = card.fmt == "saelens"
    tags = ["sparse-autoencoder", "saecache"] + (["sae_lens"] if saelens else [])
    lines = ["---", f"library_name: {'saelens' if saelens else 'saecache'}",
             "tags:", *[f"- {t}" for t in tags]]
    if _is_hub_id(card.model):
        lines.append(f"base_model: {card.model}")
    if _is_hub_id(card.cache["dataset"]):
        lines += ["datasets:", f"- {card.cache['dataset']}"]
    marker = (f"{CARD_MARKER} (format {card.fmt}, saecache {__version__}): "
              "`saecache export` rewrites this folder as a whole -->")
    return "\n".join(lines + ["---", marker])


def title(card: ModelCard) -> str:
    name = card.repo_id.split("/")[-1]
    what = "SAELens folders" if card.fmt == "saelens" else "checkpoints"
    blocks = "block" + "s" * (len(card.runs) > 1)
    return (f"# {name} — Sparse Autoencoders on {card.model}\n\n"
            f"Sparse autoencoder (SAE) {what}, trained with saecache on the residual stream "
            f"after {blocks} {card.layers()} of `{card.model}`.")


def _sparsity(run) -> str:
    """The sparsity setting, and for an L1 coefficient its λ_Anthropic (docs/l1-units.md)."""
    text = arch_of(run.spec.arch).describe(run.spec)
    lam = run.record.l1_anthropic
    return text if lam is None else f"{text}; λ_Anthropic {lam:.3g} (SAELens-standard units)"


def contents(card: ModelCard) -> str:
    d, n_layers, cache = card.cache["d"], len(card.runs), card.cache
    penalised = all(arch_of(r.spec.arch).penalised for r in card.runs)
    rows = [
        ("Base model", f"`{card.model}`"),
        ("Layers covered", f"{card.layers()} ({n_layers} layer{'s' * (n_layers != 1)})"),
        ("Hook", "output of each block (TransformerLens `blocks.{L}.hook_resid_post`)"),
        ("Architecture", card.each(lambda r: arch_of(r.spec.arch).title)),
        ("SAE expansion factor", card.each(
            lambda r: f"{r.spec.expansion} → F = {r.spec.expansion * d:,} dictionary "
                      "features per layer")),
        ("Hidden dim being modeled", f"{d}"),
        ("L1 coefficient" if penalised else "Sparsity", card.each(_sparsity)),
        ("Tokens trained", card.each(
            lambda r: f"{_tokens(r.record.train['tokens'])} "
                      f"({cache['dataset']}, ctx {cache['ctx']})")),
        ("Snapshots per layer", card.each(lambda r: _snapshots_text(card.snapshots[r]))),
        ("Total files", _total_files(card)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Contents\n\n| | |\n| --- | --- |\n{table}"


def _total_files(card: ModelCard) -> str:
    n = len(card.runs)
    if card.fmt == "saelens":
        return f"{n} SAELens folder{'s' * (n != 1)} ({SAELENS_CFG} + {SAELENS_WEIGHTS} each)"
    per = {len(s) for s in card.snapshots.values()}
    shape = f" ({n} layer{'s' * (n != 1)} × {per.pop()} snapshots)" if len(per) == 1 else ""
    return f"{len(card.files)} .pt checkpoints{shape}"


def _snapshots_text(snapshots: list[Snapshot]) -> str:
    labels = [s.label for s in snapshots]
    steps = [label for label in labels if label != FINAL]
    if not steps:
        return "1 — final"
    tail = ", plus final" if FINAL in labels else ""
    return f"{len(labels)} — at {', '.join(steps)} tokens{tail}"


def layout(card: ModelCard) -> str:
    listing = "\n".join(f"- `{f.name}`" for f in card.files)
    return (_pt_naming(card) if card.fmt == "pt" else _saelens_layout(card)) + \
        f"\n\n### Files\n\n{listing}"


def _pt_naming(card: ModelCard) -> str:
    ordered = sorted((f.snapshot for f in card.files), key=lambda s: s.order)
    snaps = ", ".join(dict.fromkeys(s.label for s in ordered))
    layers = ", ".join(f"{r.spec.layer:02d}" for r in card.runs)
    return (
        "## File naming\n\n`sae_layer{LL}_{SNAPSHOT}.pt`\n\n"
        f"Where LL is the layer index ({layers}) and SNAPSHOT is one of {snaps} (tokens "
        "seen when it was saved, or the end of training).\n\n"
        "Each file is a dict of float32 tensors `W_enc` (d, F), `b_enc` (F), `W_dec` "
        "(F, d), `b_dec` (d) and `cfg`, a plain dict (arch, k, apply_b_dec_to_input, "
        "layer, d, F, l1, target_l0, tokens_seen, input_scale, model, dataset, ctx, "
        "run). The weights take **raw** residuals: the input normalisation used in "
        "training is folded in (`cfg['input_scale']` is for information only).")


def _saelens_layout(card: ModelCard) -> str:
    return (
        "## Layout\n\n"
        "One SAELens folder per layer, named by its TransformerLens hook (the SAELens "
        "`sae_id`): `blocks.{L}.hook_resid_post/` holding `cfg.json` and "
        "`sae_weights.safetensors` (`W_enc` (d_in, d_sae), `W_dec` (d_sae, d_in), `b_enc`, "
        "`b_dec`, float32). Snapshot: "
        f"{card.each(lambda r: card.snapshots[r][0].label)}. The weights take **raw** "
        "residuals (`normalize_activations: none`); `metadata.saecache` keeps the "
        "saecache configuration.")


def loading(card: ModelCard) -> str:
    if card.fmt == "pt":
        return _PT_LOADING.format(repo=card.repo_id, file=_example_file(card))
    return _SAELENS_LOADING.format(repo=card.repo_id, model=card.model,
                                   hook=_example_file(card).split("/")[0])


def _example_file(card: ModelCard) -> str:
    """The file the loading snippet names: the middle one of the final snapshots."""
    last = [f.name for f in card.files if f.snapshot.label == FINAL] or [card.files[0].name]
    return last[len(last) // 2]


# The loading snippets keep their literal Python: they are documentation for users.
_PT_LOADING = """## Loading

```python
import torch
from huggingface_hub import hf_hub_download

ckpt_path = hf_hub_download(
    repo_id="{repo}",
    filename="{file}",
)
state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
cfg = state["cfg"]

# x: (N, d) residual stream after block cfg["layer"] (a forward hook on the block's output)
pre = (x - state["b_dec"] * cfg["apply_b_dec_to_input"]) @ state["W_enc"] + state["b_enc"]
if cfg["arch"] == "topk":  # keep the k largest pre-activations
    top = pre.topk(cfg["k"], dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
else:
    f = pre.relu()
x_hat = f @ state["W_dec"] + state["b_dec"]
```"""

_SAELENS_LOADING = """## Loading

```python
from sae_lens import SAE

sae = SAE.from_pretrained("{repo}", "{hook}")  # release = repo id, sae_id = folder
# or, from a local copy of this folder:
sae = SAE.load_from_disk("path/to/{hook}")
```

The SAEs read raw residuals. With TransformerLens, load the model without weight processing
(`HookedSAETransformer.from_pretrained_no_processing("{model}", center_writing_weights=False)`)
and hook `{hook}`; with Hugging Face transformers, use the output of the block
(`model.gpt_neox.layers[L]` for GPT-NeoX)."""


def _tokens(n: int) -> str:
    text = format_count(n)
    return text if text[-1] in "KMBT" else f"{n:,}"


def _is_hub_id(name: str) -> bool:
    """owner/name that is not a local path: worth a base_model / datasets entry."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()
