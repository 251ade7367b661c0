"""A sample-wise certificate that holds for any input, with no memory of other inputs (inductive).

The deployed classifier picks its noise level with a smoothed level selector: ``h_e`` maps an image to an index
into the grid ``S``, and ``g_e(x) = argmax_k P(h_e(x + sigma_e * eps) = k)``; then it answers with the smoothed
classifier at that level, ``G(x) = g_{S[g_e(x)]}(x)``.
- CERTIFY on ``g_e`` (classes are grid indices) at alpha / 2 gives a level k and a radius ``R_s`` within which
  the level does not change;
- CERTIFY on the classifier at ``S[k]`` at alpha / 2 gives ``(c, R_c)``;
- inside the ball of radius ``min(R_s, R_c)`` the level is ``S[k]`` and ``g_{S[k]}`` says c, so G says c there.
Both hold together with probability at least 1 - alpha (union bound: no independence between them is needed).
The selector's noise and the classifier's noise come from different streams (per point: the selector's under a
seed of its own; or two generators), so neither bound reuses the other's draws.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssmooth.certify.adaptive import certify_adaptive
from ssmooth.certify.checks import check_call, check_levels, first_of
from ssmooth.certify.core import ABSTAIN, certify, predict
from ssmooth.certify.run import certify_in_groups
from ssmooth.certify.streams import point_seed


def selector_seed(seed: int) -> int:
    """The run seed of the selector's per-point streams: derived from the run seed, so that the selector's draws
    are never the classifier's (whose streams use the run seed itself)."""
    return point_seed(seed, -1, "selector")


@dataclass(frozen=True)
class InductiveCertificate:
    """Per-point result of ``certify_inductive``; every field is a CPU tensor [B].

    ``level`` is the grid index chosen by the smoothed selector (ABSTAIN where it abstains) and ``sigma`` the
    level itself (0 there); ``radius_selector`` / ``radius_classifier`` are R_s / R_c (0 where that part
    abstains or was not run); ``radius = min(R_s, R_c)``, and ``prediction`` is ABSTAIN with radius 0 when either
    part abstains.
    """

    level: torch.Tensor  # long
    sigma: torch.Tensor  # float
    radius_selector: torch.Tensor  # float, R_s
    prediction: torch.Tensor  # long, c
    radius_classifier: torch.Tensor  # float, R_c
    radius: torch.Tensor  # float, min(R_s, R_c)
    samples: torch.Tensor | None = None  # long, forward passes per point: the selector's and the classifier's

    @property
    def selector_limits(self) -> torch.Tensor:
        """bool [B]: certified points whose radius is set by the selector (R_s < R_c)."""
        return (self.prediction != ABSTAIN) & (self.radius_selector < self.radius_classifier)


def certify_inductive(
    classifier: nn.Module,
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
) -> InductiveCertificate:
    """CERTIFY the deployed classifier ``G(x) = g_{S[g_e(x)]}(x)`` at every point of ``x`` ([B, *shape]).

    With probability at least 1 - alpha, for each point that is not abstained, G predicts ``prediction`` on the
    whole open l2 ball of radius ``radius`` around it: the selector's certificate (alpha / 2, ``selector_n0`` /
    ``selector_n`` samples, default n0 / n) keeps the level fixed on the ball, the classifier's (alpha / 2, n0 / n
    samples at that level) keeps the class. ``selector`` maps [k, *shape] to logits over the ``len(grid)`` levels.
    ``generator`` draws the classifier's noise and ``selector_generator`` the selector's; pass two different
    generators (the same object, or None for both, would still be sound but couples the two parts' draws).
    With ``indices`` (dataset indices) and ``seed``, every draw comes from per-point streams instead (the
    selector's under ``selector_seed(seed)``), so a point's result does not depend on the other points of the
    call. ``sampling="adaptive"`` sizes each CERTIFY per point (``certify_adaptive``, within ``max_radius_loss``).
    The classifier is run only on the points whose level was certified. ``classifier`` is one model used at
    every level, or a sequence of experts, one per grid level: expert k certifies at ``grid[k]`` the points
    routed to level k (expert routing; the same certificate, as each expert is just the classifier at its level).
    Inputs (one image [C, H, W] too) and refusals as in ``certify``.

    Long for its argument list and this statement of the guarantee; the body is the two CERTIFY calls and their
    union bound, which read best together."""
    x, single = check_call(x, grid, num_classes, levels_name="grid")
    levels = torch.tensor([float(s) for s in grid], dtype=torch.float32)
    _check_settings(alpha, sigma_e, sampling, classifier, len(levels))
    options = dict(batch_size=batch_size, autocast_dtype=autocast_dtype, channels_last=channels_last)
    run = certify_runner(sampling, max_radius_loss)
    if indices is not None:
        indices = [int(i) for i in indices]
        seed = 0 if seed is None else int(seed)
        selector_noise = dict(seed=selector_seed(seed), indices=indices)
    else:
        selector_noise = dict(generator=selector_generator)
    chosen = run(selector, x, float(sigma_e), n0=selector_n0 or n0, n=selector_n or n, alpha=alpha / 2,
                 num_classes=len(levels), **selector_noise, **options)
    num_points = x.shape[0]
    prediction = torch.full((num_points,), ABSTAIN, dtype=torch.long)
    radius_classifier = torch.zeros(num_points, dtype=torch.float64)
    sigma = torch.zeros(num_points)
    samples = _samples(chosen, num_points, (selector_n0 or n0) + (selector_n or n))
    ok = chosen.prediction != ABSTAIN
    if bool(ok.any()):
        sigma[ok] = levels[chosen.prediction[ok]]
        for model, at in _routes(classifier, chosen.prediction, ok):
            noise = dict(seed=seed, indices=[i for i, keep in zip(indices, at.tolist()) if keep]) \
                if indices is not None else dict(generator=generator)
            cert = run(model, x[at.to(x.device)], sigma[at], n0=n0, n=n, alpha=alpha / 2,
                       num_classes=num_classes, **noise, **options)
            prediction[at] = cert.prediction
            radius_classifier[at] = cert.radius
            samples[at] += _samples(cert, int(at.sum()), n0 + n)
    radius_selector = chosen.radius.to(torch.float64)
    radius = torch.where(prediction != ABSTAIN, torch.minimum(radius_selector, radius_classifier), 0.0)
    cert = InductiveCertificate(level=chosen.prediction, sigma=sigma, radius_selector=radius_selector,
                                prediction=prediction, radius_classifier=radius_classifier, radius=radius,
                                samples=samples)
    return first_of(cert) if single else cert


def _check_settings(alpha: float, sigma_e: float, sampling: str, classifier, num_levels: int) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_levels(sigma_e, "sigma_e")
    if sampling not in ("fixed", "adaptive"):
        raise ValueError(f"sampling must be 'fixed' or 'adaptive', got {sampling!r}")
    if not isinstance(classifier, nn.Module) and len(classifier) != num_levels:
        raise ValueError(f"classifier: {len(classifier)} experts for a grid of {num_levels} levels (one per level)")


def certify_runner(sampling: str, max_radius_loss: float):
    """CERTIFY with n samples per point (``fixed``), or with a per-point size (``adaptive``)."""
    return certify if sampling == "fixed" else functools.partial(certify_adaptive, max_radius_loss=max_radius_loss)


def _routes(classifier, level: torch.Tensor, ok: torch.Tensor):
    """(model, bool mask of the points it certifies): one model for every chosen level, or with one expert per
    grid level (routing), each expert for the points whose chosen level is its own."""
    if isinstance(classifier, nn.Module):
        return [(classifier, ok)]
    experts = list(classifier)
    routes = [(expert, ok & (level == k)) for k, expert in enumerate(experts)]
    return [(expert, at) for expert, at in routes if bool(at.any())]


def _samples(cert, num_points: int, fixed: int) -> torch.Tensor:
    """Forward passes per point of one CERTIFY call: its own count (adaptive sampling), else n0 + n."""
    if cert.samples is not None:
        return cert.samples.to(torch.long).clone()
    return torch.full((num_points,), fixed, dtype=torch.long)


def predict_inductive(
    classifier: nn.Module,
    selector: nn.Module,
    x: torch.Tensor,
    grid: Sequence[float],
    sigma_e: float,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    *,
    num_classes: int,
    selector_n: int | None = None,
    generator: torch.Generator | None = None,
    selector_generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PREDICT with the deployed classifier: ``(labels, levels)``, both long [B] with ABSTAIN where it abstains.

    PREDICT on the smoothed selector (alpha / 2) chooses a grid index, then PREDICT on the classifier at that
    level (alpha / 2). With probability at least 1 - alpha a non-abstained label is G's answer at x. Each input is
    handled on its own: nothing about other inputs is stored or used.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x, single = check_call(x, grid, num_classes, levels_name="grid")
    check_levels(sigma_e, "sigma_e")
    levels = torch.tensor([float(s) for s in grid], dtype=torch.float32)
    options = dict(batch_size=batch_size, autocast_dtype=autocast_dtype, channels_last=channels_last)
    level = predict(selector, x, float(sigma_e), n=selector_n or n, alpha=alpha / 2, num_classes=len(levels),
                    generator=selector_generator, **options)
    labels = torch.full((x.shape[0],), ABSTAIN, dtype=torch.long)
    ok = level != ABSTAIN
    if bool(ok.any()):
        labels[ok] = predict(classifier, x[ok.to(x.device)], levels[level[ok]], n=n, alpha=alpha / 2,
                             num_classes=num_classes, generator=generator, **options)
    return (labels[0], level[0]) if single else (labels, level)


# Rows of the inductive certificate: the usual columns, then the chosen grid index and both radii.
INDUCTIVE_COLUMNS = ("idx", "label", "predict", "radius", "correct", "sigma", "time", "samples",
                     "level", "radius_selector", "radius_classifier")


def certify_points_inductive(
    classifier: nn.Module,
    points: Sequence,
    writer,
    *,
    selector: nn.Module,
    grid: Sequence[float],
    sigma_e: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    num_classes: int,
    points_per_group: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    sampling: str = "fixed",
    max_radius_loss: float = 0.02,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress=None,
    certificate=certify_inductive,
) -> None:
    """``certify_inductive`` (or ``certificate``, a function with its arguments, such as the level-set one) on
    every item ``(x, y, index)`` of ``points`` that ``writer`` (a RowWriter with INDUCTIVE_COLUMNS, and
    ``certified_levels`` for the level-set certificate) has not written yet, one flushed row per point; groups
    share forward batches as in ``ssmooth.certify.run.certify_points``. Every point draws from its own streams
    (keyed by ``seed`` and its dataset index), so its row is the same whichever group, rank or shard certifies it,
    resumed or not."""
    def certify_group(x: torch.Tensor, indices: list[int]):
        cert = certificate(
            classifier, selector, x, grid, sigma_e, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
            num_classes=num_classes, autocast_dtype=autocast_dtype, channels_last=channels_last, seed=seed,
            indices=indices, sampling=sampling, max_radius_loss=max_radius_loss)
        extra = {"level": [int(v) for v in cert.level], "radius_selector": [float(r) for r in cert.radius_selector],
                 "radius_classifier": [float(r) for r in cert.radius_classifier]}
        if hasattr(cert, "certified_levels"):
            extra["certified_levels"] = [int(v) for v in cert.certified_levels]
        return cert.prediction, cert.radius, cert.sigma, cert.samples, extra

    certify_in_groups(points, writer, certify_group, points_per_group=points_per_group, device=device,
                      progress=progress)
