"""One of the sister runs that a layer trains from one read pass: an SAETrainer and its RunFolder.

It checks run.json and builds the trainer before anything is written (a resumed run must match
its record exactly), removes what a killed process left half-written, cuts metrics.jsonl back
to the checkpoint it resumes from, and writes the metrics lines, snapshots and checkpoints (the
latest two) into its folder, each atomically. A write that fails for want of space or
permission is one line naming the file: everything up to the last checkpoint is intact, and
the same command resumes once the disk is fixed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from saecache.core.atomic import atomic_write, write_failure, write_jsonl
from saecache.core.errors import SaecacheError
from saecache.sae.spec import RunSpec
from saecache.train.config import TrainConfig
from saecache.train.runfolder import RunFolder, RunRecord, snapshot_name
from saecache.train.trainer import SAETrainer

KEEP_CHECKPOINTS = 2  # the latest two: a kill between sister runs' saves leaves a common one


class SisterRun:
    """An SAE being trained on one layer with one configuration, and the folder it writes."""

    def __init__(self, folder: RunFolder, record: RunRecord, cfg: TrainConfig, d: int,
                 mean: torch.Tensor | None = None):
        self.folder, self.record, self.cfg = folder, record, cfg
        self.spec: RunSpec = record.spec
        self.trainer = SAETrainer(record.spec, cfg, d, mean)
        self.start_step: int | None = None
        """The step :meth:`resume` continued from (cfg.steps: the run had finished already)."""

    @classmethod
    def open(cls, folder: RunFolder, record: RunRecord, cfg: TrainConfig, d: int,
             mean: torch.Tensor | None = None) -> SisterRun:
        """A new run, or an existing one whose record matches (its temporaries removed);
        refuses others. A new run's folder is written by :meth:`resume`, once every sister
        run has been checked and built."""
        if folder.is_run:
            saved = folder.record()
            if saved.train.get("conventions") != record.train["conventions"]:
                raise SaecacheError(
                    f"run {folder.dir} was trained by an earlier saecache whose --l1, --grad-clip "
                    "and --lr mean other things (docs/l1-units.md): it cannot be resumed; train "
                    "into another --out")
            diff = _first_difference(saved.identity(), record.identity())
            if diff:
                raise SaecacheError(f"run {folder.dir} exists with other settings ({diff}): use the "
                                    "same settings to resume, or another --out")
        run = _built(cls, folder, record, cfg, d, mean)
        if folder.dir.is_dir():  # a kill may have left .run.json.XXXXXXXX before run.json
            with run._writing(folder.dir):
                folder.remove_temporaries()
        return run

    @staticmethod
    def common_step(runs: list[SisterRun]) -> int:
        """The latest step every run has a checkpoint for (0: start from scratch)."""
        common = set.intersection(*(set(run.folder.checkpoint_steps()) for run in runs))
        return max(common, default=0)

    def resume(self, step: int) -> int:
        """Write run.json of a new run; or load the checkpoint of ``step`` and cut the metrics
        log back to it. Returns the reader's byte count saved with the checkpoint (0: none)."""
        folder, state = self.folder, {}
        self.start_step = step
        if not folder.is_run:
            with self._writing(folder.config):
                folder.write_record(self.record)
        if step:
            state = torch.load(folder.checkpoint(step), map_location=self.cfg.device, weights_only=True)
            self.trainer.load_state_dict(state)
        if folder.metrics.exists():
            tokens = step * self.cfg.batch_size
            with self._writing(folder.metrics):
                write_jsonl(folder.metrics, [line for line in folder.metrics_lines() if line["tokens"] <= tokens])
        return int(state.get("bytes_read", 0))

    def step(self, x: torch.Tensor, step: int) -> None:
        self.trainer.step(x, step)

    # ---- outputs -----------------------------------------------------------------------------

    def log(self, step: int, timing: dict) -> None:
        """Append one metrics line averaged over the steps since the last one."""
        self._append(self.trainer.metrics_line(step, timing))

    def _append(self, line: dict) -> None:
        with self._writing(self.folder.metrics):
            self.folder.dir.mkdir(parents=True, exist_ok=True)
            with open(self.folder.metrics, "a") as f:  # a half-written last line is dropped on reading
                f.write(json.dumps(line) + "\n")

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """Turn a full disk or a read-only target while writing ``path`` into one line."""
        try:
            yield
        except OSError as err:
            failure = write_failure(err, err.filename or path, f"{self.folder.dir} is intact up to "
                                    "its last checkpoint", "re-run the same command to resume")
            if failure is None:
                raise
            raise failure from None

    @torch.no_grad()
    def save_snapshot(self, step: int, tokens: int | None, heldout: torch.Tensor) -> None:
        """Write sae_layer{LL}_{SNAP}.pt (weights for raw activations) and held-out metrics."""
        tokens_seen = (step + 1) * self.cfg.batch_size
        record = self.record
        state = self.trainer.snapshot(
            record.scale, tokens_seen=tokens_seen, input_scale=record.scale,
            model=record.model, dataset=record.cache["dataset"], ctx=record.cache["ctx"],
            run=self.spec.name)
        path = self.folder.snapshot_path(self.spec.layer, tokens)
        with self._writing(path):
            atomic_write(path, lambda f: torch.save(state, f))
        self._append({"step": step + 1, "tokens": tokens_seen, "split": "heldout",
                      "snapshot": snapshot_name(self.spec.layer, tokens),
                      **self.trainer.heldout_metrics(heldout)})

    def summary(self) -> str:
        """The last held-out metrics, in one line."""
        heldout = [line for line in self.folder.metrics_lines() if line["split"] == "heldout"]
        if not heldout:
            return "no held-out metrics yet"
        m = heldout[-1]
        return (f"{m['snapshot']}: held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, "
                f"MSE {m['mse']:.4g} (normalised units)")

    def checkpoint(self, step: int, bytes_read: int = 0) -> None:
        """Save everything needed to continue at ``step`` exactly (and the reader's byte count
        so far, for the metrics lines); keep the latest two."""
        state = {"step": step, "bytes_read": bytes_read, **self.trainer.state_dict()}
        path = self.folder.checkpoint(step)
        with self._writing(path):
            atomic_write(path, lambda f: torch.save(state, f))
            for old in self.folder.checkpoint_steps()[:-KEEP_CHECKPOINTS]:
                self.folder.checkpoint(old).unlink(missing_ok=True)


def _built(cls: type[SisterRun], folder: RunFolder, record: RunRecord, cfg: TrainConfig, d: int,
           mean: torch.Tensor | None) -> SisterRun:
    """``cls(…)``; an SAE too large for the device's memory is one line."""
    try:
        return cls(folder, record, cfg, d, mean)
    except RuntimeError as err:  # torch.OutOfMemoryError on CUDA; a RuntimeError from the CPU allocator
        if not (isinstance(err, torch.cuda.OutOfMemoryError) or "allocate memory" in str(err)):
            raise
        n_features = record.spec.expansion * d
        raise SaecacheError(f"an SAE of F = {n_features:,} features × d = {d} (--expansion "
                            f"{record.spec.expansion}) does not fit in {cfg.device} memory: lower "
                            "--expansion") from None


def _first_difference(saved: dict, requested: dict, prefix: str = "") -> str | None:
    """'train.lr is 0.0003 there, not 0.001' for the first differing leaf, else None."""
    for key in sorted(set(saved) | set(requested)):
        a, b = saved.get(key), requested.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} there, not {b!r}"
    return None
