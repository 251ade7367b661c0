"""The cascade certificate: try the noise levels from the largest down, answer at the first confident one.

The deployed classifier, for levels sigma_1 > sigma_2 > ... > sigma_K and a threshold p0 >= 1/2: at level k let
``p_c^k(x)`` be the probability that the base model at sigma_k says c. G answers c at the first level whose
top class has ``p_c^k(x) > p0`` (unique, as p0 >= 1/2), and abstains when no level has one.

Certificate at a point x answered with c at level k. For x' with ``||x' - x|| < r``, G(x') = c when
- at level k, ``p_c^k(x') > p0``: Cohen's bound holds while ``r < sigma_k (Phi^-1(pA_lower) - Phi^-1(p0))``;
- at every higher level j, no class other than c passes p0 at x' (c itself may: then G answers c earlier):
  ``Phi^-1(p_c'^j)`` is (1 / sigma_j)-Lipschitz in x, so this holds while
  ``r <= sigma_j (Phi^-1(p0) - Phi^-1(pB_upper_j))`` with ``pB_upper_j`` an upper bound on every class but c.
The radius is the minimum of these terms. At each visited level the selection draws pick the top class and fresh
estimation draws give a Clopper-Pearson lower bound on it (half of the level's share alpha_k of alpha) and
simultaneous upper bounds on every class (the other half, Bonferroni over the classes); the last level uses its
whole share for the lower bound, as no level below it reads upper bounds. The shares are alpha / K each, so all
bounds of all levels hold together with probability at least 1 - alpha (union bound), and then every radius
above is correct. A level whose interval holds p0 makes G abstain; one whose upper bounds are all below p0
confidently abstains and hands the point to the next level down.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from ssmooth.certify.adaptive import choose_sample_sizes, default_sizes, pilot_interval
from ssmooth.certify.checks import check_call
from ssmooth.certify.core import ABSTAIN, _device_of, _noise_source, sample_counts
from ssmooth.certify.run import certify_in_groups
from ssmooth.certify.stats import lower_confidence_bound, upper_confidence_bound


@dataclass(frozen=True)
class CascadeCertificate:
    """Per-point result of ``certify_cascade``; every field is a CPU tensor [B].

    ``sigma`` is the level that answered (0 where G abstains), ``stage`` its position from the largest level
    (0-based; -1 where G abstains), ``radius_level`` the answering level's own term and ``radius_abstention``
    the smallest term of the higher levels that handed the point down (inf where there were none)."""

    prediction: torch.Tensor  # long, ABSTAIN where G abstains
    radius: torch.Tensor  # float64
    sigma: torch.Tensor  # float
    stage: torch.Tensor  # long
    radius_level: torch.Tensor  # float64
    radius_abstention: torch.Tensor  # float64
    samples: torch.Tensor  # long, forward passes per point over every level it visited


def alpha_shares(alpha: float, num_levels: int, num_classes: int) -> list[tuple[float, float]]:
    """Per level (largest first): (alpha of the lower bound on the top class, alpha of EACH class's upper bound).
    Each level gets alpha / K; every level but the last splits it half and half, the upper half by Bonferroni."""
    share = alpha / num_levels
    return [(share / 2, share / 2 / num_classes)] * (num_levels - 1) + [(share, 0.0)]


def _ordered(models, levels: Sequence[float]) -> tuple[list[float], list[nn.Module]]:
    levels = [float(s) for s in levels]
    if not levels or not all(np.isfinite(s) and s > 0 for s in levels):
        raise ValueError(f"levels must be noise levels > 0, got {levels}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct, got {levels}")
    if isinstance(models, nn.Module):
        models = [models] * len(levels)
    models = list(models)
    if len(models) != len(levels):
        raise ValueError(f"models: {len(models)} models for {len(levels)} levels (give one, or one per level)")
    order = sorted(range(len(levels)), key=lambda k: -levels[k])
    return [levels[k] for k in order], [models[k] for k in order]


def certify_cascade(
    models,
    x: torch.Tensor,
    levels: Sequence[float],
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    *,
    p0: float = 0.5,
    num_classes: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    indices: Sequence[int] | None = None,
    sampling: str = "fixed",
    max_radius_loss: float = 0.02,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> CascadeCertificate:
    """CERTIFY the cascade classifier at every point of ``x`` ([B, *shape]).

    ``models`` is one module used at every level, or one per entry of ``levels`` (any order; the cascade runs
    from the largest level down). With probability at least 1 - alpha over the sampling, for each point that is
    not abstained, the cascade answers ``prediction`` on the whole open l2 ball of radius ``radius`` around it.
    Each visited level draws n0 selection and n estimation samples (``sampling="adaptive"``: fewer where the
    pilot shows the point clearly answers at that level, within ``max_radius_loss`` of the radius at n). Noise:
    per-point streams of purposes ``cascade<k>/selection`` and ``cascade<k>/estimation`` with ``seed`` and
    ``indices``, else ``generator``.

    One piece on purpose: the levels' loop carries the bounds that the lower levels' radii depend on, so the
    soundness argument can be checked in one place."""
    _check_settings(alpha, p0, n0, n, sampling)
    x, _ = check_call(x, levels, num_classes, levels_name="levels")  # one image [C, H, W]: a batch of one
    levels, models = _ordered(models, levels)
    num_points = x.shape[0]
    prediction = torch.full((num_points,), ABSTAIN, dtype=torch.long)
    radius_level = np.zeros(num_points)
    abstention = np.full(num_points, np.inf)  # the smallest term of the levels that handed a point down
    upper_by_level: list[tuple] = []  # (level, points handed down, their per-class upper bounds [P, C])
    sigma = torch.zeros(num_points, dtype=torch.float64)
    stage = torch.full((num_points,), -1, dtype=torch.long)
    samples = torch.zeros(num_points, dtype=torch.long)
    active = np.arange(num_points)
    shares = alpha_shares(alpha, len(levels), num_classes)
    options = dict(batch_size=batch_size, num_classes=num_classes, autocast_dtype=autocast_dtype,
                   channels_last=channels_last)
    for k, (level, model) in enumerate(zip(levels, models)):
        if active.size == 0:
            break
        lower_alpha, upper_alpha = shares[k]
        sub = [indices[i] for i in active] if indices is not None else None
        cA, nA, votes, n_i = _level_counts(model, x[torch.as_tensor(active, device=x.device)], level, n0, n, k,
                                           lower_alpha, sampling, max_radius_loss, generator, seed, sub, options)
        samples[active] += torch.as_tensor(n0 + n_i)
        pA_lower = lower_confidence_bound(nA, n_i, lower_alpha)
        answer = pA_lower >= p0
        pts = active[answer]
        prediction[pts] = torch.as_tensor(cA[answer])
        sigma[pts] = level
        stage[pts] = k
        radius_level[pts] = level * (norm.ppf(pA_lower[answer]) - norm.ppf(p0))
        abstention[pts] = _abstention_term(pts, cA[answer], upper_by_level, p0)
        if k == len(levels) - 1:
            break
        upper = upper_confidence_bound(votes, n_i[:, None], upper_alpha)
        down = ~answer & (upper.max(axis=1) < p0)
        upper_by_level.append((level, active[down], upper[down]))
        active = active[down]
    radius = np.where(prediction.numpy() != ABSTAIN, np.minimum(radius_level, abstention), 0.0)
    return CascadeCertificate(prediction=prediction, radius=torch.from_numpy(np.maximum(radius, 0.0)), sigma=sigma,
                              stage=stage, radius_level=torch.from_numpy(radius_level),
                              radius_abstention=torch.from_numpy(abstention), samples=samples)


def _check_settings(alpha: float, p0: float, n0: int, n: int, sampling: str) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.5 <= p0 < 1:
        raise ValueError(f"p0 must be in [0.5, 1), got {p0}")
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if sampling not in ("fixed", "adaptive"):
        raise ValueError(f"sampling must be 'fixed' or 'adaptive', got {sampling!r}")


def _abstention_term(points: np.ndarray, classes: np.ndarray, upper_by_level: list, p0: float) -> np.ndarray:
    """For ``points`` answered with ``classes``: the smallest ``s_j (Phi^-1(p0) - Phi^-1(max upper bound of a
    class other than the answer))`` over the higher levels j that handed them down (inf where there were none)."""
    term = np.full(len(points), np.inf)
    for higher, handed, upper in upper_by_level:  # every point answered below a level was handed down by it
        others = upper[np.searchsorted(handed, points)].copy()
        others[np.arange(len(points)), classes] = 0.0  # c itself may pass p0 up there
        term = np.minimum(term, higher * (norm.ppf(p0) - norm.ppf(others.max(axis=1))))
    return term


def _level_counts(model, x, level, n0, n, k, lower_alpha, sampling, max_radius_loss, generator, seed, indices,
                  options):
    """Selection and estimation votes of the points ``x`` at one level: (cA, nA, votes [P, C], n_i)."""
    device = _device_of(model)
    pilot = sample_counts(model, x, level, n0, **options,
                          **_noise_source(x, generator, seed, indices, f"cascade{k}/selection", n0, device)).cpu()
    cA = pilot.argmax(dim=1)
    n_i = np.full(x.shape[0], n, dtype=np.int64)
    if sampling == "adaptive":
        # Fewer draws only where the pilot alone shows the point answering here; a point that may be handed
        # down keeps n, as its upper bounds cap the radius of the levels below.
        kA = pilot.gather(1, cA[:, None]).squeeze(1).numpy()
        planned = choose_sample_sizes(kA, n0, level, default_sizes(n), lower_alpha, max_radius_loss)
        n_i = np.where(pilot_interval(kA, n0, 0.95)[0] >= 0.5, planned, n)
    sizes = [int(s) for s in n_i]
    votes = sample_counts(model, x, level, sizes, **options,
                          **_noise_source(x, generator, seed, indices, f"cascade{k}/estimation", sizes,
                                          device)).cpu().numpy()
    cA = cA.numpy()
    return cA, votes[np.arange(len(cA)), cA], votes, n_i


# Rows of the cascade certificate: the usual columns, then the answering level's position and both radius terms.
CASCADE_COLUMNS = ("idx", "label", "predict", "radius", "correct", "sigma", "time", "samples",
                   "stage", "radius_level", "radius_abstention")


def certify_points_cascade(models, points: Sequence, writer, *, levels: Sequence[float], n0: int, n: int,
                           alpha: float, batch_size: int, num_classes: int, p0: float = 0.5,
                           points_per_group: int = 32, seed: int = 0, device: torch.device | str = "cpu",
                           sampling: str = "fixed", max_radius_loss: float = 0.02,
                           autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                           progress=None) -> None:
    """``certify_cascade`` on every item ``(x, y, index)`` of ``points`` that ``writer`` (a RowWriter with
    CASCADE_COLUMNS) has not written yet, one flushed row per point, each point from its own streams."""
    def certify_group(x: torch.Tensor, indices: list[int]):
        cert = certify_cascade(models, x, levels, n0=n0, n=n, alpha=alpha, batch_size=batch_size, p0=p0,
                               num_classes=num_classes, seed=seed, indices=indices, sampling=sampling,
                               max_radius_loss=max_radius_loss, autocast_dtype=autocast_dtype,
                               channels_last=channels_last)
        extra = {"stage": [int(v) for v in cert.stage],
                 "radius_level": [float(r) for r in cert.radius_level],
                 "radius_abstention": [float(r) for r in cert.radius_abstention]}
        return cert.prediction, cert.radius, cert.sigma, cert.samples, extra

    certify_in_groups(points, writer, certify_group, points_per_group=points_per_group, device=device,
                      progress=progress)
