"""Export trained runs to share them: saecache snapshots or SAELens folders, with a model card.

    export_pt(runs, out)        out/sae_layer{LL}_{SNAP}.pt (every snapshot, copied) + README.md
    export_saelens(runs, out)   out/blocks.{L}.hook_resid_post/{cfg.json, sae_weights.safetensors}
                                (one SAELens folder per run, one snapshot) + README.md
    push(out, repo_id)          create the Hub model repo (exist_ok) and upload the folder

An export is written into a temporary sibling folder and renamed into place, so ``out`` holds
the previous export or the new one, never a mix. A non-empty ``out`` that is not a saecache
export is refused, never overwritten. The SAELens layout and fields, with their sources, are
in docs/export.md.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from saecache import __version__
from saecache.core.errors import SaecacheError, first_line
from saecache.train.runfolder import RunPaths, RunSpec, read_json, read_metrics
from saecache.sae.model import SAE, SNAPSHOT_TENSORS
from saecache.core.units import format_count, format_layers, parse_count

FORMATS = ("pt", "saelens")
CARD = "README.md"
CARD_MARKER = "<!-- saecache export"
"""First characters of the comment line that marks a folder's README.md as an export's card."""
SAELENS_CFG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAELENS_WEIGHTS = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAELENS_FORMAT_VERSION = "6.0.0"
"""metadata.sae_lens_version written to cfg.json: SAELens reads a config without a version
≥ 6.0.0 as a legacy one (handle_pre_6_0_config) and moves its fields around."""
SAELENS_ARCHS = {"relu": "standard", "topk": "topk"}
"""saecache arch → SAELens architecture with the same inference forward pass."""
_SNAPSHOT_FILE = re.compile(r"^sae_layer(\d{2,})_([0-9]+[KMBT]?|final)\.pt$")
_HOOK_FOLDER = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def transformer_lens_hook(layer: int) -> str:
    """TransformerLens name of the residual stream after block ``layer`` (what saecache stores).

    For GPT-NeoX it is the output of ``gpt_neox.layers[layer]``; TransformerLens calls the
    output of any block ``blocks.{layer}.hook_resid_post``.
    """
    return f"blocks.{layer}.hook_resid_post"


# ---- reading runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRun:
    """A run folder written by ``saecache train``, read for export."""

    paths: RunPaths
    """Where the run's files are (run.json, metrics.jsonl, eval.json, snapshots)."""
    spec: RunSpec
    """Layer, arch, expansion, L1 / target L0 / k, from run.json."""
    record: dict
    """run.json: spec, train settings, cache provenance, input scale."""
    snapshots: dict[str, Path]
    """Snapshot name (16K, 50M, final) → file, in token order, final last."""

    @classmethod
    def read(cls, folder: str | Path) -> ExportRun:
        paths = RunPaths(folder)
        if not paths.config.is_file():
            raise SaecacheError(_not_a_run(paths.dir))
        record = read_json(paths.config)
        try:
            if not all(isinstance(record.get(key), dict) for key in ("spec", "train", "cache")):
                raise TypeError
            spec = RunSpec(**record["spec"])
        except (AttributeError, TypeError):
            raise SaecacheError(f"{paths.config} is not a saecache run record (spec, train, "
                                "cache): was this run written by saecache train?") from None
        snapshots = _snapshot_files(paths, spec.layer)
        if not snapshots:
            raise SaecacheError(f"run {paths.dir} has no snapshots: train it first")
        return cls(paths, spec, record, snapshots)

    @property
    def path(self) -> Path:
        return self.paths.dir

    @property
    def family(self) -> str:
        """The run's settings without its layer (relu-x32-l1-0.0003): one repository each."""
        return self.spec.name.split("-", 1)[1]

    @property
    def model(self) -> str:
        return self.record["cache"]["model"]

    def snapshot(self, name: str) -> str:
        """The snapshot called ``name`` (16k, 16K, 16000 and final are accepted) or an error."""
        key = _snapshot_key(name)
        if key not in self.snapshots:
            raise SaecacheError(f"run {self.path} has no snapshot {name!r} (it has "
                                f"{', '.join(self.snapshots)})")
        return key

    def file(self, snapshot: str) -> str:
        """sae_layer{LL}_{SNAP}.pt"""
        return self.snapshots[snapshot].name

    def heldout(self, snapshot: str) -> dict | None:
        """The metrics.jsonl held-out line written with this snapshot, if any."""
        if not self.paths.metrics.is_file():
            return None
        found = [m for m in read_metrics(self.paths.metrics) if m.get("split") == "heldout"
                 and m.get("snapshot") == self.file(snapshot)]
        return found[-1] if found else None

    def ce_loss_recovered(self, snapshot: str) -> float | None:
        """From eval.json ({"snapshots": {file: {"ce_loss_recovered": …}}}) when present."""
        if not self.paths.eval.is_file():
            return None
        try:
            entry = read_json(self.paths.eval)["snapshots"][self.file(snapshot)]
            value = entry["ce_loss_recovered"]
        except (SaecacheError, KeyError, TypeError):
            return None  # not evaluated (or not readable): the card shows "—"
        return value if isinstance(value, (int, float)) else None


def _not_a_run(path: Path) -> str:
    if not path.is_dir():
        return f"run folder {path} does not exist"
    inside = sorted(p.name for p in path.iterdir() if (p / "run.json").is_file())
    if inside:
        shown = ", ".join(inside[:4]) + (", …" if len(inside) > 4 else "")
        return f"{path} is a RUNS folder, not a run: pass its run folders ({shown})"
    return f"{path} is not a saecache run folder (no run.json): pass RUNS/<run> folders"


def _snapshot_files(paths: RunPaths, layer: int) -> dict[str, Path]:
    found = {}
    for path in (s.path for s in paths.snapshots()):
        match = _SNAPSHOT_FILE.match(path.name)
        if match and int(match.group(1)) == layer:
            found[match.group(2)] = path
    return dict(sorted(found.items(), key=lambda kv: _snapshot_order(kv[0])))


def _snapshot_order(name: str) -> tuple[int, int]:
    return (1, 0) if name == "final" else (0, parse_count(name))


def _snapshot_key(name: str) -> str:
    text = str(name).strip()
    if text.lower() == "final":
        return "final"
    try:
        return format_count(parse_count(text))
    except ValueError:
        return text


def read_runs(paths: Iterable[str | Path]) -> list[ExportRun]:
    """The runs to export into one folder, refusing sets whose files would collide.

    One export holds one base model, and at most one run per layer: two families (say L1
    3e-4 and 8e-5) of the same layer would both write sae_layer05_final.pt.
    """
    runs, seen = [], set()
    for path in paths:
        run = ExportRun.read(path)
        if run.path.resolve() not in seen:
            seen.add(run.path.resolve())
            runs.append(run)
    if not runs:
        raise SaecacheError("no runs to export: pass one or more RUNS/<run> folders")
    models = sorted({run.model for run in runs})
    if len(models) > 1:
        raise SaecacheError(f"the runs come from different models ({', '.join(models)}): "
                            "export each model's runs to its own folder")
    by_layer: dict[int, ExportRun] = {}
    for run in runs:
        other = by_layer.setdefault(run.spec.layer, run)
        if other is not run:
            raise SaecacheError(
                f"runs {other.path} and {run.path} both hold layer {run.spec.layer} "
                f"({other.family} and {run.family}): their files would collide; export each "
                "family to its own folder")
    return sorted(runs, key=lambda r: r.spec.layer)


# ---- the exports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedFile:
    """One file of an export (README.md aside)."""

    run: ExportRun
    snapshot: str
    """Which of the run's snapshots it holds (16K, final)."""
    name: str
    """Its path inside the export folder, "/"-separated."""


def export_pt(runs: Iterable[str | Path], out: str | Path, snapshot: str | None = None,
              repo_id: str | None = None) -> list[Path]:
    """Copy the runs' snapshots (all of them, or only ``snapshot``) into ``out`` with a card.

    Files keep the model card's naming, sae_layer{LL}_{SNAP}.pt, and their bytes. Returns
    every file written, README.md last.
    """
    read = read_runs(runs)
    files = [ExportedFile(run, snap, run.file(snap)) for run in read
             for snap in ([run.snapshot(snapshot)] if snapshot else run.snapshots)]

    def fill(folder: Path) -> None:
        for f in files:
            shutil.copyfile(f.run.snapshots[f.snapshot], folder / f.name)

    return _publish(Path(out), "pt", files, repo_id, fill)


def export_saelens(runs: Iterable[str | Path], out: str | Path, snapshot: str = "final",
                   repo_id: str | None = None) -> list[Path]:
    """One SAELens folder per run, ``out/blocks.{L}.hook_resid_post/``, from ``snapshot``.

    Each holds cfg.json and sae_weights.safetensors (W_enc (d, F), W_dec (F, d), b_enc (F),
    b_dec (d), float32), loadable with ``SAE.load_from_disk``; the weights are the snapshot's
    own, for raw activations, so ``normalize_activations`` is "none". Returns every file
    written, README.md last.
    """
    read = read_runs(runs)
    chosen = [(run, run.snapshot(snapshot)) for run in read]
    files = [ExportedFile(run, snap, f"{transformer_lens_hook(run.spec.layer)}/{name}")
             for run, snap in chosen for name in (SAELENS_CFG, SAELENS_WEIGHTS)]

    def fill(folder: Path) -> None:
        for run, snap in chosen:
            write_saelens_folder(run, snap, folder / transformer_lens_hook(run.spec.layer))

    return _publish(Path(out), "saelens", files, repo_id, fill)


def write_saelens_folder(run: ExportRun, snapshot: str, folder: Path) -> None:
    """cfg.json and sae_weights.safetensors of one snapshot, in ``folder``."""
    from safetensors.torch import save_file

    state = load_snapshot(run.snapshots[snapshot])
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: state[key].to(torch.float32).contiguous() for key in SNAPSHOT_TENSORS}
    save_file(tensors, str(folder / SAELENS_WEIGHTS))
    cfg = saelens_config(state["cfg"], run, snapshot)
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def load_snapshot(path: Path) -> dict:
    """A snapshot dict, checked to run as an SAE (shapes match its cfg), or a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        SAE.from_snapshot(state)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        reason = first_line(err)
        raise SaecacheError(f"cannot read snapshot {path}: {reason}") from None
    return state


def saelens_config(snap_cfg: dict, run: ExportRun, snapshot: str) -> dict:
    """The SAELens (v6) cfg.json of a snapshot whose configuration is ``snap_cfg``."""
    arch = snap_cfg["arch"]
    if arch not in SAELENS_ARCHS:
        raise SaecacheError(f"run {run.path} has arch {arch!r}, which SAELens has no "
                            f"equivalent for (exportable: {', '.join(SAELENS_ARCHS)})")
    cache = run.record["cache"]
    cfg = {
        "architecture": SAELENS_ARCHS[arch],
        "d_in": snap_cfg["d"],
        "d_sae": snap_cfg["F"],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(snap_cfg["apply_b_dec_to_input"]),
        "normalize_activations": "none",  # the snapshot's weights take raw activations
        "reshape_activations": "none",
    }
    if arch == "topk":  # plain TopK on the pre-activations, as saecache's forward pass
        cfg.update(k=snap_cfg["k"], rescale_acts_by_decoder_norm=False)
    cfg["metadata"] = {
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
        "saecache": {**snap_cfg, "snapshot": run.file(snapshot), "saecache_version": __version__},
    }
    return cfg


def load_saelens_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json as a dict, {W_enc, W_dec, b_enc, b_dec}) of an exported SAELens folder."""
    from safetensors.torch import load_file

    path = Path(path)
    return json.loads((path / SAELENS_CFG).read_text()), load_file(str(path / SAELENS_WEIGHTS))


# ---- writing the folder ----------------------------------------------------------------------


def _publish(out: Path, fmt: str, files: list[ExportedFile], repo_id: str | None,
             fill: Callable[[Path], None]) -> list[Path]:
    """Write the export into a sibling folder, then swap it in for ``out``."""
    out = out.absolute()  # "." has no parent to stage next to
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # honours the umask, unlike mkdtemp's 0700
    try:
        fill(staging)
        write_model_card(files, staging, fmt, repo_id or f"<user>/{out.name}")
        _swap(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise SaecacheError(f"could not write the export to {out}: {err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / f.name for f in files] + [out / CARD]


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that holds anything but a previous saecache export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SaecacheError(f"--out {out} is a file: give a folder")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not is_export(out):
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise SaecacheError(f"--out {out} is not empty and is not a saecache export (it holds "
                            f"{shown}): choose a new or empty folder")


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a saecache export and nothing else (so it may be replaced)."""
    card = folder / CARD
    if not card.is_file() or CARD_MARKER not in card.read_text(errors="replace"):
        return False
    for entry in folder.iterdir():
        if entry.name == CARD or (entry.is_file() and _SNAPSHOT_FILE.match(entry.name)):
            continue
        if not (entry.is_dir() and _HOOK_FOLDER.match(entry.name)):
            return False
        if any(p.name not in (SAELENS_CFG, SAELENS_WEIGHTS) or not p.is_file()
               for p in entry.iterdir()):
            return False
    return True


def _swap(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; a previous export there is moved aside, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- the model card --------------------------------------------------------------------------


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
    path.write_text(card.render())
    return path


class ModelCard:
    """The text of an export's README.md."""

    def __init__(self, files: list[ExportedFile], fmt: str, repo_id: str):
        self.files, self.fmt, self.repo_id = files, fmt, repo_id
        self.runs = list({id(f.run): f.run for f in files}.values())
        self.snapshots = {id(run): list(dict.fromkeys(f.snapshot for f in files if f.run is run))
                          for run in self.runs}  # run → its exported snapshots, in order
        first = self.runs[0]
        self.model, self.cache = first.model, first.record["cache"]

    def render(self) -> str:
        parts = [self.front_matter(), self.title(), self.contents(), self.layout(),
                 self.loading(), self.sister_runs(), self.metrics(), self.reproducing()]
        return "\n\n".join(p for p in parts if p) + "\n"

    def front_matter(self) -> str:
        tags = ["sparse-autoencoder", "saecache"] + (["sae_lens"] if self.fmt == "saelens" else [])
        lines = ["---", f"library_name: {'saelens' if self.fmt == 'saelens' else 'saecache'}",
                 "tags:", *[f"- {t}" for t in tags]]
        if _is_hub_id(self.model):
            lines.append(f"base_model: {self.model}")
        if _is_hub_id(self.cache["dataset"]):
            lines += ["datasets:", f"- {self.cache['dataset']}"]
        marker = (f"{CARD_MARKER} (format {self.fmt}, saecache {__version__}): "
                  "`saecache export` rewrites this folder as a whole -->")
        return "\n".join(lines + ["---", marker])

    def title(self) -> str:
        name = self.repo_id.split("/")[-1]
        what = "SAELens folders" if self.fmt == "saelens" else "checkpoints"
        blocks = "block" + "s" * (len(self.runs) > 1)
        return (f"# {name} — Sparse Autoencoders on {self.model}\n\n"
                f"Sparse autoencoder (SAE) {what}, trained with saecache on the residual stream "
                f"after {blocks} {_layers_text(r.spec.layer for r in self.runs)} of `{self.model}`.")

    def contents(self) -> str:
        d = self.cache["d"]
        n_layers = len(self.runs)
        rows = [
            ("Base model", f"`{self.model}`"),
            ("Layers covered", f"{_layers_text(r.spec.layer for r in self.runs)} "
                               f"({n_layers} layer{'s' * (n_layers != 1)})"),
            ("Hook", "output of each block (TransformerLens `blocks.{L}.hook_resid_post`)"),
            ("Architecture", self._each(_arch_text)),
            ("SAE expansion factor", self._each(
                lambda r: f"{r.spec.expansion} → F = {r.spec.expansion * d:,} dictionary "
                          "features per layer")),
            ("Hidden dim being modeled", f"{d}"),
            ("L1 coefficient" if all(r.spec.arch == "relu" for r in self.runs)
             else "Sparsity", self._each(_sparsity_text)),
            ("Tokens trained", self._each(
                lambda r: f"{_tokens(r.record['train']['tokens'])} "
                          f"({self.cache['dataset']}, ctx {self.cache['ctx']})")),
            ("Snapshots per layer", self._each(lambda r: _snapshots_text(self.snapshots[id(r)]))),
            ("Total files", self._total()),
        ]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return f"## Contents\n\n| | |\n| --- | --- |\n{table}"

    def _each(self, text: Callable[[ExportRun], str]) -> str:
        """One value, or each different value once when the runs differ."""
        return "; ".join(dict.fromkeys(text(r) for r in self.runs))

    def _total(self) -> str:
        if self.fmt == "saelens":
            return (f"{len(self.runs)} SAELens folder{'s' * (len(self.runs) != 1)} "
                    f"({SAELENS_CFG} + {SAELENS_WEIGHTS} each)")
        per = {len(s) for s in self.snapshots.values()}
        n = len(self.runs)
        shape = f" ({n} layer{'s' * (n != 1)} × {per.pop()} snapshots)" if len(per) == 1 else ""
        return f"{len(self.files)} .pt checkpoints{shape}"

    def layout(self) -> str:
        listing = "\n".join(f"- `{f.name}`" for f in self.files)
        if self.fmt == "pt":
            every = {s for v in self.snapshots.values() for s in v}
            snaps = ", ".join(sorted(every, key=_snapshot_order))
            layers = ", ".join(f"{r.spec.layer:02d}" for r in self.runs)
            return (
                "## File naming\n\n`sae_layer{LL}_{SNAPSHOT}.pt`\n\n"
                f"Where LL is the layer index ({layers}) and SNAPSHOT is one of {snaps} (tokens "
                "seen when it was saved, or the end of training).\n\n"
                "Each file is a dict of float32 tensors `W_enc` (d, F), `b_enc` (F), `W_dec` "
                "(F, d), `b_dec` (d) and `cfg`, a plain dict (arch, k, apply_b_dec_to_input, "
                "layer, d, F, l1, target_l0, tokens_seen, input_scale, model, dataset, ctx, "
                "run). The weights take **raw** residuals: the input normalisation used in "
                "training is folded in (`cfg['input_scale']` is for information only).\n\n"
                f"### Files\n\n{listing}")
        return (
            "## Layout\n\n"
            "One SAELens folder per layer, named by its TransformerLens hook (the SAELens "
            "`sae_id`): `blocks.{L}.hook_resid_post/` holding `cfg.json` and "
            "`sae_weights.safetensors` (`W_enc` (d_in, d_sae), `W_dec` (d_sae, d_in), `b_enc`, "
            "`b_dec`, float32). Snapshot: "
            f"{self._each(lambda r: self.snapshots[id(r)][0])}. The weights take **raw** "
            "residuals (`normalize_activations: none`); `metadata.saecache` keeps the "
            f"saecache configuration.\n\n### Files\n\n{listing}")

    def loading(self) -> str:
        if self.fmt == "pt":
            return _PT_LOADING.format(repo=self.repo_id, file=self._example())
        return _SAELENS_LOADING.format(repo=self.repo_id, model=self.model,
                                       hook=self._example().split("/")[0])

    def _example(self) -> str:
        last = [f.name for f in self.files if f.snapshot == "final"] or [self.files[0].name]
        return last[len(last) // 2]

    def sister_runs(self) -> str:
        """Other families trained in the same RUNS folders (the reference card's table)."""
        families = _families({r.path.parent for r in self.runs})
        mine = {r.family for r in self.runs}
        if not set(families) - mine:
            return ""
        rows = []
        for family, runs in sorted(families.items()):
            spec = runs[0].spec
            if spec.arch == "topk":
                sparsity, target = f"k = {spec.k}", "—"
            elif spec.target_l0 is not None:
                sparsity, target = f"{_sci(spec.l1)} (adaptive)", f"L0 ≈ {spec.target_l0:g}"
            else:
                sparsity, target = _sci(spec.l1), "fixed"
            here = " (this repository)" if family in mine else ""
            rows.append(f"| {family}{here} | {sparsity} | {target} | "
                        f"{_layers_text(r.spec.layer for r in runs)} |")
        return ("## Sister runs (same setup, different sparsity)\n\n"
                "| run | L1 coefficient or k | target | layers |\n| --- | --- | --- | --- |\n"
                + "\n".join(rows))

    def metrics(self) -> str:
        rows, any_ce = [], False
        for run in self.runs:
            snap = self.snapshots[id(run)][-1]
            m, ce = run.heldout(snap) or {}, run.ce_loss_recovered(snap)
            any_ce |= ce is not None
            rows.append([f"{run.spec.layer}", run.family, snap, _num(m.get("fvu"), ".4f"),
                         _num(m.get("l0"), ".1f"), _num(m.get("mse"), ".4g"),
                         _num(m.get("dead_fraction"), ".1%"), _num(ce, ".3f")])
        head = ["layer", "run", "snapshot", "FVU", "L0", "MSE", "dead"]
        head += ["CE loss recovered"] * any_ce
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(row[:len(head)]) + " |" for row in rows]
        return ("## Held-out metrics\n\n"
                "Measured when each snapshot was saved, on the cache's last sequences (never "
                "trained on). FVU is the fraction of variance unexplained; MSE is on normalised "
                "activations (E‖x‖ = √d); dead is the fraction of features that never fired on "
                "them" + ("; CE loss recovered from eval.json" if any_ce else "") + ".\n\n"
                + "\n".join(lines))

    def reproducing(self) -> str:
        """The harvest, then one train command per group of runs trained alike."""
        cache = self.cache
        lines = [f"saecache harvest CACHE --model {self.model} --dataset {cache['dataset']} "
                 f"--tokens {format_count(cache['token_budget'])} --ctx {cache['ctx']}"]
        groups: dict[str, list[ExportRun]] = {}
        for run in self.runs:
            key = json.dumps([run.family, run.record["train"]], sort_keys=True)
            groups.setdefault(key, []).append(run)
        lines += [_train_command(runs) for runs in groups.values()]
        return ("## Reproducing\n\n```bash\n" + "\n".join(lines) + "\n```\n\n"
                f"Every setting is in each run's run.json; saecache {__version__}.")


def _train_command(runs: list[ExportRun]) -> str:
    """`saecache train` for runs of one family trained with the same settings."""
    spec, train = runs[0].spec, runs[0].record["train"]
    layers = " ".join(f"--layer {r.spec.layer}" for r in runs)
    snaps = ",".join(format_count(s) for s in train.get("snapshots", []))
    return (f"saecache train CACHE {layers} --arch {spec.arch} --expansion {spec.expansion} "
            f"{_sparsity_option(spec)} --tokens {format_count(train['tokens'])}"
            + (f" --snapshots {snaps}" if snaps else "")
            + f" --batch-size {train['batch_size']} --lr {train['lr']:g} --seed {train['seed']}")


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


def _families(parents: set[Path]) -> dict[str, list[ExportRun]]:
    """Family → its runs, over every readable run folder in ``parents``."""
    families: dict[str, list[ExportRun]] = {}
    for parent in sorted(parents):
        for folder in sorted(p for p in parent.iterdir() if (p / "run.json").is_file()):
            try:
                run = ExportRun.read(folder)
            except SaecacheError:
                continue  # an unfinished or broken sister is not worth failing the export
            families.setdefault(run.family, []).append(run)
    return families


def _arch_text(run: ExportRun) -> str:
    return "TopK (ReLU on the k largest)" if run.spec.arch == "topk" else "ReLU, L1 penalty"


def _sparsity_text(run: ExportRun) -> str:
    spec = run.spec
    if spec.arch == "topk":
        return f"k = {spec.k}"
    if spec.target_l0 is not None:
        return f"{_sci(spec.l1)} (adaptive), target L0 ≈ {spec.target_l0:g}"
    return f"{_sci(spec.l1)} (fixed)"


def _sparsity_option(spec: RunSpec) -> str:
    if spec.arch == "topk":
        return f"--k {spec.k}"
    if spec.target_l0 is not None:
        return f"--l1 adaptive:{spec.target_l0:g}:{_sci(spec.l1)}"
    return f"--l1 {_sci(spec.l1)}"


def _snapshots_text(snaps: list[str]) -> str:
    steps = [s for s in snaps if s != "final"]
    if not steps:
        return "1 — final"
    tail = ", plus final" if "final" in snaps else ""
    return f"{len(snaps)} — at {', '.join(steps)} tokens{tail}"


def _sci(x: float) -> str:
    """3e-4 rather than 0.0003, as the model card writes coefficients."""
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:g}"
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _tokens(n: int) -> str:
    text = format_count(n)
    return text if text[-1] in "KMBT" else f"{n:,}"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _layers_text(layers: Iterable[int]) -> str:
    """0–3, 8 for [0, 1, 2, 3, 8]."""
    return format_layers(layers, dash="–", sep=", ")


def _is_hub_id(name: str) -> bool:
    """owner/name that is not a local path: worth a base_model / datasets entry."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


# ---- the Hub ---------------------------------------------------------------------------------


def push(out: str | Path, repo_id: str, token: str | None = None) -> str:
    """Create the model repo ``repo_id`` (if needed) and upload the export in ``out``.

    Returns the commit's URL. Any failure (no network, offline mode, no or bad token, no
    rights) is one line; the export folder is left as it is.
    """
    from huggingface_hub import HfApi

    out = Path(out)
    if not out.is_dir() or not is_export(out):
        raise SaecacheError(f"{out} is not a saecache export folder: run saecache export first")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model",
                                   commit_message=f"saecache {__version__} export")
    except Exception as err:  # noqa: BLE001 - the Hub client's errors (HTTP, transport, auth)
        # come from several libraries; all are environment failures the user acts on
        reason = first_line(err)
        raise SaecacheError(f"could not push {out} to the Hub as {repo_id}: {reason} (the "
                            f"export stays in {out}; retry with network and a token)") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
