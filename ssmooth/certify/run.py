"""Certify a set of test points group by group, writing one flushed row per point (resumable)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ssmooth.certify.adaptive import certify_adaptive
from ssmooth.certify.core import certify
from ssmooth.certify.results import RowWriter

# Picks the noise level of each point of a group: (x [B, *shape], generator) -> sigma [B]. It must not look at
# labels and must draw its own noise, never the certification's.
SigmaSelector = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def group_seed(seed: int, first_index: int) -> int:
    """Seed of the group that starts at dataset index ``first_index``: a resumed run draws fresh, reproducible
    noise for the points it still has to do, whatever was done before."""
    return (int(seed) * 1_000_003 + int(first_index) * 7_919) % (2**63 - 1)


def certify_points(
    model: nn.Module,
    points: Sequence,
    writer: RowWriter,
    *,
    sigma: float | SigmaSelector,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    num_classes: int,
    points_per_group: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: Callable[[int], None] | None = None,
    sampling: str = "fixed",
    max_radius_loss: float = 0.02,
) -> None:
    """CERTIFY every item ``(x, y, index)`` of ``points`` whose index ``writer`` has not written yet.

    ``sigma`` is one level for all points, or a selector choosing a level per point (sample-wise smoothing);
    with a selector the rows also carry ``radius_raw`` (the unallocated radius). ``sampling="adaptive"`` gives
    each point its own number of samples (``certify_adaptive``, within ``max_radius_loss`` of the radius at n);
    every row carries the forward passes its point cost in ``samples``. Several points form a group so
    that their noisy copies share forward batches; each row's ``time`` is its share of the group's wall time.
    """
    todo = [i for i in range(len(points)) if int(points[i][2]) not in writer.done]
    samplewise = callable(sigma)
    for start in range(0, len(todo), points_per_group):
        group = [points[i] for i in todo[start : start + points_per_group]]
        x = torch.stack([item[0] for item in group]).to(device)
        labels = [int(item[1]) for item in group]
        indices = [int(item[2]) for item in group]
        generator = torch.Generator(device=device).manual_seed(group_seed(seed, indices[0]))
        began = time.perf_counter()
        if samplewise:
            # Selection draws come from their own generator, so certification never reuses them.
            selector_gen = torch.Generator(device=device).manual_seed(group_seed(seed + 1, indices[0]))
            levels = sigma(x, selector_gen).to(device=device, dtype=torch.float32)
        else:
            levels = torch.full((len(group),), float(sigma), device=device)
        kw = dict(n0=n0, n=n, alpha=alpha, batch_size=batch_size, num_classes=num_classes, generator=generator,
                  autocast_dtype=autocast_dtype, channels_last=channels_last)
        if sampling == "adaptive":
            cert = certify_adaptive(model, x, levels, max_radius_loss=max_radius_loss, **kw)
        else:
            cert = certify(model, x, levels, **kw)
        samples = cert.samples if cert.samples is not None else torch.full((len(group),), n0 + n)
        elapsed = (time.perf_counter() - began) / len(group)
        rows = []
        for k, (idx, label) in enumerate(zip(indices, labels)):
            pred = int(cert.prediction[k])
            row = {"idx": idx, "label": label, "predict": pred, "radius": float(cert.radius[k]),
                   "correct": int(pred == label), "sigma": float(levels[k]), "time": round(elapsed, 4),
                   "samples": int(samples[k])}
            if samplewise:
                row["radius_raw"] = row["radius"]
            rows.append(row)
        writer.write(rows)
        if progress is not None:
            progress(len(group))
