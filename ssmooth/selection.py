"""Choosing a noise level per sample from a discrete grid (stages B and D of the method, docs/METHOD.md).

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

from ssmooth.certify.checks import OutputCheck, check_inputs, check_levels
from ssmooth.models.denoisers import call_model


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

    Ties between levels go to the smaller one. See `sigma_scores` for the arguments. Refused with a ValueError
    naming the argument: an empty or non-finite ``x``, levels that are not finite and > 0, NaN or infinite
    logits; a warning when ``x`` leaves [0, 1].
    """
    check_inputs(x)
    check_levels(grid, "grid")
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
    point = torch.arange(num_points, device=x.device).repeat(len(levels))  # row: level * B + point
    sigma = torch.tensor(levels, dtype=x.dtype, device=x.device).repeat_interleave(num_points)
    probs = _probabilities_at(model, x, point, sigma, num_samples, generator, batch_size, soft, streams)
    return probs.view(len(levels), num_points, -1)


def _probabilities_at(model, x, point, sigma, num_samples, generator, batch_size, soft, streams=None):
    """[R, num_classes]: for each row r, vote fractions (or mean softmax) of f(x[point[r]] + sigma[r] * eps) over
    ``num_samples`` draws. Draws are taken in (row, draw) order, and copies of different rows share batches.
    With ``streams`` (one per point) row r's draws are the next ones of ``streams[point[r]]``; a point's rows
    come in row order, the order its stream serves them."""
    total = len(point) * num_samples
    noise_device = generator.device if generator is not None else x.device
    if streams is not None:
        from ssmooth.certify.streams import fill_from_streams

        rows_point = point.tolist()
        row_offsets = [r * num_samples for r in range(len(point) + 1)]
        eps_buffer = torch.empty((min(batch_size, total), *x.shape[1:]), device=x.device, dtype=x.dtype)
    sums = None
    check_output = OutputCheck(None, x.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                row = torch.arange(start, stop, device=x.device) // num_samples
                if streams is not None:
                    eps = fill_from_streams(eps_buffer, streams, rows_point, row_offsets, start, stop)
                else:
                    eps = torch.randn((len(row), *x.shape[1:]), generator=generator, device=noise_device,
                                      dtype=x.dtype)
                scale = sigma[row].view(-1, *([1] * (x.ndim - 1)))
                logits = call_model(model, x[point[row]] + scale * eps.to(x.device), sigma[row])
                check_output(logits)
                if soft:
                    votes = logits.float().softmax(dim=1)
                else:
                    votes = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).float()
                if sums is None:
                    sums = torch.zeros(len(point), logits.shape[1], device=x.device)
                sums.index_add_(0, row, votes)
    finally:
        model.train(was_training)
    check_output.finish()
    return sums / num_samples


def select_neighbour_levels(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    current: torch.Tensor,
    grid: Sequence[float],
    num_samples: int = 4,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    soft: bool = True,
    clip: tuple[float, float] | None = None,
    current_estimate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One step of a local search over the grid (training only): the best of the current level and its two
    neighbours, as grid indices (long [B], on x's device).

    ``current``: the grid index of each sample's level now (long [B]); ``grid`` sorted ascending.
    ``current_estimate``: ``(p_label, right)`` at the current level, float [B] each, estimated elsewhere (e.g.
    from the training steps' own forward passes); NaN where there is none: only those samples probe their current
    level with fresh draws. Scores are those of ``sigma_scores``: ``s * Phi^-1(clip(p_label))`` when the label is
    the top class at s, -inf otherwise; ties go to the smaller level, and a sample wrong at all three moves down.
    Costs at most 3 * num_samples forward passes per sample (2 * num_samples with a current estimate), against
    len(grid) * num_samples for a full ``select_sigma``.

    Long for its arguments; the local search step reads best as one piece."""
    levels = _check_grid(grid)
    if levels != sorted(levels):
        raise ValueError(f"grid must be sorted ascending, got {levels}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    lo, hi = clip if clip is not None else (1 / (2 * num_samples), 1 - 1 / (2 * num_samples))
    num_points = x.shape[0]
    if num_points == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    device = _model_device(model, x)
    x, labels = x.to(device), labels.to(device=device, dtype=torch.long)
    current = current.to(device=device, dtype=torch.long)
    top = len(levels) - 1
    candidates = torch.stack([(current - 1).clamp(0, top), current, (current + 1).clamp(0, top)], dim=1)  # [B, 3]
    p = torch.full((num_points, 3), math.nan, dtype=torch.float64, device=device)
    right = torch.zeros((num_points, 3), dtype=torch.bool, device=device)
    probe = torch.ones((num_points, 3), dtype=torch.bool, device=device)
    probe[:, 0] &= current > 0  # at the ends of the grid there is only one neighbour
    probe[:, 2] &= current < top
    if current_estimate is not None:
        known_p, known_right = (t.to(device) for t in current_estimate)
        known = ~torch.isnan(known_p)
        p[known, 1] = known_p[known].double()
        right[known, 1] = known_right[known].bool()
        probe[known, 1] = False
    point, column = probe.nonzero(as_tuple=True)
    if len(point):
        sig = torch.tensor(levels, dtype=x.dtype, device=device)[candidates[point, column]]
        probs = _probabilities_at(model, x, point, sig, num_samples, generator, batch_size, soft)
        y = labels[point]
        p[point, column] = probs.gather(1, y[:, None]).squeeze(1).double()
        right[point, column] = probs.argmax(dim=1) == y
    # Unprobed ends score -inf; so do wrong levels. The current level counts where it was probed or estimated.
    valid = probe.clone()
    valid[:, 1] |= ~torch.isnan(p[:, 1])
    sig = torch.tensor(levels, dtype=torch.float64, device=device)[candidates]
    scores = torch.where(valid & right, sig * torch.special.ndtri(p.nan_to_num(0.5).clamp(lo, hi)), -math.inf)
    # Columns are in ascending level order, so argmax's first maximum is the smaller level; all -inf: move down.
    return candidates.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1).to(x.device)


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
