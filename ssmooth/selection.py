"""Choosing a noise level per sample from a discrete grid (SPEC section 3, stages B and D).

For each candidate level s, p_c(x; s) is estimated from `num_samples` draws of f(x + s * eps), and the level
scores `s * Phi^-1(clip(p_c))` when the smoothed model is right at s (its top class is c), -inf otherwise:
the radius Cohen's certificate would give with p_c in place of pA_lower. The best-scoring level wins; samples
wrong at every level get the smallest one.
- Training (stage B): c is the label.
- Test time (stage D): c is the predicted class at that level. Labels are never used, and the draws come from
  their own generator so that certification does not reuse them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def select_sigma(
    model: nn.Module,
    x: torch.Tensor,
    grid: Sequence[float],
    num_samples: int = 64,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    soft: bool = False,
    clip: tuple[float, float] | None = None,
    *,
    streams: Sequence | None = None,
) -> torch.Tensor:
    """Best level from `grid` for each sample of `x`: float32 [B] on x's device, values from the grid.

    Ties between levels go to the smaller one. See `sigma_scores` for the arguments.
    """
    scores = sigma_scores(model, x, grid, num_samples, labels, generator, batch_size, soft, clip, streams=streams)
    levels = torch.tensor([float(s) for s in grid], dtype=torch.float64, device=scores.device)
    order = torch.argsort(levels, stable=True)
    # argmax returns the first maximum: with columns in ascending order, ties (and all -inf) pick the smallest.
    best = order[scores[:, order].argmax(dim=1)]
    return levels[best].to(device=x.device, dtype=torch.float32)


def sigma_scores(
    model: nn.Module,
    x: torch.Tensor,
    grid: Sequence[float],
    num_samples: int = 64,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    soft: bool = False,
    clip: tuple[float, float] | None = None,
    *,
    streams: Sequence | None = None,
) -> torch.Tensor:
    """Score of every level for every sample: float64 [B, len(grid)], columns in grid order, on x's device.

    model: maps [k, *shape] inputs in [0, 1] to logits [k, num_classes]; put in eval mode during the call and
        restored afterwards. Noise is added in pixel space and never clipped.
    x: [B, *shape]. grid: candidate levels (> 0). num_samples: draws per sample and level.
    labels: [B] for training-time selection; None at test time (the predicted class at each level is used).
    generator: source of the noise; drawn on its own device and moved to the model's.
    streams: instead of ``generator``, one noise stream per sample (``ssmooth.certify.streams``) serving at
        least len(grid) * num_samples draws: level k takes draws k * m .. (k + 1) * m - 1 of the sample's
        stream, so the result does not depend on the batching or on the other samples of the call.
    batch_size: noisy inputs per forward pass; copies of different samples and levels share batches.
    soft: mean softmax probability instead of the fraction of hard votes.
    clip: bounds on p before Phi^-1, default (1 / (2 m), 1 - 1 / (2 m)) for m = num_samples. Hard votes take
        the values k / m, so p = 1 would score +inf at every level where all votes agree and the smallest
        such level would win the tie; 1 - 1/(2m), halfway between the two largest observable values, keeps
        the score finite, keeps p = 1 above p = 1 - 1/m, and lets the largest unanimous level win.
    """
    levels = _check_grid(grid)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    lo, hi = clip if clip is not None else (1 / (2 * num_samples), 1 - 1 / (2 * num_samples))
    if not 0 < lo < hi < 1:
        raise ValueError(f"clip bounds must satisfy 0 < lo < hi < 1, got ({lo}, {hi})")
    if labels is not None and labels.shape != x.shape[:1]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")

    if x.shape[0] == 0:
        return torch.empty(0, len(levels), dtype=torch.float64, device=x.device)
    device = _model_device(model, x)
    if streams is not None and len(streams) != x.shape[0]:
        raise ValueError(f"{len(streams)} noise streams for {x.shape[0]} samples")
    probs = _class_probabilities(model, x.to(device), levels, num_samples, generator, batch_size, soft, streams)
    num_levels, num_points, _ = probs.shape
    top = probs.argmax(dim=2)  # [S, B]
    if labels is None:
        target = top
    else:
        target = labels.to(device=device, dtype=torch.long).unsqueeze(0).expand(num_levels, num_points)
    p = probs.gather(2, target.unsqueeze(2)).squeeze(2).double().clamp(lo, hi)
    sig = torch.tensor(levels, dtype=torch.float64, device=device).unsqueeze(1)
    scores = torch.where(top == target, sig * torch.special.ndtri(p), -math.inf)
    return scores.T.to(x.device)


def _class_probabilities(model, x, levels, num_samples, generator, batch_size, soft, streams=None):
    """[S, B, num_classes]: vote fractions (or mean softmax) of f(x + s * eps) for every level s."""
    num_points = x.shape[0]
    total = len(levels) * num_points * num_samples  # flat index: (level, point, draw)
    sig = torch.tensor(levels, dtype=x.dtype, device=x.device)
    noise_device = generator.device if generator is not None else x.device
    if streams is not None:
        from ssmooth.certify.streams import fill_from_streams

        # row = level * B + point; a point's rows come level by level, the order its stream serves them
        rows_point = [r % num_points for r in range(len(levels) * num_points)]
        row_offsets = [r * num_samples for r in range(len(levels) * num_points + 1)]
        eps_buffer = torch.empty((min(batch_size, total), *x.shape[1:]), device=x.device, dtype=x.dtype)
    sums = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                flat = torch.arange(start, min(start + batch_size, total), device=x.device)
                row = flat // num_samples  # level * B + point
                point = row % num_points
                if streams is not None:
                    eps = fill_from_streams(eps_buffer, streams, rows_point, row_offsets, start, start + len(flat))
                else:
                    eps = torch.randn((len(flat), *x.shape[1:]), generator=generator, device=noise_device,
                                      dtype=x.dtype)
                scale = sig[row // num_points].view(-1, *([1] * (x.ndim - 1)))
                logits = model(x[point] + scale * eps.to(x.device))
                if soft:
                    votes = logits.float().softmax(dim=1)
                else:
                    votes = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).float()
                if sums is None:
                    sums = torch.zeros(len(levels) * num_points, logits.shape[1], device=x.device)
                sums.index_add_(0, row, votes)
    finally:
        model.train(was_training)
    return (sums / num_samples).view(len(levels), num_points, -1)


def _check_grid(grid) -> list[float]:
    levels = [float(s) for s in grid]
    if not levels:
        raise ValueError("grid of noise levels is empty")
    bad = [s for s in levels if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"noise levels must be finite and > 0, got {bad} in grid {levels}")
    return levels


def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return x.device
