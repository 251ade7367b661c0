"""Noise policies: the noise level of every training sample, looked up by dataset index.

A policy maps a LongTensor of dataset indices [B] to a float tensor of noise levels [B] on the same device.
Objectives only ever see that per-sample tensor, so constant and sample-wise training share all their code.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConstantSigma(nn.Module):
    """Every sample is smoothed at the same level (Cohen, SmoothAdv, MACER baselines)."""

    kind = "constant"

    def __init__(self, sigma: float):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"noise.sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return torch.full(index.shape, self.sigma, dtype=torch.float32, device=index.device)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class SampleWiseSigma(nn.Module):
    """A noise level per training sample, chosen from a discrete ``grid``.

    The table is a buffer, so it is saved in checkpoints with the model and restored on resume. Entries start
    at ``sigma`` (the base level) until the first selection writes them.
    """

    kind = "samplewise"

    def __init__(self, sigma: float, grid: Sequence[float], num_samples: int):
        super().__init__()
        grid = sorted(float(s) for s in grid)
        if not sigma > 0:
            raise ValueError(f"noise.sigma must be > 0, got {sigma}")
        if not grid or min(grid) <= 0:
            raise ValueError(f"noise grid must be non-empty and > 0, got {grid}")
        if num_samples < 1:
            raise ValueError(f"the sigma table needs at least one sample, got {num_samples}")
        self.sigma = float(sigma)
        self.grid = grid
        self.register_buffer("table", torch.full((num_samples,), float(sigma)))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index.to(self.table.device)].to(index.device)

    @torch.no_grad()
    def update(self, index: torch.Tensor, sigma: torch.Tensor) -> float:
        """Write new levels for ``index``; returns the fraction of those entries that changed."""
        index = index.to(self.table.device)
        sigma = sigma.to(self.table.device, self.table.dtype)
        changed = (self.table[index] != sigma).float().mean().item() if index.numel() else 0.0
        self.table[index] = sigma
        return changed

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, grid={self.grid}, num_samples={self.table.numel()}"


def sigma_grid(sigma: float, factors: Sequence[float]) -> list[float]:
    """The candidate levels ``sigma * factor``, sorted and de-duplicated."""
    if not factors:
        raise ValueError("noise.grid_factors must not be empty")
    if min(factors) <= 0:
        raise ValueError(f"noise.grid_factors must be > 0, got {list(factors)}")
    return sorted({round(float(sigma) * float(f), 10) for f in factors})


# Re-exported: choosing a level per sample belongs with the policies that use it.
from ssmooth.selection import select_sigma  # noqa: E402,F401
