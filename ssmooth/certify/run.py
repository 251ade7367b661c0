"""Certify a set of test points group by group, writing one flushed row per point (resumable)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ssmooth.certify.adaptive import certify_adaptive
from ssmooth.certify.core import certify
from ssmooth.certify.results import RowWriter
from ssmooth.certify.streams import NoiseStream, point_streams

# The per-point noise streams of one group: (purpose, draws per point) -> one stream per point of the group.
StreamFactory = Callable[[str, int], list[NoiseStream]]
# Picks the noise level of each point of a group: (x [B, *shape], streams) -> sigma [B]. It must not look at
# labels and draws from the group's "level" streams, never the certification's.
SigmaSelector = Callable[[torch.Tensor, StreamFactory], torch.Tensor]


def dataset_indices(points) -> list[int]:
    """The dataset index of every item, read without loading the items where the dataset keeps them apart (an
    image dataset decoded from files would otherwise decode every image just for its index)."""
    if hasattr(points, "indices"):
        return [int(i) for i in points.indices]
    return [int(points[i][2]) for i in range(len(points))]


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
    Every point draws its noise from its own streams, keyed by (``seed``, dataset index, purpose): its row is the
    same whichever group, rank or shard certifies it, and whether or not the run was resumed.
    """
    samplewise = callable(sigma)

    def certify_group(x: torch.Tensor, indices: list[int]):
        if samplewise:
            def streams(purpose: str, total: int) -> list[NoiseStream]:
                return point_streams(seed, indices, purpose, x.shape[1:], total, device=x.device, dtype=x.dtype)

            levels = sigma(x, streams).to(device=device, dtype=torch.float32)
        else:
            levels = torch.full((len(indices),), float(sigma), device=device)
        kw = dict(n0=n0, n=n, alpha=alpha, batch_size=batch_size, num_classes=num_classes, seed=seed,
                  indices=indices, autocast_dtype=autocast_dtype, channels_last=channels_last)
        if sampling == "adaptive":
            cert = certify_adaptive(model, x, levels, max_radius_loss=max_radius_loss, **kw)
        else:
            cert = certify(model, x, levels, **kw)
        samples = cert.samples if cert.samples is not None else torch.full((len(indices),), n0 + n)
        extra = {"radius_raw": [float(r) for r in cert.radius]} if samplewise else {}
        return cert.prediction, cert.radius, levels, samples, extra

    certify_in_groups(points, writer, certify_group, points_per_group=points_per_group, device=device,
                      progress=progress)


def certify_in_groups(points: Sequence, writer: RowWriter, certify_group: Callable, *, points_per_group: int,
                      device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> None:
    """The row loop of every certificate: the points ``writer`` has not written yet, in groups of
    ``points_per_group``, one flushed row per point. ``certify_group(x, indices)`` returns per point the
    prediction, radius, level and forward passes, and a dict of further columns (a list per column); each row's
    ``time`` is its share of the group's wall time."""
    todo = [i for i, idx in enumerate(dataset_indices(points)) if idx not in writer.done]
    for start in range(0, len(todo), points_per_group):
        group = [points[i] for i in todo[start : start + points_per_group]]
        x = torch.stack([item[0] for item in group]).to(device)
        indices = [int(item[2]) for item in group]
        began = time.perf_counter()
        prediction, radius, levels, samples, extra = certify_group(x, indices)
        elapsed = (time.perf_counter() - began) / len(group)
        rows = []
        for k, (item, idx) in enumerate(zip(group, indices)):
            pred, label = int(prediction[k]), int(item[1])
            rows.append({"idx": idx, "label": label, "predict": pred, "radius": float(radius[k]),
                         "correct": int(pred == label), "sigma": float(levels[k]), "time": round(elapsed, 4),
                         "samples": int(samples[k]), **{column: values[k] for column, values in extra.items()}})
        writer.write(rows)
        if progress is not None:
            progress(len(group))
