"""What each source certifies: its certificate variants as curves (label, soundness, value at any radius), the
sources grouped by dataset, and the envelope (the best sound certificate at each radius).

Values come from the per-point rows wherever a rows file reproduces its summary, so any radius can be asked for;
otherwise from the summary's own grid (a radius off that grid is left blank, never interpolated). Points are
compared only within one dataset.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ssmooth.report.metrics import (
    ABSTAIN,
    UNKNOWN_DATASET,
    certified_accuracy,
    dataset_key,
    radius_grid,
    summarize_rows,
)
from ssmooth.report.sources import PUBLISHED, _cached_rows, read_log

# Where a certificate holds (the same words as ssmooth.certify.kinds, which loads torch): envelopes never mix them.
ANY_INPUT = "any input"
THIS_TEST_SET = "this test set"
SCOPES = (ANY_INPUT, THIS_TEST_SET)
UNSOUND_MARK = "(unsound upper bound)"
UNKNOWN_SOUNDNESS_MARK = "(soundness not recorded)"
_DISPLAY = {"cifar10": "CIFAR-10", "mnist": "MNIST", "imagenet": "ImageNet", "digits": "digits"}


def _name(summary: Mapping) -> str:
    return str(summary.get("name") or summary.get("path") or "run")


def _variants(summary: Mapping) -> list[tuple[str, dict]]:
    """(variant, results) pairs, headline variant first. A summary without ``variants`` is one variant."""
    variants = summary.get("variants")
    if not variants:
        if "certified_accuracy" not in summary:
            return []
        variants = {summary.get("sigma_policy", "main"): summary}
    main = summary.get("main")
    return sorted(variants.items(), key=lambda item: item[0] != main)  # stable: the rest keep their order


def _kind(variant_name: str, variant: Mapping) -> str:
    """The certificate kind: recorded, else read from the variant names that ``ssmooth.evaluate`` writes."""
    if variant.get("kind"):
        return str(variant["kind"])
    if variant_name == "constant":
        return "constant"
    if variant_name == "samplewise_raw":
        return "per-point levels, unallocated"
    if variant_name.startswith("samplewise_") or variant.get("allocation"):
        return "transductive"
    return ""


def _is_sound(variant: Mapping, variant_name: str = "") -> bool | None:
    """Recorded soundness; a constant-sigma certificate is sound by Cohen et al.'s theorem; else unknown."""
    sound = variant.get("sound")
    if sound is not None:
        return bool(sound)
    return True if _kind(variant_name, variant) == "constant" else None


_METHODS = {"gaussian": "Gaussian", "smoothadv": "SmoothAdv", "macer": "MACER", "consistency": "Consistency"}


def _scope(variant_name: str, variant: Mapping) -> str:
    """Where a sound certificate holds: as recorded, else this test set for a transductive one (its radii were
    allocated over the evaluated points together) and any input for the rest (Cohen's certificate, published
    logs, the inductive certificate)."""
    setting = variant.get("setting")
    if setting in SCOPES:
        return setting
    kind = _kind(variant_name, variant)
    return THIS_TEST_SET if kind == "transductive" or kind.startswith("samplewise_") else ANY_INPUT


def _method(summary: Mapping) -> str:
    if summary.get("source") == PUBLISHED:
        return ""  # the log does not say; the label the user gives does
    objective = str(summary.get("objective") or "")
    return _METHODS.get(objective.lower(), objective)


def _sigma(summary: Mapping, variant_name: str, variant: Mapping) -> str:
    """The noise level as text: one sigma, or the range of per-point levels."""
    sigma = variant.get("sigma", summary.get("sigma"))
    grid = variant.get("grid") or summary.get("grid")
    if "sigma" not in variant and _kind(variant_name, variant) != "constant" and grid:
        return f"{min(grid):g}-{max(grid):g} per point"
    return "" if sigma is None else f"{float(sigma):g}"


def _certificate(variant_name: str, variant: Mapping) -> str:
    """Kind, allocation rule and the inputs it holds for, e.g. "transductive (fill), this test set", and what a
    reader must know to weigh it (e.g. that the best single level was chosen on the evaluated points)."""
    text = _kind(variant_name, variant)
    if variant.get("allocation") and text == "transductive":
        text += f" ({variant['allocation']})"
    if variant.get("setting"):
        text += f", {variant['setting']}"
    caveat = _caveat(variant_name, variant)
    return f"{text}; {caveat}" if caveat else text


CHOSEN_ON_POINTS = "level chosen on the evaluated points"


def _caveat(variant_name: str, variant: Mapping) -> str | None:
    """The best single level is a real certificate at each level, but picking the level on the evaluated points
    with their labels favours it: say so wherever it appears (the summary's note when it says so itself)."""
    if "constant_best" not in (variant_name, variant.get("kind")):
        return None
    note = str(variant.get("note") or "")
    return note if "chosen on the evaluated points" in note else CHOSEN_ON_POINTS


def _label(summary: Mapping, variant_name: str, variant: Mapping) -> str:
    """Legend entry: job, then method, sigma and certificate kind."""
    if summary.get("source") == PUBLISHED:
        return f"{_name(summary)} (published log)"
    sigma = _sigma(summary, variant_name, variant)
    details = [d for d in (_method(summary), f"σ={sigma}" if sigma else "", _certificate(variant_name, variant)) if d]
    return f"{_name(summary)}: {', '.join(details)}" if details else _name(summary)


def _variant_rows(summary: Mapping, variant_name: str, variant: Mapping) -> pd.DataFrame | None:
    """Rows (columns idx, radius, correct) of a variant, if a rows file reproduces the summary's numbers.

    A run keeps a variant's rows in ``certify_<variant>.tsv`` (``certify_<rule>.tsv`` for ``samplewise_<rule>``),
    and its headline variant also in ``certify.tsv``; the column is ``radius`` (or ``radius_raw`` for radii
    before allocation). A half-written or unrelated file never draws a curve that disagrees with the table.
    """
    if summary.get("source") == PUBLISHED:
        rows = _cached_rows(Path(summary["rows_file"]), read_log)
        if rows is None:
            raise FileNotFoundError(f"{summary['rows_file']}: the published log is gone")
        correct = rows["correct"].to_numpy().astype(bool) & (rows["predict"].to_numpy() != ABSTAIN)
        return pd.DataFrame({"idx": rows["idx"], "radius": rows["radius"].astype(float), "correct": correct,
                             **({"samples": rows["samples"]} if "samples" in rows else {})})
    if "path" not in summary:
        return None
    run_dir = Path(summary["path"])
    short = variant_name.removeprefix("samplewise_")
    # a variant may name its file (e.g. the best single level's rows live in that level's file)
    names = dict.fromkeys(([variant["rows_file"]] if variant.get("rows_file") else [])
                          + [f"certify_{variant_name}.tsv", f"certify_{short}.tsv"]
                          + (["certify.tsv"] if variant_name == _variants(summary)[0][0] else []))
    candidates = [run_dir / n for n in names if (run_dir / n).is_file()]
    for path in candidates:
        rows = _cached_rows(path)
        if rows is None or not {"radius", "correct", "predict", "idx"} <= set(rows.columns):
            continue
        for column in ("radius", "radius_raw"):
            if column not in rows:
                continue
            got = summarize_rows((rows[column], rows["correct"], rows["predict"]), summary.get("radii", []))
            if got["num_points"] == variant.get("num_points") and np.allclose(
                got["certified_accuracy"], variant.get("certified_accuracy", []), rtol=0, atol=1e-9
            ):
                correct = rows["correct"].to_numpy().astype(bool) & (rows["predict"].to_numpy() != ABSTAIN)
                return pd.DataFrame({"idx": rows["idx"], "radius": rows[column].astype(float), "correct": correct,
                                     **({"samples": rows["samples"]} if "samples" in rows else {})})
    if candidates:
        warnings.warn(f"{_name(summary)} {variant_name}: no rows in {', '.join(map(str, candidates))} reproduce "
                      "summary.json; using the summary's grid instead", stacklevel=3)
    return None


def _grid_value(summary: Mapping, variant: Mapping, r: float) -> float | None:
    """The variant's certified accuracy at radius r if its summary has r on its grid, else None (no
    interpolation: a value between two grid radii is not known from the summary)."""
    radii, values = summary.get("radii", []), variant.get("certified_accuracy", [])
    if len(radii) != len(values):
        raise ValueError(f"{_name(summary)}: {len(values)} certified accuracies for {len(radii)} radii")
    for radius, value in zip(radii, values):
        if math.isclose(radius, r, rel_tol=1e-9, abs_tol=1e-9):
            return None if value is None else float(value)
    return None


class _Curve:
    """One certificate variant of one source: its label, soundness and its values at any radius."""

    def __init__(self, summary: Mapping, variant_name: str, variant: Mapping, headline: bool):
        self.summary, self.variant_name, self.variant, self.headline = summary, variant_name, variant, headline
        self.job = _name(summary)
        self.kind = _kind(variant_name, variant)
        self.sound = _is_sound(variant, variant_name)
        self.scope = _scope(variant_name, variant) if self.sound else None
        self.adaptive = "adaptive" in (summary.get("sampling"), variant.get("sampling"))
        self.certificate = _certificate(variant_name, variant) + (", adaptive sampling" if self.adaptive else "")
        self.label = _label(summary, variant_name, variant) + (", adaptive sampling" if self.adaptive else "")
        self.rows = _variant_rows(summary, variant_name, variant)
        self.repeated_in: list[str] = []  # other jobs that hold exactly this certificate (shown once)

    def values(self, radii) -> list[float | None]:
        if self.rows is not None:
            return certified_accuracy(self.rows["radius"], self.rows["correct"], radii).tolist()
        return [_grid_value(self.summary, self.variant, float(r)) for r in radii]

    def forward_passes(self) -> float | None:
        """What this curve cost: the variant's own count, else its rows' (never the whole run's total, which
        would charge one variant for all of them)."""
        if self.variant.get("forward_passes") is not None:
            return float(self.variant["forward_passes"])
        if self.rows is not None and "samples" in self.rows:
            return float(self.rows["samples"].sum())
        return None


def _curves(summaries, include_unsound: bool = True) -> list[_Curve]:
    curves = []
    for summary in summaries:
        for i, (variant_name, variant) in enumerate(_variants(summary)):
            curve = _Curve(summary, variant_name, variant, headline=i == 0)
            if include_unsound or curve.sound is True:
                curves.append(curve)
    return _distinct(_without_repeats(curves))


def _same_certificate(a: _Curve, b: _Curve) -> bool:
    """Two variants of two runs that are one certificate: same kind and level, same points, same radii (e.g. a
    later stage that certifies the same classifier at the same level again)."""
    if a.summary is b.summary or a.kind != b.kind or a.variant.get("sigma") != b.variant.get("sigma"):
        return False
    if a.rows is not None and b.rows is not None:
        return all(np.array_equal(a.rows[c].to_numpy(), b.rows[c].to_numpy()) for c in ("idx", "radius", "correct"))
    keys = ("certified_accuracy", "acr", "abstain_rate", "num_points")
    return all(a.variant.get(k) == b.variant.get(k) for k in keys) and _indices(a.summary) == _indices(b.summary)


def _without_repeats(curves: list[_Curve]) -> list[_Curve]:
    """A variant that repeats another run's certificate is shown once: a run's headline is always kept, a
    repeat that is not a headline is dropped and named in ``repeated_in`` of the one kept."""
    kept: list[_Curve] = []
    for curve in sorted(curves, key=lambda c: not c.headline):  # headlines first: never dropped for a repeat
        original = next((k for k in kept if _same_certificate(k, curve)), None) if not curve.headline else None
        if original is None:
            kept.append(curve)
        else:
            original.repeated_in.append(curve.job)
    return [c for c in curves if c in kept]


def _distinct(curves: list[_Curve]) -> list[_Curve]:
    """Every curve gets a label of its own (a plot keyed by label would silently drop one of two equal
    labels): a repeated label gets its run folder, then its variant, then a number."""
    for extra in (lambda c: Path(str(c.summary.get("path") or "")).name, lambda c: c.variant_name):
        labels = [c.label for c in curves]
        for curve in curves:
            if labels.count(curve.label) > 1 and extra(curve):
                curve.label = f"{curve.label} [{extra(curve)}]"
    seen: dict[str, int] = {}
    for curve in curves:
        seen[curve.label] = seen.get(curve.label, 0) + 1
        if seen[curve.label] > 1:
            curve.label = f"{curve.label} #{seen[curve.label]}"
    return curves


def _as_list(summaries) -> list:
    return [summaries] if isinstance(summaries, Mapping) else list(summaries)


def dataset_name(key: str) -> str:
    return _DISPLAY.get(key, key)


def group_by_dataset(summaries) -> dict[str, list[dict]]:
    """Summaries per dataset key, known datasets first (alphabetically), the unknown dataset last."""
    groups: dict[str, list[dict]] = {}
    for summary in _as_list(summaries):
        groups.setdefault(dataset_key(summary.get("dataset")), []).append(summary)
    return dict(sorted(groups.items(), key=lambda item: (item[0] == UNKNOWN_DATASET, item[0])))


def _indices(summary: Mapping) -> frozenset | None:
    indices = (summary.get("points") or {}).get("indices")
    if indices is not None:
        return frozenset(int(i) for i in indices)
    for variant_name, variant in _variants(summary):
        rows = _variant_rows(summary, variant_name, variant)
        if rows is not None:
            return frozenset(int(i) for i in rows["idx"])
    return None


def _describe(indices: frozenset) -> str:
    """"500 points: idx 0, 20, ..., 9980" for a progression, else count and range."""
    ordered = sorted(indices)
    if len(ordered) <= 3:
        return f"{len(ordered)} point(s): idx {', '.join(map(str, ordered))}"
    steps = set(np.diff(ordered).tolist())
    if len(steps) == 1:
        return f"{len(ordered)} points: idx {ordered[0]}, {ordered[1]}, ..., {ordered[-1]}"
    return f"{len(ordered)} points: idx {ordered[0]} to {ordered[-1]}, irregular"


def subset_note(summaries) -> str | None:
    """A note when the sources were certified on different test points (or one did not record its points):
    certified accuracy on "every 20th image" and on "images 500-999" differ by several points. None when all
    share one index set."""
    summaries = _as_list(summaries)
    if len(summaries) < 2:
        return None
    sets: dict[frozenset | None, list[str]] = {}
    for summary in summaries:
        sets.setdefault(_indices(summary), []).append(_name(summary))
    if len(sets) <= 1 and None not in sets:
        return None
    parts = []
    for indices, names in sets.items():
        what = "points not recorded" if indices is None else _describe(indices)
        parts.append(f"{', '.join(names)} ({what})")
    known = [s for s in sets if s is not None]
    shared = len(frozenset.intersection(*known)) if known else 0
    return ("Not certified on the same test points, so these numbers are not directly comparable: "
            + "; ".join(parts) + f". Points common to all: {shared}.")


def title_of(summaries) -> str:
    """A title from the experiment, never from a time-stamped folder: the experiment the jobs share (the
    part of their names before "/"), the dataset, the methods and the noise levels."""
    summaries = _as_list(summaries)
    runs = [s for s in summaries if s.get("source") != PUBLISHED]
    prefixes = {_name(s).split("/")[0] for s in runs}
    experiment = prefixes.pop() if len(prefixes) == 1 and all("/" in _name(s) for s in runs) else ""
    keys = list(dict.fromkeys(dataset_key(s.get("dataset")) for s in summaries))
    methods = list(dict.fromkeys(_method(s) for s in summaries if _method(s)))
    if len(runs) < len(summaries):
        methods.append("published logs")
    sigmas = sorted({float(s["sigma"]) for s in runs if s.get("sigma") is not None})
    parts = [", ".join(dataset_name(k) for k in keys)]
    if methods:
        parts.append(", ".join(methods))
    if sigmas:  # a published log records no sigma: say whose levels these are
        parts.append("σ = " + ", ".join(f"{s:g}" for s in sigmas) + (" (runs)" if len(runs) < len(summaries) else ""))
    return (f"{experiment}: " if experiment else "") + "; ".join(parts)


def _table_radii(summaries, radii) -> list[float]:
    if radii is not None:
        return sorted(float(r) for r in radii)
    return radius_grid(s.get("dataset") for s in _as_list(summaries))


def _check_one_dataset(summaries) -> None:
    keys = {dataset_key(s.get("dataset")) for s in summaries}
    if len(keys) > 1:
        raise ValueError(f"an envelope compares points of one dataset; got {', '.join(sorted(keys))} "
                         "(use group_by_dataset)")


def envelope(summaries, radii=None, scope: str = ANY_INPUT) -> tuple[np.ndarray, list[str | None]]:
    """Best certified accuracy at each radius (default: the dataset's standard grid) over every SOUND variant
    of every source that holds for ``scope`` ("any input" or "this test set"), and the curve that reaches it.
    Scopes are never mixed: a transductive certificate holds only for the evaluated set and never carries the
    envelope of certificates for any input. An upper bound or a variant of unrecorded soundness is no
    certificate and never counts. NaN and None where no variant is known at a radius. Raises ValueError for
    sources of more than one dataset, or an unknown scope."""
    found = envelopes(summaries, radii, scopes=(scope,))
    return found[scope] if scope in found else _grid_envelope([], _table_radii(_as_list(summaries), radii))


def envelopes(summaries, radii=None, scopes=SCOPES) -> dict[str, tuple[np.ndarray, list[str | None]]]:
    """``envelope`` for every scope in ``scopes`` that some sound variant holds for, in that order."""
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"scope {unknown[0]!r} must be one of {SCOPES}")
    summaries = _as_list(summaries)
    _check_one_dataset(summaries)
    radii = _table_radii(summaries, radii)
    curves = _curves(summaries, include_unsound=False)
    return {scope: _grid_envelope([c for c in curves if c.scope == scope], radii)
            for scope in scopes if any(c.scope == scope for c in curves)}


def _grid_envelope(curves, radii) -> tuple[np.ndarray, list[str | None]]:
    best = np.full(len(radii), np.nan)
    best_name: list[str | None] = [None] * len(radii)
    for curve in curves:
        for i, value in enumerate(curve.values(radii)):
            if value is not None and not value <= best[i]:  # "not <=" so that NaN is beaten
                best[i], best_name[i] = value, f"{curve.job} {curve.variant_name}"
    return best, best_name
