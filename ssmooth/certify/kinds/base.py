"""What a certificate kind is: its name, whether it is sound, where its radius holds, and its summary entry.

A kind names its rows' columns and turns rows into a summary entry (certified accuracy at the report radii, ACR,
abstain rate) that carries ``kind``, ``sound`` and ``setting``:
- ``constant``: Cohen's certificate at one noise level; holds for ANY INPUT.
- ``constant_best``: the constant certificate at the single grid level with the highest ACR on the evaluated
  points. Each level's certificate is sound; picking the level with the labels favours this baseline, which is
  the point: a per-sample method has to beat the best single level, not just the training level.
- ``samplewise_raw``: each point at its own level, before allocation. NOT a certificate (balls of different
  levels may overlap): an upper bound, reported so that the price of soundness is visible.
- ``samplewise_<rule>`` (fill, halving, lp): the transductive certificate; holds for THIS TEST SET, i.e. for the
  classifier defined from the whole (unlabelled) set of evaluated points.
- ``inductive``: a smoothed level selector chooses the level; holds for ANY INPUT, no memory of other inputs.
- ``routed``: the same selector routes each input to the expert model of its level; holds for ANY INPUT.
- ``inductive_set`` / ``routed_set``: the same deployed classifiers, certified over every level the selector may
  pick within the radius (each must give the same class out to its own entry distance); holds for ANY INPUT.
- ``cascade``: the levels from the largest down, answering at the first confident one; holds for ANY INPUT.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ssmooth.certify.cascade import CASCADE_COLUMNS
from ssmooth.certify.inductive import INDUCTIVE_COLUMNS
from ssmooth.certify.levelset import LEVEL_SET_COLUMNS
from ssmooth.certify.results import ROW_COLUMNS, SAMPLEWISE_COLUMNS
from ssmooth.report.metrics import summarize_rows

ANY_INPUT = "any input"
THIS_TEST_SET = "this test set"
NOT_A_CERTIFICATE = "none: an upper bound"
ALLOCATION_RULES = ("fill", "halving", "lp")


@dataclass(frozen=True)
class CertificateKind:
    name: str
    sound: bool
    setting: str  # where the radius holds: ANY_INPUT, THIS_TEST_SET, or NOT_A_CERTIFICATE
    description: str
    columns: tuple[str, ...] = ROW_COLUMNS

    def entry(self, rows, radii, **details) -> dict:
        """The summary entry of ``rows`` (a DataFrame with at least radius, correct, predict): certified accuracy
        at ``radii``, ``acr``, ``abstain_rate``, ``num_points``, this kind's flags, then ``details``."""
        missing = [c for c in ("radius", "correct", "predict") if c not in rows]
        if missing:
            raise ValueError(f"{self.name} rows lack column(s) {missing}")
        return {**summarize_rows(rows, radii), "kind": self.name, "sound": self.sound, "setting": self.setting,
                **details}


CONSTANT = CertificateKind("constant", True, ANY_INPUT, "Cohen's certificate at one noise level")
# Said wherever the best single level is shown: each row is a real certificate, but the level was picked
# knowing the evaluated points and their labels, which flatters this baseline.
CHOSEN_ON_EVALUATED = "level chosen on the evaluated points with their labels"
CONSTANT_BEST = CertificateKind(
    "constant_best", True, ANY_INPUT,
    f"Cohen's certificate at the grid level with the highest ACR on these points ({CHOSEN_ON_EVALUATED})")
SAMPLEWISE_RAW = CertificateKind(
    "samplewise_raw", False, NOT_A_CERTIFICATE, "per-point levels before allocation: an upper bound",
    SAMPLEWISE_COLUMNS)
INDUCTIVE = CertificateKind(
    "inductive", True, ANY_INPUT, "smoothed level selector (alpha/2) + classifier at the chosen level (alpha/2)",
    INDUCTIVE_COLUMNS)
ROUTED = CertificateKind(
    "routed", True, ANY_INPUT, "smoothed level selector (alpha/2) + the expert of the chosen level (alpha/2)",
    INDUCTIVE_COLUMNS)
INDUCTIVE_SET = CertificateKind(
    "inductive_set", True, ANY_INPUT,
    "smoothed level selector (alpha/2) + the classifier at every level it may pick within the radius (alpha/2)",
    LEVEL_SET_COLUMNS)
ROUTED_SET = CertificateKind(
    "routed_set", True, ANY_INPUT,
    "smoothed level selector (alpha/2) + the expert of every level it may pick within the radius (alpha/2)",
    LEVEL_SET_COLUMNS)
CASCADE = CertificateKind(
    "cascade", True, ANY_INPUT, "levels from the largest down, answer at the first confident one (alpha/K each)",
    CASCADE_COLUMNS)


def transductive(rule: str) -> CertificateKind:
    """The transductive certificate with allocation ``rule``."""
    if rule not in ALLOCATION_RULES:
        raise ValueError(f"allocation rule {rule!r} must be one of {ALLOCATION_RULES}")
    return CertificateKind(f"samplewise_{rule}", True, THIS_TEST_SET,
                           f"per-point levels, radii allocated by the {rule} rule over the evaluated points",
                           SAMPLEWISE_COLUMNS)


KINDS = {k.name: k for k in (CONSTANT, CONSTANT_BEST, SAMPLEWISE_RAW, INDUCTIVE, ROUTED, INDUCTIVE_SET, ROUTED_SET,
                             CASCADE, *(transductive(rule) for rule in ALLOCATION_RULES))}


def kind(name: str) -> CertificateKind:
    if name not in KINDS:
        raise ValueError(f"unknown certificate kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def best_constant(rows_by_sigma: Mapping[float, object], radii) -> dict:
    """The ``constant_best`` entry from constant-certificate rows at each grid level (same points in each).

    The level with the highest ACR wins; a tie goes to the smaller level. The entry records the level
    (``sigma``) and every level's ACR (``acr_by_sigma``)."""
    if not rows_by_sigma:
        raise ValueError("best_constant needs the rows of at least one level")
    rows_by_sigma = {float(s): rows for s, rows in rows_by_sigma.items()}
    indices = {s: sorted(int(i) for i in rows["idx"]) for s, rows in rows_by_sigma.items()}
    first = next(iter(indices.values()))
    if any(idx != first for idx in indices.values()):
        raise ValueError("the constant certificates of the grid levels cover different points")
    acr = {s: CONSTANT.entry(rows, radii)["acr"] for s, rows in rows_by_sigma.items()}
    sigma = min(acr, key=lambda s: (-acr[s], s))
    return CONSTANT_BEST.entry(rows_by_sigma[sigma], radii, sigma=sigma, note=CHOSEN_ON_EVALUATED,
                               acr_by_sigma={f"{s:g}": acr[s] for s in sorted(acr)})


def cascade_details(rows, levels) -> dict:
    """What to report beside the cascade: where the points were answered, and how often the abstention term of
    the higher levels sets the radius."""
    predict = np.asarray(rows["predict"])
    certified = predict != -1
    stage = np.asarray(rows["stage"])
    capped = certified & (np.asarray(rows["radius_abstention"], float) < np.asarray(rows["radius_level"], float))
    return {
        "levels": sorted((float(s) for s in levels), reverse=True),
        "answered_at": {f"{s:g}": int((stage == k).sum())
                        for k, s in enumerate(sorted((float(s) for s in levels), reverse=True))},
        "abstention_limits_share": float(capped.mean()) if len(predict) else None,
    }


def inductive_details(rows, grid) -> dict:
    """What to report beside the inductive certificate: how often the selector sets the radius (R_s < R_c, as a
    share of all points and of the certified ones), the levels it chose, and the mean R_s and R_c where both
    parts certified."""
    predict = np.asarray(rows["predict"])
    certified = predict != -1
    r_s, r_c = np.asarray(rows["radius_selector"], float), np.asarray(rows["radius_classifier"], float)
    limits = certified & (r_s < r_c)
    level = np.asarray(rows["level"])
    chosen = level[level >= 0]
    return {
        "grid": [float(s) for s in grid],
        "selector_limits_share": float(limits.mean()) if len(predict) else None,
        "selector_limits_share_of_certified": float(limits[certified].mean()) if certified.any() else None,
        "selector_abstain_rate": float((level < 0).mean()) if len(level) else None,
        "level_histogram": {f"{float(grid[k]):g}": int((chosen == k).sum()) for k in range(len(grid))},
        "mean_radius_selector": float(r_s[certified].mean()) if certified.any() else None,
        "mean_radius_classifier": float(r_c[certified].mean()) if certified.any() else None,
        # the level-set certificates: how many levels each point needed certified (cost and doubt in one number)
        **({"mean_certified_levels": float(np.asarray(rows["certified_levels"], float).mean())}
           if "certified_levels" in rows and len(predict) else {}),
    }
