"""The selector certificate over a set of levels: sound for any input, without needing the level itself certified.

The deployed classifier is the inductive one, ``G(x) = g_{S[g_e(x)]}(x)``: a smoothed selector ``g_e`` (noise
sigma_e, classes are grid indices) picks a level, and the classifier (or that level's expert) answers at it. The
inductive certificate asks the selector's own radius ``R_s`` to cover the ball, so a point near the selector's
boundary between two levels gets a small radius even when both levels give the same class far out. This
certificate asks less: which levels could the selector pick at distance r, and do all of them certify the same
class beyond r?

Rule. From n0 selector draws take the top level t; from n fresh draws bound, at alpha_s = alpha / 2 in all,
``P_t`` from below (``lo``, alpha_s / 2) and every other level's ``P_k`` from above (``up_k``, Bonferroni:
alpha_s / (2 (K - 1)) each, and never above ``1 - lo``). Both ``Phi^-1(P_k(x + d))`` are 1/sigma_e-Lipschitz in
d (Salman et al. 2019), so level k cannot win anywhere in the open ball of radius
``r_k = sigma_e / 2 * (Phi^-1(lo) - Phi^-1(up_k))`` (0 where negative; ``r_t = 0``). With ``c_k`` the radius of
level k's certificate where it predicts the top level's class y (0 where it says another class or abstains),

    R = min_k max(r_k, c_k),

and G predicts y on the open ball of radius R: a point at distance d < R has its level k among those with
``r_k <= d``, so ``max(r_k, c_k) > d`` gives ``c_k > d``: level k certifies y there.

Soundness (probability at least 1 - alpha). The selector bounds fail together with probability at most alpha / 2.
The classifier's certificates share the other alpha / 2: the levels that can matter are
``U = {t} + {k : r_k < Rmax_t}``, where ``Rmax_t`` is the largest radius level t can certify with n samples (R
is at most c_t <= Rmax_t, so a level entering later never binds). U is a function of the selector's draws
alone, which are independent of the classifier's, and every level of U gets alpha / (2 |U|); whichever of them
are certified, the union bound keeps their joint failure at alpha / 2. A level of U whose ``r_k`` is already at
least the current R is skipped: its term cannot bind, so it needs no certificate. The inductive certificate is
the special case where every other level is put at ``r_k = R_s``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from ssmooth.certify.checks import check_call, first_of
from ssmooth.certify.core import ABSTAIN, _device_of, _noise_source, sample_counts
from ssmooth.certify.inductive import (INDUCTIVE_COLUMNS, _check_settings, _samples, certify_points_inductive,
                                      certify_runner, selector_seed)
from ssmooth.certify.stats import lower_confidence_bound, max_certifiable_radius, upper_confidence_bound


@dataclass(frozen=True)
class LevelSetCertificate:
    """Per-point result of ``certify_level_set``; every field is a CPU tensor [B].

    ``level`` is the selector's top grid index and ``sigma`` that level; ``entry`` [B, K] holds ``r_k`` (the
    distance at which level k may be chosen; 0 for the top level); ``radius_selector`` is the smallest ``r_k`` of
    the other levels (where the level first may change) and ``radius_classifier`` the top level's own radius;
    ``certified_levels`` counts the levels certified for the point; ``radius`` is R (0 and ABSTAIN where the
    top level's classifier abstains or a level entering at 0 disagrees)."""

    level: torch.Tensor  # long
    sigma: torch.Tensor  # float
    entry: torch.Tensor  # float64 [B, K]
    radius_selector: torch.Tensor  # float64
    prediction: torch.Tensor  # long
    radius_classifier: torch.Tensor  # float64
    radius: torch.Tensor  # float64
    certified_levels: torch.Tensor  # long
    samples: torch.Tensor  # long, forward passes per point: the selector's and every certified level's


def entry_radii(top: np.ndarray, votes: np.ndarray, n: int, alpha: float, sigma_e: float) -> np.ndarray:
    """``r_k`` [B, K] from the selector's top level per point and its n estimation ``votes`` [B, K], with the
    selector's whole share ``alpha``: half on the top level's lower bound, half split over the others' upper
    bounds."""
    num_points, levels = votes.shape
    rows = np.arange(num_points)
    lower = lower_confidence_bound(votes[rows, top], n, alpha / 2)
    upper = np.minimum(upper_confidence_bound(votes, n, alpha / (2 * max(levels - 1, 1))), 1.0 - lower[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        entry = sigma_e / 2 * (norm.ppf(lower)[:, None] - norm.ppf(upper))
    entry = np.where(np.isnan(entry), 0.0, np.maximum(entry, 0.0))  # lower = 0: every level may be chosen at once
    entry[rows, top] = 0.0
    return entry


def certify_level_set(
    classifier,
    selector: nn.Module,
    x: torch.Tensor,
    grid: Sequence[float],
    sigma_e: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    *,
    num_classes: int,
    selector_n0: int | None = None,
    selector_n: int | None = None,
    generator: torch.Generator | None = None,
    selector_generator: torch.Generator | None = None,
    seed: int | None = None,
    indices: Sequence[int] | None = None,
    sampling: str = "fixed",
    max_radius_loss: float = 0.02,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> LevelSetCertificate:
    """CERTIFY ``G(x) = g_{S[g_e(x)]}(x)`` at every point of ``x`` over the set of levels the selector may pick.

    With probability at least 1 - alpha, for each point that is not abstained, G predicts ``prediction`` on the
    open l2 ball of radius ``radius`` (the rule and its proof: this module's docstring). Arguments as in
    ``certify_inductive``: ``classifier`` is one model used at every level or one expert per grid level; the
    selector's draws (``selector_n0`` / ``selector_n``, default n0 / n, always a fixed size) come from
    ``selector_generator`` or its own per-point streams, the classifier's from ``generator`` or the per-point
    streams of ``seed`` and ``indices``; ``sampling="adaptive"`` sizes each level's CERTIFY per point."""
    x, single = check_call(x, grid, num_classes, levels_name="grid")
    levels = [float(s) for s in grid]
    _check_settings(alpha, sigma_e, sampling, classifier, len(levels))
    experts = [classifier] * len(levels) if isinstance(classifier, nn.Module) else list(classifier)
    options = dict(batch_size=batch_size, autocast_dtype=autocast_dtype, channels_last=channels_last)
    s_n0, s_n = selector_n0 or n0, selector_n or n
    if indices is not None:
        indices = [int(i) for i in indices]
        seed = 0 if seed is None else int(seed)
    s_seed = selector_seed(seed) if indices is not None else None
    device = _device_of(selector)
    kw = dict(num_classes=len(levels), **options)
    pilot = sample_counts(selector, x, float(sigma_e), s_n0, **kw,
                          **_noise_source(x, selector_generator, s_seed, indices, "selection", s_n0, device))
    votes = sample_counts(selector, x, float(sigma_e), s_n, **kw,
                          **_noise_source(x, selector_generator, s_seed, indices, "estimation", s_n, device))
    top = pilot.argmax(dim=1).cpu().numpy()
    entry = entry_radii(top, votes.cpu().numpy(), s_n, alpha / 2, float(sigma_e))
    largest = np.array([max_certifiable_radius(n, alpha / 2, levels[t]) for t in top])
    in_u = (entry < largest[:, None])
    in_u[np.arange(len(top)), top] = True
    share = alpha / 2 / in_u.sum(axis=1)  # alpha / (2 |U|) for every level of U

    run = certify_runner(sampling, max_radius_loss)
    num_points = x.shape[0]
    samples = np.full(num_points, s_n0 + s_n, dtype=np.int64)
    radius = np.zeros(num_points)
    answer = np.full(num_points, ABSTAIN)
    own = np.zeros(num_points)
    counted = np.zeros(num_points, dtype=np.int64)
    done = np.zeros_like(in_u)

    def certify_levels(wanted: np.ndarray):
        """CERTIFY level ``wanted[i]`` at every point i with ``wanted[i] >= 0``: (points, classes, radii)."""
        points, classes, radii = [], [], []
        for k in np.unique(wanted[wanted >= 0]):
            for a in np.unique(share[wanted == k]):
                at = np.flatnonzero((wanted == k) & (share == a))
                noise = dict(seed=seed, indices=[indices[i] for i in at]) if indices is not None \
                    else dict(generator=generator)
                cert = run(experts[k], x[torch.as_tensor(at, device=x.device)], levels[k], n0=n0, n=n,
                           alpha=float(a), num_classes=num_classes, **noise, **options)
                samples[at] += _samples(cert, len(at), n0 + n).numpy()
                counted[at] += 1
                done[at, k] = True
                points.append(at)
                classes.append(cert.prediction.numpy())
                radii.append(cert.radius.numpy())
        if not points:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
        return np.concatenate(points), np.concatenate(classes), np.concatenate(radii)

    at, classes, radii = certify_levels(top)
    answer[at], own[at] = classes, radii
    radius[at] = np.where(classes != ABSTAIN, radii, 0.0)
    while True:  # one more level per point and round: the next one to enter, while it can still bind
        waiting = np.where(in_u & ~done & (entry < radius[:, None]), entry, np.inf)
        wanted = np.where(np.isfinite(waiting).any(axis=1), waiting.argmin(axis=1), -1)
        if not (wanted >= 0).any():
            break
        at, classes, radii = certify_levels(wanted)
        agrees = (classes == answer[at]) & (classes != ABSTAIN)
        bound = np.maximum(entry[at, wanted[at]], np.where(agrees, radii, 0.0))
        radius[at] = np.minimum(radius[at], bound)
    certified = radius > 0
    others = np.where(np.arange(len(levels))[None, :] == top[:, None], np.inf, entry)
    cert = LevelSetCertificate(
        level=torch.as_tensor(top, dtype=torch.long),
        sigma=torch.tensor([levels[t] for t in top], dtype=torch.float32),
        entry=torch.as_tensor(entry, dtype=torch.float64),
        radius_selector=torch.as_tensor(others.min(axis=1), dtype=torch.float64),
        prediction=torch.as_tensor(np.where(certified, answer, ABSTAIN), dtype=torch.long),
        radius_classifier=torch.as_tensor(own, dtype=torch.float64),
        radius=torch.as_tensor(np.where(certified, radius, 0.0), dtype=torch.float64),
        certified_levels=torch.as_tensor(counted, dtype=torch.long),
        samples=torch.as_tensor(samples, dtype=torch.long))
    return first_of(cert) if single else cert


# Rows of the level-set certificate: the inductive columns, then how many levels were certified for the point.
LEVEL_SET_COLUMNS = (*INDUCTIVE_COLUMNS, "certified_levels")


# ``certify_level_set`` on every point of a test set, one flushed row per point (as the inductive certificate).
certify_points_level_set = functools.partial(certify_points_inductive, certificate=certify_level_set)
