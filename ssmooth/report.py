"""Certified accuracy, ACR, tables and plots for runs, sweeps and published per-image logs.

Certified accuracy at radius r is the share of ALL evaluated points whose smoothed prediction is correct with
certified radius >= r; an abstain counts as wrong. ACR is the mean over all points of radius * [correct].

Two kinds of source:
- a run folder holds ``summary.json`` (dataset, settings, one entry per certificate variant) and the per-point
  rows (``certify.tsv``, ``certify_<variant>.tsv``); a sweep folder holds many run folders;
- a published log is a per-image TSV with the header ``idx label predict radius correct time`` (the format of
  Cohen et al., SmoothAdv and MACER; extra columns are ignored). It records no dataset: the caller names it.

Numbers are computed from the rows wherever a rows file reproduces its summary, so any radius can be asked for;
otherwise from the summary's own grid (a radius off that grid is left blank, never interpolated). Points are
compared only within one dataset: every table, envelope and plot is per dataset.

    from ssmooth.report import load_sources, write_report
    write_report(["outputs/sweeps/S", "cohen_logs/"], out="reports/cmp", labels={...}, dataset="cifar10")

Pure: numpy and pandas only; matplotlib (without pyplot, so no global backend) and rich load on first use.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "UNKNOWN_DATASET",
    "average_certified_radius",
    "certified_accuracy",
    "certified_accuracy_curve",
    "envelope",
    "format_table",
    "group_by_dataset",
    "load_log",
    "load_sources",
    "load_summaries",
    "plot_certified_accuracy",
    "print_table",
    "radius_grid",
    "read_rows",
    "standard_radii",
    "subset_note",
    "summarize_rows",
    "title_of",
    "write_report",
]

ABSTAIN = -1  # same value as ssmooth.certify.ABSTAIN; importing ssmooth.certify would load torch
UNSOUND_MARK = "(unsound upper bound)"
UNKNOWN_SOUNDNESS_MARK = "(soundness not recorded)"
PLOT_NAME = "certified_accuracy.png"
UNKNOWN_DATASET = "unknown dataset"
LOG_COLUMNS = ("idx", "label", "predict", "radius", "correct")  # "time" and any other column are optional
PUBLISHED = "published"  # the variant name of a published log, and its summary's "source"


# ---------------------------------------------------------------------------------------------------- metrics


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
_DISPLAY = {"cifar10": "CIFAR-10", "mnist": "MNIST", "imagenet": "ImageNet", "digits": "digits"}


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


# ---------------------------------------------------------------------------------------------------- loading


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """Rows of a certification TSV, one per dataset index (first kept: a DistributedSampler pads with
    duplicates), sorted by index. Mirrors ``ssmooth.certify.results.read_rows`` without loading torch."""
    frame = pd.read_csv(path, sep="\t")
    return frame.drop_duplicates("idx", keep="first").sort_values("idx").reset_index(drop=True)


_ROWS_CACHE: dict[tuple, pd.DataFrame] = {}


def _cached_rows(path: Path, reader=read_rows) -> pd.DataFrame | None:
    """``reader(path)``, read once per file version (a table, an envelope and a plot all need the same rows);
    None when the file is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, reader.__name__)
    if key not in _ROWS_CACHE:
        _ROWS_CACHE[key] = reader(path)
    return _ROWS_CACHE[key]


def _walk(root: Path) -> list[Path]:
    """Every file under ``root``, following symlinked folders (each real folder visited once), sorted."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found.extend(Path(folder) / f for f in files)
    return sorted(found)


def _natural_key(text: str):
    """Sort "s0.12" < "s0.25" < "s0.5" < "s1.0" and "job2" < "job10": numbers compare as numbers."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)]


def _read_summary(file: Path, root: Path) -> dict | None:
    try:
        summary = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warnings.warn(f"skipping {file}: {err}", stacklevel=3)
        return None
    run_dir = file.parent
    relative = run_dir.relative_to(root).as_posix() if root.is_dir() else "."
    summary["path"] = str(run_dir)
    summary["name"] = summary.get("name") or (run_dir.resolve().name if relative == "." else relative)
    summary["_relative"] = relative
    return summary


def _unique_names(summaries: list[dict]) -> list[dict]:
    """Two sources with one name get their relative folder (or file) appended, so rows stay distinct."""
    names = [s["name"] for s in summaries]
    for summary in summaries:
        if names.count(summary["name"]) > 1:
            summary["name"] = f"{summary['name']} [{summary.get('_relative') or summary['path']}]"
    for summary in summaries:
        summary.pop("_relative", None)
    return sorted(summaries, key=lambda s: (_natural_key(s["name"]), s["path"]))


def load_summaries(dir: str | os.PathLike) -> list[dict]:
    """Every ``summary.json`` under a run or sweep folder (searched recursively, following symlinks), sorted by
    name.

    Each summary gets ``path`` (its run folder) and, where it has none, ``name`` (the run folder relative to
    ``dir``; the folder's own name when ``dir`` is the run). Two runs with the same name get their relative
    folder appended so that table rows stay distinct. A summary that is not valid JSON is skipped with a
    warning naming it. Raises FileNotFoundError when ``dir`` does not exist.
    """
    root = Path(dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    files = [root] if root.is_file() else [f for f in _walk(root) if f.name == "summary.json"]
    return _unique_names([s for s in (_read_summary(f, root) for f in files) if s is not None])


def read_log(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a published per-image log, checked: the columns ``idx label predict radius correct`` must be
    there and numeric, ``correct`` must equal ``predict == label``, an abstain must have radius 0. Raises
    ValueError naming the file and the first bad value; a repeated index keeps its first row, with a warning."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a tab-separated log ({err})") from None
    missing = [c for c in LOG_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; a published log needs the header "
                         f"'{' '.join(LOG_COLUMNS)} time' (tab separated)")
    if frame.empty:
        raise ValueError(f"{path}: the log has a header but no rows")
    for column in LOG_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise ValueError(f"{path}: {column} = {frame[column].iloc[row]!r} on data line {row + 1} is not a number")
        frame[column] = values
    correct = frame["correct"].astype(int) != 0
    agrees = correct == (frame["predict"] == frame["label"])
    if not agrees.all():
        row = frame[~agrees].iloc[0]
        raise ValueError(f"{path}: idx {int(row['idx'])} has correct = {int(row['correct'])} but predict "
                         f"{int(row['predict'])} and label {int(row['label'])}")
    bad_abstain = (frame["predict"] == ABSTAIN) & (frame["radius"] != 0)
    if bad_abstain.any() or (frame["radius"] < 0).any():
        row = frame[bad_abstain | (frame["radius"] < 0)].iloc[0]
        raise ValueError(f"{path}: idx {int(row['idx'])} has radius {row['radius']} (abstains have radius 0, "
                         "radii are never negative)")
    repeated = int(frame["idx"].duplicated().sum())
    if repeated:
        warnings.warn(f"{path}: {repeated} repeated index(es); the first row of each is kept", stacklevel=2)
    return frame.drop_duplicates("idx", keep="first").sort_values("idx").reset_index(drop=True)


def load_log(path: str | os.PathLike, name: str | None = None, dataset: str | None = None) -> dict:
    """A published log as a summary: one sound variant ``published`` computed from its rows at the dataset's
    standard grid, the evaluated indices, and ``source = "published"``. ``dataset`` None is the unknown
    dataset (nothing is guessed from the file name)."""
    path = Path(path)
    rows = read_log(path)
    radii = standard_radii(dataset or "")
    variant = {**summarize_rows(rows, radii), "sound": True, "kind": "published log"}
    return {
        "name": name or path.stem,
        "dataset": dataset or None,
        "source": PUBLISHED,
        "path": str(path.parent),
        "rows_file": str(path),
        "radii": radii,
        "main": PUBLISHED,
        "variants": {PUBLISHED: variant},
        "points": {"count": int(len(rows)), "indices": [int(i) for i in rows["idx"]]},
    }


def _is_log(path: Path) -> bool:
    """A TSV whose header has the log columns."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            header = file.readline().rstrip("\r\n").split("\t")
    except OSError:
        return False
    return all(column in header for column in LOG_COLUMNS)


def load_sources(paths: Sequence, labels: Mapping | None = None, dataset: str | None = None,
                 datasets: Mapping | None = None) -> list[dict]:
    """Summaries of every run, sweep and published log in ``paths`` (files or folders, symlinks followed).

    A folder contributes every ``summary.json`` under it (a run) and every TSV with the log header that is
    not inside a run folder (a published log). A ``certify*.tsv`` in a folder without ``summary.json`` is an
    unfinished run: skipped with a warning, never reported as a log. A TSV given by name is a log.
    ``labels`` maps a path to the name of its curve (a sweep's runs become ``NAME/<run>``);
    ``dataset`` is the dataset of every log given none in ``datasets`` (path -> dataset). A path reached
    twice (e.g. through a symlink) counts once. Raises FileNotFoundError for a missing path and ValueError for
    a log that breaks the format, or a dataset given for a run that recorded another.
    """
    labels = {os.path.realpath(p): str(n) for p, n in (labels or {}).items()}
    datasets = {os.path.realpath(p): d for p, d in (datasets or {}).items()}
    summaries, seen = [], set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or directory")
        label, chosen = labels.get(os.path.realpath(root)), datasets.get(os.path.realpath(root))
        if root.is_file() and root.name != "summary.json":
            found = [] if os.path.realpath(root) in seen else [root]
            runs, logs = [], found
        else:
            files = [root] if root.is_file() else _walk(root)
            run_dirs = {f.parent for f in files if f.name == "summary.json"}
            runs = [f for f in files if f.name == "summary.json"]
            logs = []
            for f in files:
                if f.suffix != ".tsv" or any(d == f.parent or d in f.parents for d in run_dirs):
                    continue
                if f.name.startswith("certify"):
                    warnings.warn(f"skipping {f}: rows of a run without summary.json (unfinished?)", stacklevel=2)
                elif _is_log(f):
                    logs.append(f)
        for file in runs:
            if os.path.realpath(file) in seen:
                continue
            seen.add(os.path.realpath(file))
            summary = _read_summary(file, root)
            if summary is None:
                continue
            if chosen and dataset_key(chosen) != dataset_key(summary.get("dataset")):
                raise ValueError(f"{file}: the run recorded dataset {summary.get('dataset')!r}, "
                                 f"not {chosen!r} as given for {root}")
            if label:
                rel = summary["_relative"]
                summary["name"] = label if rel == "." or len(runs) == 1 else f"{label}/{rel}"
            summaries.append(summary)
        for file in logs:
            if os.path.realpath(file) in seen:
                continue
            seen.add(os.path.realpath(file))
            name = file.stem
            if label:
                name = label if len(logs) == 1 else f"{label}/{file.stem}"
            summary = load_log(file, name=name, dataset=chosen or dataset)
            summary["_relative"] = file.relative_to(root).as_posix() if root.is_dir() else file.name
            summaries.append(summary)
    return _unique_names(summaries)


# ---------------------------------------------------------------------------------------------------- variants


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
    """Kind, allocation rule and the inputs it holds for, e.g. "transductive (fill), this test set"."""
    text = _kind(variant_name, variant)
    if variant.get("allocation") and text == "transductive":
        text += f" ({variant['allocation']})"
    if variant.get("setting"):
        text += f", {variant['setting']}"
    return text


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
        self.sound = _is_sound(variant, variant_name)
        self.label = _label(summary, variant_name, variant)
        self.rows = _variant_rows(summary, variant_name, variant)

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
    return curves


def _as_list(summaries) -> list:
    return [summaries] if isinstance(summaries, Mapping) else list(summaries)


# ---------------------------------------------------------------------------------------------------- datasets


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


# ---------------------------------------------------------------------------------------------------- tables


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(int(value) if spec == "d" else value, spec)  # JSON may hold 500.0 for a count


def _notes(variant: Mapping) -> str:
    """What a sample-wise result needs beside it: the rule, its conflicts and how much radius it kept."""
    notes = []
    if "allocation" in variant:
        notes.append(f"allocation {variant['allocation']}")
    if "num_conflicting_pairs" in variant:
        notes.append(f"{variant['num_conflicting_pairs']} conflicting pairs")
    if "mean_r_over_R" in variant:
        notes.append(f"mean r/R {_fmt(variant['mean_r_over_R'], '.3f')}")
    return ", ".join(notes)


def _table(summaries, radii, include_unsound: bool = True):
    """Header, rows of cell texts (one per job and variant), each row's soundness, and the numeric columns."""
    curves = _curves(summaries, include_unsound)
    cost = any(c.forward_passes() is not None for c in curves)
    header = ["job", "variant", "method", "sigma", "certificate", *[f"r={r:g}" for r in radii], "ACR",
              "abstain %", "points", *(["forward passes"] if cost else []), "notes"]
    rows, sound = [], []
    for curve in curves:
        variant = curve.variant
        mark = {False: f" {UNSOUND_MARK}", None: f" {UNKNOWN_SOUNDNESS_MARK}"}.get(curve.sound, "")
        abstain = variant.get("abstain_rate")
        passes = curve.forward_passes()
        rows.append([
            curve.job,
            curve.variant_name + mark,
            _method(curve.summary),
            _sigma(curve.summary, curve.variant_name, variant),
            _certificate(curve.variant_name, variant),
            *[_fmt(None if a is None else 100 * a, ".1f") for a in curve.values(radii)],
            _fmt(variant.get("acr"), ".4f"),
            _fmt(None if abstain is None else 100 * abstain, ".1f"),
            _fmt(variant.get("num_points"), "d"),
            *([_fmt(passes, ",.0f")] if cost else []),
            _notes(variant),
        ])
        sound.append(curve.sound)
    return header, rows, sound, (5, len(header) - 1)


def _markdown(header: list[str], rows: list[list[str]], numeric_from: int = 2, numeric_to: int | None = None) -> str:
    numeric_to = len(header) if numeric_to is None else numeric_to

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if numeric_from <= i < numeric_to else "---" for i in range(len(header))]
    return "\n".join([line(header), "|" + "|".join(align) + "|", *[line(row) for row in rows]])


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                                   "\\": r"\textbackslash{}", "σ": r"$\sigma$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def _latex(header, rows, numeric_from=2, numeric_to=None, caption=None, label=None) -> str:
    numeric_to = len(header) if numeric_to is None else numeric_to
    spec = "".join("r" if numeric_from <= i < numeric_to else "l" for i in range(len(header)))

    def line(cells):
        return " & ".join(_latex_escape(c) for c in cells) + r" \\"

    if caption:  # plain text: escaped, with "l2" typeset as in a paper
        caption = re.sub(r"\bl2\b", r"$\\ell_2$", _latex_escape(caption))
    tabular = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", line(header), r"\midrule", *[line(r) for r in rows],
               r"\bottomrule", r"\end{tabular}"]
    if caption is None and label is None:
        return "\n".join([r"% needs \usepackage{booktabs}", *tabular])
    return "\n".join([
        r"% needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{caption or ''}}}",
        rf"\label{{{label or 'tab:certified-accuracy'}}}",
        *tabular,
        r"\end{table}",
    ])


def _latex_label(text: str) -> str:
    return "tab:certified-accuracy-" + (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "all")


def _drop_empty_columns(header, rows, numeric):
    """Drop the method / sigma / certificate / notes columns where every row is blank."""
    keep = [i for i, h in enumerate(header) if h not in ("method", "sigma", "certificate", "notes")
            or any(row[i] for row in rows)]
    first, last = numeric
    first -= sum(1 for i in range(first) if i not in keep)
    last -= sum(1 for i in range(last) if i not in keep)
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows], (first, last)


def format_table(summaries, radii=None, fmt: str = "markdown", include_unsound: bool = True,
                 caption: str | None = None) -> str:
    """One row per (job, variant): method, sigma, certificate kind, certified accuracy in % at each radius, ACR,
    abstain %, points, forward passes (when recorded), and the allocation notes of sample-wise variants.
    Unsound variants carry "(unsound upper bound)"; ``include_unsound=False`` leaves them (and variants of
    unrecorded soundness) out.

    ``radii`` defaults to the union of the datasets' standard grids. Values come from the rows where a rows
    file reproduces the summary, else from the summary (a radius off its grid is left blank). Sources of
    different datasets get one table each. ``fmt`` is "markdown" or "latex" (a booktabs ``table`` with
    caption and label).
    """
    if fmt not in ("markdown", "latex"):
        raise ValueError(f'fmt must be "markdown" or "latex", got {fmt!r}')
    summaries = _as_list(summaries)
    radii = _table_radii(summaries, radii)
    groups = group_by_dataset(summaries)
    parts = []
    for key, group in groups.items():
        header, rows, _, numeric = _table(group, radii, include_unsound)
        header, rows, numeric = _drop_empty_columns(header, rows, numeric)
        if fmt == "markdown":
            table = _markdown(header, rows, *numeric)
            parts.append(table if len(groups) == 1 else f"**{dataset_name(key)}**\n\n{table}")
        else:
            text = caption or f"Certified accuracy (%) at l2 radius r on {dataset_name(key)}"
            parts.append(_latex(header, rows, *numeric, caption=_caption(text, group), label=_latex_label(key)))
    return "\n\n".join(parts)


def _caption(text: str, group) -> str:
    """The caption states what a reader needs: the measure and, when shared, the evaluated points."""
    indices = {_indices(s) for s in group}
    if len(indices) == 1 and None not in indices:
        text += f" ({_describe(next(iter(indices)))} of the test set)"
    return text + "; an abstain counts as wrong. ACR: average certified radius."


def print_table(summaries, radii=None, title: str | None = None, console=None) -> None:
    """The table of ``format_table`` on the terminal with rich (unsound variants in red), one per dataset,
    squeezed for width: radius headers are bare numbers and the sample-wise notes go under the table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    summaries = _as_list(summaries)
    radii = _table_radii(summaries, radii)
    groups = group_by_dataset(summaries)
    for key, group in groups.items():
        header, rows, sound, numeric = _table(group, radii, include_unsound=True)
        header, rows, numeric = _drop_empty_columns(header, rows, numeric)
        start = header.index(f"r={radii[0]:g}") if radii else numeric[0]
        header[start:start + len(radii)] = [f"{r:g}" for r in radii]
        notes = [f"{row[0]} {row[1]}: {row[-1]}" for row in rows if header[-1] == "notes" and row[-1]]
        width = len(header) - (1 if header[-1] == "notes" else 0)
        name = title or "certified accuracy (%) at l2 radius r"
        if len(groups) > 1:
            name += f" — {dataset_name(key)}"
        note = subset_note(group)
        caption = "\n".join(notes + ([note] if note else []))
        table = Table(title=name, title_justify="left", caption=caption or None, caption_justify="left",
                      box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
        for i, column in enumerate(header[:width]):
            longest = max([len(column)] + [len(row[i]) for row in rows])
            # numbers are never cut (a cropped "0.45" for 0.454 would mislead); names fold instead
            table.add_column(column, justify="right" if i >= numeric[0] else "left", no_wrap=True,
                             min_width=longest)
        for row, is_sound in zip(rows, sound):
            table.add_row(*row[:width], style={False: "red", None: "yellow"}.get(is_sound))
        out = console
        if out is None:
            # On a narrow terminal (or a log file: 80 columns) rich would squeeze or drop whole columns; print
            # the table at its natural width and let long lines wrap instead of losing names or numbers.
            natural = sum(column.min_width + 2 for column in table.columns) + 2
            out = Console(width=max(Console().width, natural))
        out.print(table, crop=False)


def _check_one_dataset(summaries) -> None:
    keys = {dataset_key(s.get("dataset")) for s in summaries}
    if len(keys) > 1:
        raise ValueError(f"an envelope compares points of one dataset; got {', '.join(sorted(keys))} "
                         "(use group_by_dataset)")


def envelope(summaries, radii=None) -> tuple[np.ndarray, list[str | None]]:
    """Best certified accuracy at each radius (default: the dataset's standard grid) over every SOUND variant
    of every source, and the curve that reaches it. An upper bound or a variant of unrecorded soundness is no
    certificate and never counts. NaN and None where no variant is known at a radius. Raises ValueError for
    sources of more than one dataset."""
    summaries = _as_list(summaries)
    _check_one_dataset(summaries)
    radii = _table_radii(summaries, radii)
    return _grid_envelope(_curves(summaries, include_unsound=False), radii)


def _grid_envelope(curves, radii) -> tuple[np.ndarray, list[str | None]]:
    best = np.full(len(radii), np.nan)
    best_name: list[str | None] = [None] * len(radii)
    for curve in curves:
        for i, value in enumerate(curve.values(radii)):
            if value is not None and not value <= best[i]:  # "not <=" so that NaN is beaten
                best[i], best_name[i] = value, f"{curve.job} {curve.variant_name}"
    return best, best_name


# ---------------------------------------------------------------------------------------------------- plot

_LINESTYLES = ["-", (0, (5, 1)), "-.", (0, (3, 1, 1, 1, 1, 1))]


def plot_certified_accuracy(summaries, path, envelope: bool = True, title: str | None = None,
                            include_unsound: bool = False) -> dict:
    """Certified accuracy (%) against l2 radius: one curve per sound variant of every source (unsound ones
    dotted, only with ``include_unsound``) and, with ``envelope``, the best sound certificate at each radius as
    a thick dashed black line drawn on top. Saves ``path`` (PNG) and the same name with ``.pdf``.

    A variant whose rows are at hand is drawn as its exact step curve (see ``certified_accuracy_curve``); else
    its summary grid is drawn as markers joined by lines. The envelope is exact when every sound curve is
    exact, else it is taken on the grid. Sources must share one dataset when ``envelope`` is on.
    Returns ``{"path", "pdf", "curves": {label: (x, y)}, "envelope": (x, y) or None}`` with y in [0, 1].
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in threads

    summaries = _as_list(summaries)
    if envelope:
        _check_one_dataset(summaries)
    curves = _curves(summaries, include_unsound)
    drawn = {}
    for curve in curves:
        if curve.rows is not None:
            drawn[curve.label] = (certified_accuracy_curve(curve.rows["radius"], curve.rows["correct"]), True, curve)
            continue
        known = [(float(r), v) for r, v in zip(curve.summary.get("radii", []), curve.values(curve.summary.get("radii", [])))
                 if v is not None]
        if known:
            drawn[curve.label] = (tuple(map(np.asarray, zip(*known))), False, curve)

    sound = [c for c in curves if c.sound is True]
    envelope_xy, envelope_exact = None, all(c.rows is not None for c in sound)
    if envelope and sound:
        if envelope_exact:
            x = np.unique(np.concatenate([drawn[c.label][0][0] for c in sound if c.label in drawn]))
            y = np.max([certified_accuracy(c.rows["radius"], c.rows["correct"], x) for c in sound], axis=0)
        else:
            x = np.asarray(sorted({round(float(r), 10) for c in sound for r in c.summary.get("radii", [])}))
            y, _ = _grid_envelope(sound, x)
            x, y = x[~np.isnan(y)], y[~np.isnan(y)]
        envelope_xy = (x, y)

    x_end = 1.05 * max([0.25] + [float(xy[0][-1]) for xy, _, _ in drawn.values()])
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, ((x, y), exact, curve)) in enumerate(drawn.items()):
        style = {"color": f"C{i % 10}", "linewidth": 1.4, "zorder": 2,
                 "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)] if curve.sound is not False else ":",
                 "label": label if curve.sound is not False else f"{label} {UNSOUND_MARK}"}
        if exact:  # y[i] holds on (x[i-1], x[i]]; 0 after the largest certified radius
            ax.step(np.append(x, x_end), 100 * np.append(y, 0.0), where="pre", **style)
        else:
            ax.plot(x, 100 * np.asarray(y), marker="o", markersize=3, **style)
    if envelope_xy is not None:
        x, y = envelope_xy
        # On top of the curves it bounds, so that it stays visible where it coincides with one of them.
        style = {"color": "black", "linestyle": (0, (4, 2)), "linewidth": 2.4, "alpha": 0.85, "zorder": 3}
        if envelope_exact:
            ax.step(np.append(x, x_end), 100 * np.append(y, 0.0), where="pre",
                    label="envelope: best sound certificate", **style)
        else:
            ax.plot(x, 100 * y, label="envelope: best sound certificate (on the grid)", **style)
    ax.set_xlim(0, x_end)
    ax.set_ylim(0, 102)
    ax.set_xlabel(r"$\ell_2$ radius r")
    ax.set_ylabel("certified accuracy (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if len(drawn) > 6:
        # A long legend would hide the curves, or squeeze the axes beside it: it goes under them, one entry a
        # line, and the figure grows to hold it.
        fig.set_size_inches(7.5, 4.6 + 0.2 * (len(drawn) + 1))
        fig.legend(fontsize="small", loc="outside lower center")
    elif drawn:
        ax.legend(fontsize="small", loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf = path.with_suffix(".pdf")
    fig.savefig(path, dpi=150)
    fig.savefig(pdf)
    curves_xy = {label: xy for label, (xy, _, _) in drawn.items()}
    return {"path": str(path), "pdf": str(pdf), "curves": curves_xy, "envelope": envelope_xy}


# ---------------------------------------------------------------------------------------------------- report


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def _points(summary: Mapping) -> str:
    """Which test points were evaluated (results differ by several points between test subsets)."""
    points = summary.get("points") or {}
    if not points:
        return ""
    if summary.get("source") == PUBLISHED:
        return _describe(frozenset(points["indices"]))
    split, skip = points.get("split", "test"), points.get("skip", 1)
    selection = f"{split}[::{int(skip)}]" if skip and skip != 1 else split
    if points.get("start"):
        selection = f"{split}[{int(points['start'])}::{int(skip or 1)}]"
    limit = points.get("max", -1)
    if limit is not None and limit >= 0:
        selection += f", max {_fmt(limit, 'd')}"
    count = points.get("count")
    return selection if count is None else f"{_fmt(count, 'd')} of {selection}"


def _runs_table(summaries) -> str:
    header = ["job", "source", "dataset", "model", "objective", "sigma policy", "sigma", "n0", "n", "alpha",
              "points", "wall time"]
    rows = [[
        _name(s), s["rows_file"] if s.get("source") == PUBLISHED else s.get("path", ""),
        s.get("dataset") or UNKNOWN_DATASET, s.get("model", ""), s.get("objective", ""), s.get("sigma_policy", ""),
        _fmt(s.get("sigma"), "g"), _fmt(s.get("n0"), "d"), _fmt(s.get("n"), "d"), _fmt(s.get("alpha"), "g"),
        _points(s), _duration(s.get("wall_time_s")),
    ] for s in summaries]
    return _markdown(header, rows, numeric_from=6, numeric_to=10)


def _plot_name(key: str, several: bool) -> str:
    return PLOT_NAME if not several else f"certified_accuracy_{re.sub(r'[^a-z0-9]+', '_', key)}.png"


def write_report(dir, out: str | os.PathLike | None = None, radii=None, labels: Mapping | None = None,
                 dataset: str | None = None, datasets: Mapping | None = None,
                 include_unsound: bool = False, summaries: list[dict] | None = None) -> dict:
    """Write ``report.md`` (tables, envelopes, notes, plots, settings), ``report.tex`` (a booktabs table per
    dataset, sound certificates only unless ``include_unsound``) and a plot per dataset (PNG and PDF) into
    ``out`` for every run, sweep and published log in ``dir`` (one path or a list; see ``load_sources`` for
    ``labels``, ``dataset`` and ``datasets``). ``out`` defaults to ``dir`` when it is one folder.

    ``summaries`` already loaded from ``dir`` by ``load_sources`` are used as they are.

    Returns ``{"markdown", "latex", "plot" (the first plot), "plots", "pdfs"}`` paths. Raises
    FileNotFoundError when a path is missing or nothing certified is found.
    """
    paths = [dir] if isinstance(dir, (str, os.PathLike)) else list(dir)
    if summaries is None:
        summaries = load_sources(paths, labels=labels, dataset=dataset, datasets=datasets)
    if not summaries:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: no summary.json and no published log found")
    if out is None:
        if len(paths) != 1 or not Path(paths[0]).is_dir():
            raise ValueError("say where to write the report (out) when the sources are not one folder")
        out = paths[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    radii = _table_radii(summaries, radii)
    groups = group_by_dataset(summaries)
    title = title_of(summaries)

    lines = [
        f"# Certification report: {title}",
        "",
        f"{len(summaries)} source(s). Certified accuracy (%) at l2 radius r: share of ALL evaluated points whose "
        "smoothed prediction is correct with certified radius >= r (an abstain counts as wrong). ACR: mean over "
        "all points of the certified radius, 0 where wrong or abstained. Numbers are computed from the per-point "
        "rows where they are at hand; a blank cell is a radius off a run's recorded grid (nothing is "
        "interpolated). Sources of different datasets are never compared: each dataset has its own table, "
        "envelope and plot.",
        "",
    ]
    plots, pdfs, latex = [], [], []
    for key, group in groups.items():
        group_title = title_of(group)
        lines += [f"## {dataset_name(key)}", ""]
        if key == UNKNOWN_DATASET:
            lines += ["These published logs record no dataset, so they are compared with nothing else and have "
                      "no envelope; name their dataset (`--dataset`, or `--label NAME@DATASET=PATH`) to put "
                      "them beside runs on that dataset.", ""]
        note = subset_note(group)
        if note:
            lines += [f"**Note.** {note}", ""]
        header, rows, _, numeric = _table(group, radii, include_unsound=True)
        header, rows, numeric = _drop_empty_columns(header, rows, numeric)
        lines += [_markdown(header, rows, *numeric), ""]
        if any(_is_sound(v, n) is False for s in group for n, v in _variants(s)):
            lines += [f"Variants marked {UNSOUND_MARK} list per-point radii before the transductive allocation: "
                      "an upper bound, not a certificate. They are in no envelope.", ""]
        plot_path = out / _plot_name(key, len(groups) > 1)
        known = key != UNKNOWN_DATASET
        drawn = plot_certified_accuracy(group, plot_path, envelope=known, title=group_title,
                                        include_unsound=include_unsound)
        plots.append(drawn["path"])
        pdfs.append(drawn["pdf"])
        if known:
            best, best_name = envelope(group, radii)
            # A curve is named only where it certifies something: at 0 % every curve ties.
            envelope_rows = [[f"{r:g}", _fmt(100 * b, ".1f"), n if b > 0 else ""]
                             for r, b, n in zip(radii, best, best_name)]
            lines += ["Envelope: the best sound certificate at each radius over every variant above.", "",
                      _markdown(["r", "certified accuracy %", "reached by"], envelope_rows, 0, 2), ""]
        lines += [f"![certified accuracy against radius, {dataset_name(key)}]({plot_path.name}) "
                  f"([PDF]({plot_path.with_suffix('.pdf').name}))", ""]
        latex.append(format_table(group, radii, fmt="latex", include_unsound=include_unsound,
                                  caption=f"Certified accuracy (%) at l2 radius r, {group_title}"))
    lines += ["## Sources", "", _runs_table(summaries), ""]
    markdown_path, latex_path = out / "report.md", out / "report.tex"
    markdown_path.write_text("\n".join(lines))
    scope = "every variant" if include_unsound else "sound certificates only"
    latex_path.write_text(f"% ssmooth-report: {_latex_escape(title)} ({scope})\n" + "\n\n".join(latex) + "\n")
    return {"markdown": str(markdown_path), "latex": str(latex_path), "plot": plots[0], "plots": plots,
            "pdfs": pdfs}
