"""Names and paths of training runs: one folder per (layer, configuration) under RUNS.

Every path a run uses is computed here and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from saecache.core.errors import SaecacheError
from saecache.core.units import format_count

DEFAULT_ADAPTIVE_START = 5e-4  # the model card's adaptive run starts at 5e-4
_ADAPTIVE = re.compile(r"^adaptive:([0-9.eE+-]+)(?::([0-9.eE+-]+))?$")


@dataclass(frozen=True)
class RunSpec:
    """What distinguishes one SAE from its sister runs."""

    layer: int
    """Block whose output the SAE reconstructs."""
    arch: str
    """relu (L1 penalty) or topk."""
    expansion: int
    """F = expansion × d."""
    l1: float | None = None
    """L1 coefficient (relu): fixed, or the starting value when adaptive."""
    target_l0: float | None = None
    """Adaptive runs: the L0 the controller steers toward (None: fixed coefficient)."""
    k: int | None = None
    """Active features per token (topk)."""

    @property
    def name(self) -> str:
        """Folder name: layer05-relu-x32-l1-3e-4, layer05-relu-x32-adaptive-l0-150, layer05-topk-x32-k64."""
        head = f"layer{self.layer:02d}-{self.arch}-x{self.expansion}"
        if self.arch == "topk":
            return f"{head}-k{self.k}"
        if self.target_l0 is not None:
            return f"{head}-adaptive-l0-{self.target_l0:g}"
        return f"{head}-l1-{self.l1:g}"

    def to_json(self) -> dict:
        return asdict(self)


def parse_l1(text: str) -> tuple[float, float | None]:
    """``3e-4`` → (3e-4, None); ``adaptive:150`` → (5e-4, 150.0); ``adaptive:150:1e-3`` → (1e-3, 150.0)."""
    match = _ADAPTIVE.match(text.strip())
    try:
        if match:
            target = float(match.group(1))
            start = float(match.group(2)) if match.group(2) else DEFAULT_ADAPTIVE_START
            if target <= 0 or start <= 0:
                raise ValueError
            return start, target
        value = float(text)
    except ValueError:
        raise ValueError(f"--l1 {text!r} is not a coefficient: write 3e-4, adaptive:150 or "
                         "adaptive:150:5e-4 (target L0, then starting coefficient)") from None
    if value < 0:
        raise ValueError(f"--l1 {text!r} is negative")
    return value, None


def snapshot_name(layer: int, tokens: int | None) -> str:
    """``sae_layer05_50M.pt``; ``tokens=None`` gives the ``final`` snapshot."""
    return f"sae_layer{layer:02d}_{'final' if tokens is None else format_count(tokens)}.pt"


class RunPaths:
    """Where one run's files live, given its folder."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self.config = self.dir / "run.json"
        self.metrics = self.dir / "metrics.jsonl"
        self.eval = self.dir / "eval.json"
        self.checkpoints = self.dir / "checkpoints"

    @classmethod
    def of(cls, root: str | Path, spec: RunSpec) -> RunPaths:
        """The folder of ``spec`` under RUNS."""
        return cls(Path(root) / spec.name)

    def snapshots(self) -> list[Path]:
        """The run's snapshot files, sorted by name."""
        return sorted(self.dir.glob("sae_layer*_*.pt"))

    def snapshot(self, layer: int, tokens: int | None) -> Path:
        return self.dir / snapshot_name(layer, tokens)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step{step:09d}.pt"

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.stem[4:]) for p in self.checkpoints.glob("step*.pt"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file_object)`` to a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SaecacheError(f"cannot read {path}: {err}") from None


def read_metrics(path: Path) -> list[dict]:
    """The lines of a ``metrics.jsonl``; a half-written last line (a run being killed) is dropped."""
    lines = []
    for text in Path(path).read_text().splitlines():
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines
