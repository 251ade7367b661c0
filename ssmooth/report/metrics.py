"""Certified accuracy, ACR and the standard radius grids: the statistics that certification itself needs.

Certified accuracy at radius r is the share of ALL evaluated points whose smoothed prediction is correct with
certified radius >= r; an abstain counts as wrong. ACR is the mean over all points of radius * [correct].

This is the only part of the report that ``ssmooth.certify`` imports: numpy and pandas, no torch, no plotting.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

ABSTAIN = -1  # same value as ssmooth.certify.ABSTAIN; importing ssmooth.certify would load torch
UNKNOWN_DATASET = "unknown dataset"


def _as_arrays(radius, correct) -> tuple[np.ndarray, np.ndarray]:
    radius = np.asarray(radius, dtype=float).reshape(-1)
    correct = np.asarray(correct).reshape(-1).astype(bool)
    if radius.shape != correct.shape:
        raise ValueError(f"radius and correct differ in length: {radius.size} != {correct.size}")
    return radius, correct


def certified_accuracy(radius, correct, radii) -> np.ndarray:
    """Fraction of ALL points with ``correct`` and ``radius >= r``, for each r in ``radii``.

    A radius exactly equal to r counts as certified at r. Abstained points must carry ``correct = False``
    (``summarize_rows`` enforces it from ``predict``). No points gives zeros.
    """
    radius, correct = _as_arrays(radius, correct)
    radii = np.asarray(radii, dtype=float).reshape(-1)
    if radius.size == 0:
        return np.zeros(radii.shape)
    certified = np.sort(radius[correct])
    at_least_r = certified.size - np.searchsorted(certified, radii, side="left")
    return at_least_r / radius.size


def average_certified_radius(radius, correct) -> float:
    """Mean over all points of ``radius * correct`` (wrong and abstained points count 0). No points gives 0."""
    radius, correct = _as_arrays(radius, correct)
    return float(np.where(correct, radius, 0.0).mean()) if radius.size else 0.0


def certified_accuracy_curve(radius, correct) -> tuple[np.ndarray, np.ndarray]:
    """The whole curve r -> certified accuracy, exactly: breakpoints ``x`` (0, then every distinct positive
    certified radius, increasing) and ``y = certified_accuracy(radius, correct, x)``.

    The curve is a decreasing step function, continuous from the LEFT (``radius >= r``): it equals ``y[i]`` on
    ``(x[i-1], x[i]]`` and 0 beyond ``x[-1]``; draw it with ``step(..., where="pre")``.
    """
    radius, correct = _as_arrays(radius, correct)
    positive = radius[correct & (radius > 0)]
    x = np.concatenate([[0.0], np.unique(positive)])
    return x, certified_accuracy(radius, correct, x)


def summarize_rows(df_or_arrays, radii) -> dict:
    """Certified accuracy at ``radii`` (list), ``acr``, ``abstain_rate`` and ``num_points`` of certification rows.

    Takes a DataFrame (or mapping of arrays) with columns ``radius``, ``correct`` and ``predict``, or a tuple
    ``(radius, correct[, predict])``. Where ``predict`` is given, an abstain counts as wrong whatever its
    ``correct`` says; without it ``abstain_rate`` is None.
    """
    if isinstance(df_or_arrays, (pd.DataFrame, Mapping)):
        radius, correct = df_or_arrays["radius"], df_or_arrays["correct"]
        predict = df_or_arrays["predict"] if "predict" in df_or_arrays else None
    else:
        radius, correct, predict = (tuple(df_or_arrays) + (None,))[:3]
    radius, correct = _as_arrays(radius, correct)
    abstain_rate = None
    if predict is not None:
        abstained = np.asarray(predict).reshape(-1) == ABSTAIN
        correct = correct & ~abstained
        abstain_rate = float(abstained.mean()) if abstained.size else 0.0
    return {
        "certified_accuracy": certified_accuracy(radius, correct, radii).tolist(),
        "acr": average_certified_radius(radius, correct),
        "abstain_rate": abstain_rate,
        "num_points": int(radius.size),
    }

_GRIDS = {"cifar10": (2.25, 0.25), "mnist": (4.0, 0.5), "imagenet": (3.0, 0.5)}


def dataset_key(dataset) -> str:
    """"CIFAR-10", "cifar10" and "Cifar_10" are one dataset; None or "" is the unknown dataset."""
    key = re.sub(r"[^a-z0-9]", "", str(dataset or "").lower())
    return key or UNKNOWN_DATASET


def standard_radii(dataset: str) -> list[float]:
    """The radii every table reports for a dataset.

    cifar10: 0 to 2.25 by 0.25 (Cohen et al.'s CIFAR-10 table); mnist: 0 to 4 by 0.5; imagenet: 0 to 3 by 0.5
    (Cohen et al.'s ImageNet table); anything else (e.g. digits, 8x8 images whose pixel vectors have norm at
    most 8): 0 to 2 by 0.25, which covers the 3.81 sigma that n = 100000 samples can certify for sigma <= 0.5.
    """
    stop, step = _GRIDS.get(dataset_key(dataset), (2.0, 0.25))
    # Multiples of the step, rounded, so that 0.75 is exactly 0.75 and "radius >= r" is not off by one ulp.
    return [round(i * step, 10) for i in range(int(round(stop / step)) + 1)]


def radius_grid(datasets) -> list[float]:
    """The union of the standard grids of ``datasets``, increasing: the same whatever their order."""
    keys = {dataset_key(d) for d in datasets} or {UNKNOWN_DATASET}
    return sorted({r for key in keys for r in standard_radii(key)})


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """Rows of a certification TSV, one per dataset index (first kept: a DistributedSampler pads with
    duplicates), sorted by index. Mirrors ``ssmooth.certify.results.read_rows`` without loading torch."""
    frame = pd.read_csv(path, sep="\t")
    return frame.drop_duplicates("idx", keep="first").sort_values("idx").reset_index(drop=True)


def paired_difference(rows, baseline) -> dict:
    """The difference of per-point certified radii (``radius`` where correct, else 0: the terms of ACR) between
    two certificates on the points both certified, matched by ``idx``: ``mean`` (ACR difference on those
    points), ``se`` (its standard error, the sample standard deviation of the differences over sqrt(n); None
    for fewer than two points), ``num_points``, and how many points got a larger (``better``) or smaller
    (``worse``) radius than under ``baseline``.

    Each argument is a DataFrame (or mapping of arrays) with columns ``idx``, ``radius``, ``correct`` and
    optionally ``predict`` (an abstain counts 0). Raises ValueError when they share no point.
    """
    mine, theirs = certified_radii(rows), certified_radii(baseline)
    shared = mine.index.intersection(theirs.index)
    if shared.empty:
        raise ValueError("the two certificates share no evaluated point (idx)")
    difference = (mine.loc[shared] - theirs.loc[shared]).to_numpy(np.float64)
    n = difference.size
    return {
        "mean": float(difference.mean()),
        "se": float(difference.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "num_points": int(n),
        "better": int((difference > 0).sum()),
        "worse": int((difference < 0).sum()),
    }


def certified_radii(rows) -> pd.Series:
    """Per point (indexed by ``idx``, first row of a repeated index): the radius where correct, else 0 (an
    abstain, where ``predict`` is given, counts 0): the terms of ACR."""
    radius, correct = _as_arrays(rows["radius"], rows["correct"])
    if "predict" in rows:
        correct = correct & (np.asarray(rows["predict"]).reshape(-1) != ABSTAIN)
    series = pd.Series(np.where(correct, radius, 0.0), index=np.asarray(rows["idx"]).reshape(-1))
    return series[~series.index.duplicated(keep="first")]
