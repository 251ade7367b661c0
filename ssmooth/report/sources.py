"""Reading what was certified: run folders, sweeps of runs, and published per-image logs.

- a run folder holds ``summary.json`` (dataset, settings, one entry per certificate variant) and the per-point
  rows (``certify.tsv``, ``certify_<variant>.tsv``); a sweep folder holds many run folders;
- a published log is a per-image TSV with the header ``idx label predict radius correct time`` (the format of
  Cohen et al., SmoothAdv and MACER; extra columns are ignored). It records no dataset: the caller names it.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ssmooth.report.metrics import ABSTAIN, dataset_key, read_rows, standard_radii, summarize_rows

LOG_COLUMNS = ("idx", "label", "predict", "radius", "correct")  # "time" and any other column are optional
PUBLISHED = "published"  # the variant name of a published log, and its summary's "source"


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
    """Two sources with one name get their relative folder (or file) appended, so rows and curves stay
    distinct: the run's own folder name when it was given itself, and its full path if that still repeats."""
    for where in (lambda s: s.get("_relative") if s.get("_relative") not in (None, ".") else Path(s["path"]).name,
                  lambda s: s.get("rows_file") or s["path"]):
        names = [s["name"] for s in summaries]
        for summary in summaries:
            if names.count(summary["name"]) > 1:
                summary["name"] = f"{summary['name']} [{where(summary)}]"
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
        runs, logs = _scan(root)
        for file in runs:
            if _first_visit(file, seen):
                summary = _read_summary(file, root)
                if summary is not None:
                    summaries.append(_as_run(summary, file, root, label, chosen, several=len(runs) > 1))
        for file in logs:
            if _first_visit(file, seen):
                name = file.stem if not label else label if len(logs) == 1 else f"{label}/{file.stem}"
                summary = load_log(file, name=name, dataset=chosen or dataset)
                summary["_relative"] = file.relative_to(root).as_posix() if root.is_dir() else file.name
                summaries.append(summary)
    return _unique_names(summaries)


def _first_visit(file: Path, seen: set) -> bool:
    """True the first time a file is reached, through whatever links."""
    real = os.path.realpath(file)
    if real in seen:
        return False
    seen.add(real)
    return True


def _scan(root: Path) -> tuple[list[Path], list[Path]]:
    """The ``summary.json`` files and the published logs (TSVs outside run folders) under ``root``."""
    if root.is_file() and root.name != "summary.json":
        return [], [root]
    files = [root] if root.is_file() else _walk(root)
    runs = [f for f in files if f.name == "summary.json"]
    run_dirs = {f.parent for f in runs}
    logs = []
    for f in files:
        if f.suffix != ".tsv" or any(d == f.parent or d in f.parents for d in run_dirs):
            continue
        if f.name.startswith("certify"):
            warnings.warn(f"skipping {f}: rows of a run without summary.json (unfinished?)", stacklevel=3)
        elif _is_log(f):
            logs.append(f)
    return runs, logs


def _as_run(summary: dict, file: Path, root: Path, label: str | None, chosen: str | None, several: bool) -> dict:
    """A run's summary checked against the dataset given for its path, and named after its label."""
    if chosen and dataset_key(chosen) != dataset_key(summary.get("dataset")):
        raise ValueError(f"{file}: the run recorded dataset {summary.get('dataset')!r}, "
                         f"not {chosen!r} as given for {root}")
    if label:
        rel = summary["_relative"]
        summary["name"] = label if rel == "." or not several else f"{label}/{rel}"
    return summary
