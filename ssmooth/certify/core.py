"""CERTIFY and PREDICT of Cohen et al. (2019) for batches of points.

Noisy copies of several points share one forward batch, votes are tallied on the model's device with
``torch.bincount``, and the memory used does not grow with the number of samples n.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ssmooth.certify.checks import OutputCheck, check_call, check_levels, check_num_classes, first_of
from ssmooth.certify.streams import NoiseStream, fill_from_streams, point_streams
from ssmooth.certify.stats import lower_confidence_bound, radius_from_pA, two_sided_pvalue
from ssmooth.models.denoisers import call_model

ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """Per-point result of CERTIFY. ``prediction`` is ABSTAIN and ``radius`` 0 where it abstains."""

    prediction: torch.Tensor  # long [B]
    radius: torch.Tensor  # float64 [B]: never rounded to float32, which could round a radius up
    pA_lower: torch.Tensor  # float64 [B]
    count: torch.Tensor  # long [B], nA: votes for the selected class among the n estimation samples
    # long [B]: forward passes per point (n0 + estimation draws); None where every point used n0 + n
    samples: torch.Tensor | None = None


def _as_sigma(sigma, num_points: int, device) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.dim() == 0:
        sigma = sigma.expand(num_points)
    if sigma.shape != (num_points,):
        raise ValueError(f"sigma must be a float or a tensor of shape [{num_points}], got shape {tuple(sigma.shape)}")
    check_levels(sigma, "sigma")
    return sigma


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def sample_counts(
    model: nn.Module,
    x: torch.Tensor,
    sigma,
    num: int | Sequence[int],
    *,
    batch_size: int = 1000,
    num_classes: int,
    generator: torch.Generator | None = None,
    streams: Sequence[NoiseStream] | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Votes of ``model`` on ``num`` noisy copies ``x_i + sigma_i * eps`` of every point: LongTensor [B, num_classes].

    ``num`` is one count for all points or one per point. The (point, draw) pairs are walked in chunks of
    ``batch_size`` noisy inputs, so one forward batch holds copies of several points when num < batch_size, and
    memory stays at one chunk whatever num is. The noise comes from ``streams`` (one per point: point i's copies
    are the next draws of ``streams[i]``, whatever the chunking) or else from ``generator``.
    ``channels_last`` converts the inputs only: convert the model's weights too
    (``model.to(memory_format=torch.channels_last)``), or the conv kernels stay on the slow path.

    One piece on purpose: the hot loop of every certificate (noise, forward pass, vote count), kept together so that
    its batching and streams can be read at once."""
    num_points = x.shape[0]
    nums = [int(num)] * num_points if isinstance(num, (int, np.integer)) else [int(k) for k in num]
    if len(nums) != num_points:
        raise ValueError(f"num has {len(nums)} entries for {num_points} points")
    if num_points and min(nums) < 1:
        raise ValueError(f"number of samples must be >= 1, got {min(nums)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if streams is not None and len(streams) != num_points:
        raise ValueError(f"{len(streams)} noise streams for {num_points} points")
    check_num_classes(num_classes)
    device = _device_of(model)
    x = x.to(device)
    sigma = _as_sigma(sigma, num_points, device)
    check_output = OutputCheck(num_classes, device)
    counts = torch.zeros(num_points * num_classes, dtype=torch.long, device=device)
    offsets = [0, *itertools.accumulate(nums)]  # point i owns flat positions offsets[i] .. offsets[i + 1] - 1
    total = offsets[-1]
    uniform = len(set(nums)) <= 1
    ends = None if uniform else torch.tensor(offsets[1:], device=device)
    noise = torch.empty((min(batch_size, total), *x.shape[1:]), device=device, dtype=x.dtype)
    ones = torch.ones(min(batch_size, total), dtype=torch.long, device=device)
    owner = range(num_points)
    amp = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), amp:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                flat = torch.arange(start, stop, device=device)
                point = flat // nums[0] if uniform else torch.searchsorted(ends, flat, right=True)
                eps = noise[: stop - start]
                if streams is not None:
                    fill_from_streams(eps, streams, owner, offsets, start, stop)
                else:
                    torch.randn(eps.shape, generator=generator, device=device, dtype=x.dtype, out=eps)
                # Pixel space, never clipped: the theorem is about x + sigma * eps exactly.
                batch = torch.addcmul(x[point], eps, sigma[point].view(-1, *[1] * (x.dim() - 1)))
                if channels_last and batch.dim() == 4:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits = call_model(model, batch, sigma[point])
                check_output(logits)
                predicted = logits.argmax(dim=1)
                # index_add_ rather than bincount: bincount on CUDA reads its input's range back to the host,
                # a sync per chunk.
                counts.index_add_(0, point * num_classes + predicted, ones[: stop - start])
    finally:
        model.train(was_training)
    check_output.finish()
    return counts.view(num_points, num_classes)


def _noise_source(x, generator, seed, indices, purpose: str, total: int, device) -> dict:
    """sample_counts' noise keyword: per-point streams of ``purpose`` when ``indices`` are given, else the
    generator."""
    if indices is None:
        if seed is not None:
            raise ValueError("seed= needs indices= (the dataset index of every point): streams are keyed by both")
        return {"generator": generator}
    if generator is not None:
        raise ValueError("give either generator= or seed= and indices=, not both")
    if len(indices) != x.shape[0]:
        raise ValueError(f"{len(indices)} indices for {x.shape[0]} points")
    return {"streams": point_streams(0 if seed is None else seed, [int(i) for i in indices], purpose, x.shape[1:],
                                     total, device=device, dtype=x.dtype)}


def certify(
    model: nn.Module,
    x: torch.Tensor,
    sigma,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    *,
    num_classes: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    indices: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Certificate:
    """CERTIFY every point of ``x`` ([B, *shape]) at its own noise level ``sigma`` (float or [B]).

    With probability at least 1 - alpha over the sampling, for each point that is not abstained, the smoothed
    classifier g_sigma predicts ``prediction`` everywhere in the open l2 ball of radius ``radius`` around it.
    The class is chosen on n0 samples and its probability bounded on n FRESH samples, so the bound is not
    biased by the selection. Each level is rounded to float32 once; the noise is drawn at that value and the
    radius uses the same value, exactly, in float64.

    Noise: with ``indices`` (the dataset index of every point) and ``seed``, point i's selection and estimation
    draws come from its own streams (``ssmooth.certify.streams``), so its result does not depend on which other
    points share the call or how they are batched; otherwise all draws come from ``generator`` in turn.

    ``x`` holds [0, 1] pixels (a warning says when it does not); one image [C, H, W] is a batch of one, and
    every field of its Certificate is then a 0-dim tensor (``int(cert.prediction)``, ``float(cert.radius)``).
    Refused with a ValueError naming the argument: non-finite inputs, levels that are not finite and > 0, a
    model whose output width is not ``num_classes`` (seen on the first batch), NaN or infinite logits.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n0 < 1:
        raise ValueError(f"n0 must be >= 1, got {n0}")
    x, single = check_call(x, sigma, num_classes)
    device = _device_of(model)
    sigma = _as_sigma(sigma, x.shape[0], device)
    kw = dict(batch_size=batch_size, num_classes=num_classes, autocast_dtype=autocast_dtype,
              channels_last=channels_last)
    selection = sample_counts(model, x, sigma, n0, **kw,
                              **_noise_source(x, generator, seed, indices, "selection", n0, device))
    cA = selection.argmax(dim=1)
    estimation = sample_counts(model, x, sigma, n, **kw,
                               **_noise_source(x, generator, seed, indices, "estimation", n, device))
    nA = estimation.gather(1, cA[:, None]).squeeze(1)

    sigma_np = sigma.double().cpu().numpy()  # float32 -> float64 is exact: the sigma the noise was drawn at
    pA_lower = lower_confidence_bound(nA.cpu().numpy(), n, alpha)
    certified = pA_lower >= 0.5
    radius = np.where(certified, radius_from_pA(np.clip(pA_lower, 0.5, 1.0), sigma_np), 0.0)
    prediction = torch.where(torch.from_numpy(certified), cA.cpu(), torch.full_like(cA.cpu(), ABSTAIN))
    cert = Certificate(
        prediction=prediction,
        radius=torch.from_numpy(radius),
        pA_lower=torch.from_numpy(pA_lower),
        count=nA.cpu(),
    )
    return first_of(cert) if single else cert


def predict(
    model: nn.Module,
    x: torch.Tensor,
    sigma,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    *,
    num_classes: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    indices: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """PREDICT: the smoothed classifier's label per point, or ABSTAIN.

    With probability at least 1 - alpha, a non-abstained label is the top class of g_sigma(x). Noise as in
    ``certify``: per-point "prediction" streams with ``seed`` and ``indices``, else ``generator``. Inputs and
    refusals as in ``certify``; one image [C, H, W] gives a 0-dim label.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x, single = check_call(x, sigma, num_classes)
    noise = _noise_source(x, generator, seed, indices, "prediction", n, _device_of(model))
    counts = sample_counts(model, x, sigma, n, batch_size=batch_size, num_classes=num_classes,
                           autocast_dtype=autocast_dtype, channels_last=channels_last, **noise)
    if num_classes == 1:  # one class: the runner-up has no votes
        counts = torch.cat([counts, torch.zeros_like(counts)], dim=1)
    top2 = counts.topk(2, dim=1)
    nA, nB = top2.values[:, 0].cpu().numpy(), top2.values[:, 1].cpu().numpy()
    pvalue = two_sided_pvalue(nA, nB)
    labels = top2.indices[:, 0].cpu()
    labels = torch.where(torch.from_numpy(pvalue <= alpha), labels, torch.full_like(labels, ABSTAIN))
    return labels[0] if single else labels
