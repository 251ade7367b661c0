"""CERTIFY with a sample size chosen per point (adaptive sampling): fewer forward passes, same guarantee.

Rule. For each point:
  1. draw n0 pilot samples; their top class is cA (exactly CERTIFY's selection step);
  2. from the pilot alone, choose n_i from a FIXED menu of sizes (default n, n/sqrt(2), n/2, ..., n/256): the
     smallest size whose planned radius is within ``max_radius_loss`` (l2 units, the units of the radius) of the
     radius n samples would give, for every pA in a ``pilot_confidence`` interval around the pilot's estimate;
  3. draw n_i FRESH samples, count nA = votes for cA, and bound pA with Clopper-Pearson at the full alpha.

Why each certificate is still wrong with probability at most alpha. Steps 1-2 make (cA, n_i) a function of the
pilot draws only; the n_i estimation draws of step 3 are independent of them. Conditionally on any pilot
outcome, nA is therefore Binomial(n_i, pA) with n_i and cA fixed numbers, and the one-sided Clopper-Pearson
bound at level alpha exceeds pA with probability at most alpha. Averaging that conditional statement over the
pilot outcomes gives the same bound unconditionally, and Cohen's theorem turns a bound pA_lower <= pA into the
radius. What would break it: looking at the estimation draws to decide how many to take (for example
recomputing the bound after every batch at the full alpha and stopping when it looks good) -- never done here.
The menu only shapes cost and tightness; no choice of it can make a certificate unsound.

Planned radius. For a size s and a probability p the rule plans with ``sigma * Phi^-1(CP(p * s, s, alpha))``, the
Clopper-Pearson bound at the count expected from s draws (0 when it is below 1/2). It takes the largest loss
over a grid on the two-sided Clopper-Pearson interval of the pilot, so a pilot that happens to look worse than
the point is does not cut its samples: a point whose pilot votes all agree keeps all n samples (its radius is
capped by n itself), and a point whose whole interval lies below 1/2 -- one that will abstain -- takes the
smallest size.

Points share forward batches whatever their sizes: one ``sample_counts`` call draws every point's n_i.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import beta
from torch import nn

from ssmooth.certify.checks import check_call, first_of
from ssmooth.certify.core import ABSTAIN, Certificate, _as_sigma, _device_of, _noise_source, sample_counts
from ssmooth.certify.stats import lower_confidence_bound, radius_from_pA

DEFAULT_HALVINGS = 8
PILOT_GRID = 33  # points on the pilot interval where the radius loss is checked


def default_sizes(n: int, halvings: int = DEFAULT_HALVINGS) -> tuple[int, ...]:
    """The menu n, n/sqrt(2), n/2, ..., n / 2**halvings (rounded up, at least 1), smallest first.

    Steps of sqrt(2) rather than 2: a point whose votes all agree loses 0.10 sigma of radius at n/sqrt(2) but 0.21
    sigma at n/2 (n = 10,000, alpha = 0.001), so a moderate budget can still trim those points, which often
    dominate the cost.
    """
    return tuple(sorted({max(1, math.ceil(n / 2 ** (k / 2))) for k in range(2 * halvings + 1)}))


def planned_radius(p, size, alpha: float, sigma) -> np.ndarray:
    """Radius CERTIFY would give from ``size`` draws if the count were its expected value ``p * size``."""
    p, size = np.asarray(p, dtype=np.float64), np.asarray(size, dtype=np.float64)
    count = p * size
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = np.where(count > 0, beta.ppf(alpha, np.maximum(count, 1e-300), size - count + 1), 0.0)
    return np.where(bound >= 0.5, radius_from_pA(np.clip(bound, 0.5, 1.0), sigma), 0.0)


def pilot_interval(kA, n0: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson interval for pA from kA of n0 pilot votes."""
    kA = np.asarray(kA, dtype=np.float64)
    tail = (1.0 - confidence) / 2
    with np.errstate(invalid="ignore"):
        low = np.where(kA > 0, beta.ppf(tail, np.maximum(kA, 1e-300), n0 - kA + 1), 0.0)
        high = np.where(kA < n0, beta.ppf(1 - tail, kA + 1, np.maximum(n0 - kA, 1e-300)), 1.0)
    return low, high


def choose_sample_sizes(
    kA,
    n0: int,
    sigma,
    sizes,
    alpha: float,
    max_radius_loss: float,
    pilot_confidence: float = 0.95,
) -> np.ndarray:
    """n_i per point: the smallest size of ``sizes`` whose planned radius is within ``max_radius_loss`` of the
    planned radius at ``max(sizes)``, for every pA in the pilot's ``pilot_confidence`` interval.

    Uses nothing but the pilot votes ``kA`` (of ``n0``), which is what keeps the final bound valid.
    """
    kA = np.atleast_1d(np.asarray(kA, dtype=np.float64))
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), kA.shape)
    # The pilot has at most n0 + 1 outcomes per level: plan once per distinct (kA, sigma), not once per point.
    pairs, inverse = np.unique(np.stack([kA, sigma], axis=1), axis=0, return_inverse=True)
    kA, sigma = pairs[:, 0], pairs[:, 1]
    menu = np.array(sorted(set(int(s) for s in sizes)), dtype=np.int64)
    low, high = pilot_interval(kA, n0, pilot_confidence)
    p = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, PILOT_GRID)[None, :]  # [B, G]
    full = planned_radius(p, menu[-1], alpha, sigma[:, None])
    chosen = np.full(kA.shape, menu[-1], dtype=np.int64)
    # Largest first, so each point ends with the smallest size that still meets the budget.
    for size in menu[::-1]:
        loss = (full - planned_radius(p, size, alpha, sigma[:, None])).max(axis=1)
        chosen = np.where(loss <= max_radius_loss + 1e-12, size, chosen)
    return chosen[inverse.reshape(-1)]


def certify_adaptive(
    model: nn.Module,
    x: torch.Tensor,
    sigma,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    max_radius_loss: float = 0.02,
    batch_size: int = 1000,
    *,
    num_classes: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    indices=None,
    sizes=None,
    pilot_confidence: float = 0.95,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Certificate:
    """CERTIFY every point of ``x`` ([B, *shape]) at its level ``sigma`` with its own number of samples n_i <= n.

    With probability at least 1 - alpha over the sampling, for each point that is not abstained, the smoothed
    classifier g_sigma predicts ``prediction`` everywhere in the open l2 ball of radius ``radius`` around it --
    the guarantee of ``certify``. The n0 selection draws also choose n_i from the menu ``sizes`` (default n,
    n/sqrt(2), n/2, ..., n/256), aiming at a radius at most ``max_radius_loss`` below what n would give; the
    bound uses n_i fresh draws only. ``Certificate.samples`` holds n0 + n_i, the forward passes each point cost.
    Noise as in ``certify``: per-point streams keyed by (``seed``, dataset index in ``indices``, purpose) when
    ``indices`` are given, else ``generator``; the pilot is the "selection" stream, the bound's draws the
    "estimation" stream, so a point's pilot is the one fixed-n CERTIFY would draw for it. Inputs (one image
    [C, H, W] too) and refusals as in ``certify``.

    Long for its arguments and guarantee; the pilot, the sizes and the bound read best in one place."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if not max_radius_loss >= 0:
        raise ValueError(f"max_radius_loss must be >= 0 (l2 units), got {max_radius_loss}")
    if not 0 < pilot_confidence < 1:
        raise ValueError(f"pilot_confidence must be in (0, 1), got {pilot_confidence}")
    menu = default_sizes(n) if sizes is None else tuple(sorted({int(s) for s in sizes} | {n}))
    if menu[0] < 1 or menu[-1] > n:
        raise ValueError(f"sample sizes must lie in [1, n={n}], got {sorted(sizes)}")
    x, single = check_call(x, sigma, num_classes)
    device = _device_of(model)
    sigma_t = _as_sigma(sigma, x.shape[0], device)
    kw = dict(batch_size=batch_size, num_classes=num_classes, autocast_dtype=autocast_dtype,
              channels_last=channels_last)

    pilot = sample_counts(model, x, sigma_t, n0, **kw,
                          **_noise_source(x, generator, seed, indices, "selection", n0, device)).cpu()
    cA = pilot.argmax(dim=1)
    kA = pilot.gather(1, cA[:, None]).squeeze(1).numpy()
    sigma_np = sigma_t.double().cpu().numpy()  # the float32 level the noise is drawn at, exactly
    n_i = choose_sample_sizes(kA, n0, sigma_np, menu, alpha, max_radius_loss, pilot_confidence)

    # Fresh draws, taken after the pilot and decided by it alone; one call for all points whatever their sizes,
    # so copies of several points share forward batches.
    sizes_list = [int(s) for s in n_i]
    votes = sample_counts(model, x, sigma_t, sizes_list, **kw,
                          **_noise_source(x, generator, seed, indices, "estimation", sizes_list, device)).cpu()
    nA = votes.gather(1, cA[:, None]).squeeze(1)
    cert = certificate_from_counts(cA, nA, n_i, n0, alpha, sigma_np)
    return first_of(cert) if single else cert


def certificate_from_counts(cA: torch.Tensor, nA: torch.Tensor, n_i, n0: int, alpha: float, sigma) -> Certificate:
    """CERTIFY's last step per point: Clopper-Pearson at alpha on nA of n_i estimation draws, abstain below 1/2."""
    n_i = np.asarray(n_i, dtype=np.int64)
    pA_lower = lower_confidence_bound(nA.numpy(), n_i, alpha)
    certified = pA_lower >= 0.5
    radius = np.where(certified, radius_from_pA(np.clip(pA_lower, 0.5, 1.0), sigma), 0.0)
    return Certificate(
        prediction=torch.where(torch.from_numpy(certified), cA, torch.full_like(cA, ABSTAIN)),
        radius=torch.from_numpy(radius),
        pA_lower=torch.from_numpy(pA_lower),
        count=nA,
        samples=torch.from_numpy(n0 + n_i),
    )
