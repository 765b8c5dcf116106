"""The ``saelens`` export: one SAELens (v6) folder per run, from one snapshot, with a model card.

    out/blocks.{L}.hook_resid_post/cfg.json                   SAELens config (saelens_config)
    out/blocks.{L}.hook_resid_post/sae_weights.safetensors    W_enc, W_dec, b_enc, b_dec (and the
                                                              arch's own: threshold), float32
    out/README.md

The fields and their sources are in docs/export.md.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from saecache import __version__
from saecache.core.atomic import atomic_write, write_json
from saecache.core.errors import SaecacheError, first_line
from saecache.export.folder import publish
from saecache.export.layout import SAELENS_CFG, SAELENS_WEIGHTS, ExportedFile, transformer_lens_hook
from saecache.export.runs import ExportRun, read_runs
from saecache.sae.archs import ARCHS
from saecache.sae.model import SAE, SNAPSHOT_TENSORS_BY_ARCH
from saecache.train.runfolder import Snapshot

SAELENS_FORMAT_VERSION = "6.0.0"
"""metadata.sae_lens_version written to cfg.json: SAELens reads a config without a version
≥ 6.0.0 as a legacy one (handle_pre_6_0_config) and moves its fields around."""


def export_saelens(runs: Iterable[str | Path], out: str | Path, snapshot: str = "final",
                   repo_id: str | None = None) -> list[Path]:
    """One SAELens folder per run, ``out/blocks.{L}.hook_resid_post/``, from ``snapshot``.

    Each holds cfg.json and sae_weights.safetensors (W_enc (d, F), W_dec (F, d), b_enc (F),
    b_dec (d), and threshold (F) for SAELens' jumprelu, float32), loadable with
    ``SAE.load_from_disk``; the weights are the snapshot's own, for raw activations, so ``normalize_activations`` is "none". Returns every file
    written, README.md last.
    """
    chosen = [(run, run.snapshot(snapshot)) for run in read_runs(runs)]
    files = [ExportedFile(run, snap, f"{transformer_lens_hook(run.spec.layer)}/{name}")
             for run, snap in chosen for name in (SAELENS_CFG, SAELENS_WEIGHTS)]

    def fill(folder: Path) -> None:
        for run, snap in chosen:
            write_saelens_folder(run, snap, folder / transformer_lens_hook(run.spec.layer))

    return publish(Path(out), "saelens", files, repo_id, fill)


def write_saelens_folder(run: ExportRun, snapshot: Snapshot, folder: Path) -> None:
    """cfg.json and sae_weights.safetensors of one snapshot, in ``folder``."""
    from safetensors.torch import save

    state = load_snapshot(snapshot.path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: state[key].to(torch.float32).contiguous()
               for key in SNAPSHOT_TENSORS_BY_ARCH[state["cfg"]["arch"]]}
    # safetensors' save_file creates its file with mode 0600; through atomic_write the file
    # gets the umask's mode, as every other file of the export
    atomic_write(folder / SAELENS_WEIGHTS, lambda f: f.write(save(tensors)))
    write_json(folder / SAELENS_CFG, saelens_config(state["cfg"], run, snapshot))


def load_snapshot(path: Path) -> dict:
    """A snapshot dict, checked to run as an SAE (shapes match its cfg), or a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        SAE.from_snapshot(state)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        reason = first_line(err)
        raise SaecacheError(f"cannot read snapshot {path}: {reason}") from None
    return state


def saelens_config(snap_cfg: dict, run: ExportRun, snapshot: Snapshot) -> dict:
    """The SAELens (v6) cfg.json of a snapshot whose configuration is ``snap_cfg``."""
    arch = ARCHS.get(snap_cfg["arch"])
    if arch is None or not arch.saelens:
        exportable = ", ".join(a.name for a in ARCHS.values() if a.saelens)
        raise SaecacheError(f"run {run.path} has arch {snap_cfg['arch']!r}, which SAELens has "
                            f"no equivalent for (exportable: {exportable})")
    return {
        "architecture": arch.saelens,
        "d_in": snap_cfg["d"],
        "d_sae": snap_cfg["F"],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(snap_cfg["apply_b_dec_to_input"]),
        "normalize_activations": "none",  # the snapshot's weights take raw activations
        "reshape_activations": "none",
        **arch.saelens_fields(snap_cfg),
        "metadata": _metadata(snap_cfg, run, snapshot),
    }


def _metadata(snap_cfg: dict, run: ExportRun, snapshot: Snapshot) -> dict:
    """cfg.json's ``metadata``: where the activations come from, and saecache's own config."""
    cache = run.record.cache
    return {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": cache["model"],
        "model_class_name": "HookedTransformer",
        # raw residuals: TransformerLens must not centre the writing weights (SAELens' own default)
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "hook_name": transformer_lens_hook(run.spec.layer),
        "hook_head_index": None,
        "context_size": cache["ctx"],
        "dataset_path": cache["dataset"],
        "prepend_bos": False,  # saecache packs documents joined by EOS, without a BOS
        "exclude_special_tokens": False,
        "neuronpedia_id": None,
        "saecache": {**snap_cfg, "snapshot": snapshot.path.name, "saecache_version": __version__},
    }
