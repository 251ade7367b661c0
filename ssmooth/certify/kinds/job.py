"""What every certificate kind is handed: one test set, one model (and its selector or experts), one folder."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


@dataclass
class Job:
    """One certification of ``points`` into ``out``.

    ``produce(path, columns, label, sigma=..., runner=..., model=...)`` writes the rows of every point that
    ``path`` lacks (resumable, one flushed row per point); ``read(path)`` returns the rows of exactly the
    requested points. ``experts`` are one model per level of ``expert_levels`` (ascending). ``state`` carries
    what one kind leaves for another (the constant rows' path, the selection draws' cost, summary extras)."""

    model: nn.Module
    points: object
    out: Path
    cfg: object  # CertifyConfig
    policy: str
    sigma0: float
    grid: list[float] | None
    radii: list[float]
    produce: Callable
    read: Callable
    selector: tuple | None = None  # (h_e, grid, sigma_e)
    experts: list[nn.Module] | None = None
    expert_levels: list[float] | None = None
    state: dict = field(default_factory=dict)

    def main_path(self, name: str) -> Path:
        """The row file of kind ``name``: certify.tsv when it is the policy's own certificate."""
        return self.out / ("certify.tsv" if name == self.policy else f"certify_{name}.tsv")
