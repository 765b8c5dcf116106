"""What tells one SAE from its sister runs: layer, architecture, expansion and sparsity setting."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from saecache.sae.archs import arch_of


@dataclass(frozen=True)
class RunSpec:
    """One SAE of a training invocation; saved as ``spec`` in run.json."""

    layer: int
    """Block whose output the SAE reconstructs."""
    arch: str
    """An architecture of :mod:`saecache.sae.archs` (relu, topk, batchtopk, jumprelu)."""
    expansion: int
    """F = expansion × d."""
    l1: float | None = None
    """The penalty's coefficient, fixed or the starting value when adaptive: relu's L1
    coefficient, jumprelu's λ on L0."""
    target_l0: float | None = None
    """Adaptive runs: the L0 the controller steers toward (None: fixed coefficient)."""
    k: int | None = None
    """Active features per token (topk; batchtopk: on average over a batch)."""

    @property
    def family(self) -> str:
        """The run's settings without its layer (relu-x32-l1-0.0003): sister layers share it."""
        return f"{self.arch}-x{self.expansion}-{arch_of(self.arch).run_label(self)}"

    @property
    def name(self) -> str:
        """Folder name: layer05-relu-x32-l1-0.0003, layer05-relu-x32-adaptive-l0-150, layer05-topk-x32-k64."""
        return f"layer{self.layer:02d}-{self.family}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunSpec:
        """From run.json's ``spec``; TypeError or KeyError when it is not one."""
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise TypeError(f"not a run spec: {data!r}")
        return cls(**data)
