"""Certified accuracy, ACR, tables and plots for one run or a whole sweep (SPEC sections 1 and 6).

Certified accuracy at radius r is the share of ALL evaluated points whose smoothed prediction is correct with
certified radius >= r; an abstain counts as wrong. ACR is the mean over all points of radius * [correct].

A run folder holds ``summary.json`` (the source of truth for tables) and the per-point rows
(``certify.tsv`` or ``certify_<variant>.tsv``), which only serve to draw exact step curves.

    from ssmooth.report import load_summaries, format_table, write_report
    print(format_table(load_summaries("outputs/multirun/2024-05-01/12-00-00")))
    write_report("outputs/multirun/2024-05-01/12-00-00")  # report.md, report.tex, certified_accuracy.png

Pure: numpy and pandas only; matplotlib (without pyplot, so no global backend) and rich load on first use.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "average_certified_radius",
    "certified_accuracy",
    "certified_accuracy_curve",
    "envelope",
    "format_table",
    "load_summaries",
    "plot_certified_accuracy",
    "print_table",
    "read_rows",
    "standard_radii",
    "summarize_rows",
    "write_report",
]

ABSTAIN = -1  # same value as ssmooth.certify.ABSTAIN; importing ssmooth.certify would load torch
UNSOUND_MARK = "(unsound upper bound)"
UNKNOWN_SOUNDNESS_MARK = "(soundness not recorded)"
PLOT_NAME = "certified_accuracy.png"


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


def standard_radii(dataset: str) -> list[float]:
    """The radii every table reports (SPEC section 6).

    cifar10: 0 to 2.25 by 0.25 (Cohen et al.'s CIFAR-10 table); mnist: 0 to 4 by 0.5; imagenet: 0 to 3 by 0.5
    (Cohen et al.'s ImageNet table); anything else (e.g. digits, 8x8 images whose pixel vectors have norm at
    most 8): 0 to 2 by 0.25, which covers the 3.81 sigma that n = 100000 samples can certify for sigma <= 0.5.
    """
    key = re.sub(r"[^a-z0-9]", "", dataset.lower())
    stop, step = {"cifar10": (2.25, 0.25), "mnist": (4.0, 0.5), "imagenet": (3.0, 0.5)}.get(key, (2.0, 0.25))
    # Multiples of the step, rounded, so that 0.75 is exactly 0.75 and "radius >= r" is not off by one ulp.
    return [round(i * step, 10) for i in range(int(round(stop / step)) + 1)]


# ---------------------------------------------------------------------------------------------------- loading


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """Rows of a certification TSV, one per dataset index (first kept: a DistributedSampler pads with
    duplicates), sorted by index. Mirrors ``ssmooth.certify.results.read_rows`` without loading torch."""
    frame = pd.read_csv(path, sep="\t")
    return frame.drop_duplicates("idx", keep="first").sort_values("idx").reset_index(drop=True)


def _natural_key(text: str):
    """Sort "s0.12" < "s0.25" < "s0.5" < "s1.0" and "job2" < "job10": numbers compare as numbers."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)]


def load_summaries(dir: str | os.PathLike) -> list[dict]:
    """Every ``summary.json`` under a run or sweep folder (searched recursively), sorted by name.

    Each summary gets ``path`` (its run folder) and, where it has none, ``name`` (the run folder relative to
    ``dir``; the folder's own name when ``dir`` is the run). Two runs with the same name get their relative
    folder appended so that table rows stay distinct. A summary that is not valid JSON is skipped with a
    warning naming it. Raises FileNotFoundError when ``dir`` does not exist.
    """
    root = Path(dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    files = [root] if root.is_file() else sorted(root.rglob("summary.json"))
    summaries = []
    for file in files:
        try:
            summary = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            warnings.warn(f"skipping {file}: {err}", stacklevel=2)
            continue
        run_dir = file.parent
        relative = run_dir.relative_to(root).as_posix() if root.is_dir() else "."
        summary["path"] = str(run_dir)
        summary["name"] = summary.get("name") or (run_dir.resolve().name if relative == "." else relative)
        summary["_relative"] = relative
        summaries.append(summary)
    names = [s["name"] for s in summaries]
    for summary in summaries:
        if names.count(summary["name"]) > 1:
            summary["name"] = f"{summary['name']} [{summary['_relative']}]"
    for summary in summaries:
        del summary["_relative"]
    return sorted(summaries, key=lambda s: (_natural_key(s["name"]), s["path"]))


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


def _is_sound(variant: Mapping) -> bool | None:
    sound = variant.get("sound")
    return None if sound is None else bool(sound)


def _value_at(summary: Mapping, variant: Mapping, r: float) -> float | None:
    """The variant's certified accuracy at radius r if its summary has r on its grid, else None (no
    interpolation: a value between two grid radii is not known from the summary)."""
    radii, values = summary.get("radii", []), variant.get("certified_accuracy", [])
    if len(radii) != len(values):
        raise ValueError(f"{_name(summary)}: {len(values)} certified accuracies for {len(radii)} radii")
    for radius, value in zip(radii, values):
        if math.isclose(radius, r, rel_tol=1e-9, abs_tol=1e-9):
            return None if value is None else float(value)
    return None


def _table_radii(summaries, radii) -> list[float]:
    if radii is not None:
        return [float(r) for r in radii]
    if not summaries:
        return []
    first = summaries[0]
    return [float(r) for r in first.get("radii") or standard_radii(str(first.get("dataset", "")))]


# ---------------------------------------------------------------------------------------------------- tables


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(int(value) if spec == "d" else value, spec)  # JSON may hold 500.0 for a count


def _notes(variant: Mapping) -> str:
    """What SPEC section 4 asks beside every sample-wise result."""
    notes = []
    if "allocation" in variant:
        notes.append(f"allocation {variant['allocation']}")
    if "num_conflicting_pairs" in variant:
        notes.append(f"{variant['num_conflicting_pairs']} conflicting pairs")
    if "mean_r_over_R" in variant:
        notes.append(f"mean r/R {_fmt(variant['mean_r_over_R'], '.3f')}")
    return ", ".join(notes)


def _table(summaries, radii) -> tuple[list[str], list[list[str]], list[bool | None]]:
    """Header, rows of cell texts (one per job and variant) and each row's soundness."""
    header = ["job", "variant", *[f"r={r:g}" for r in radii], "ACR", "abstain %", "points", "notes"]
    rows, sound = [], []
    for summary in summaries:
        for variant_name, variant in _variants(summary):
            is_sound = _is_sound(variant)
            mark = {False: f" {UNSOUND_MARK}", None: f" {UNKNOWN_SOUNDNESS_MARK}"}.get(is_sound, "")
            accuracies = [_value_at(summary, variant, r) for r in radii]
            abstain = variant.get("abstain_rate")
            rows.append([
                _name(summary),
                variant_name + mark,
                *[_fmt(None if a is None else 100 * a, ".1f") for a in accuracies],
                _fmt(variant.get("acr"), ".3f"),
                _fmt(None if abstain is None else 100 * abstain, ".1f"),
                _fmt(variant.get("num_points"), "d"),
                _notes(variant),
            ])
            sound.append(is_sound)
    return header, rows, sound


def _markdown(header: list[str], rows: list[list[str]], numeric_from: int = 2, numeric_to: int | None = None) -> str:
    numeric_to = len(header) if numeric_to is None else numeric_to

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if numeric_from <= i < numeric_to else "---" for i in range(len(header))]
    return "\n".join([line(header), "|" + "|".join(align) + "|", *[line(row) for row in rows]])


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                                   "\\": r"\textbackslash{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def _latex(header: list[str], rows: list[list[str]], numeric_from: int = 2, numeric_to: int | None = None) -> str:
    numeric_to = len(header) if numeric_to is None else numeric_to
    spec = "".join("r" if numeric_from <= i < numeric_to else "l" for i in range(len(header)))

    def line(cells):
        return " & ".join(_latex_escape(c) for c in cells) + r" \\"

    return "\n".join([
        r"% needs \usepackage{booktabs}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        line(header),
        r"\midrule",
        *[line(row) for row in rows],
        r"\bottomrule",
        r"\end{tabular}",
    ])


def format_table(summaries, radii=None, fmt: str = "markdown") -> str:
    """One row per (job, variant): certified accuracy in % at each radius, ACR, abstain %, points, and the
    allocation notes of sample-wise variants; unsound variants carry "(unsound upper bound)".

    ``radii`` defaults to the first summary's grid. Values come from the summaries only: a radius missing from
    a job's grid leaves its cell blank (nothing is interpolated). ``fmt`` is "markdown" or "latex".
    """
    if isinstance(summaries, Mapping):
        summaries = [summaries]
    radii = _table_radii(summaries, radii)
    header, rows, _ = _table(summaries, radii)
    numeric_to = len(header) - 1  # every column but job, variant and notes is a number
    if fmt == "markdown":
        return _markdown(header, rows, numeric_to=numeric_to)
    if fmt == "latex":
        return _latex(header, rows, numeric_to=numeric_to)
    raise ValueError(f'fmt must be "markdown" or "latex", got {fmt!r}')


def print_table(summaries, radii=None, title: str | None = None, console=None) -> None:
    """The table of ``format_table`` on the terminal with rich (unsound variants in red), squeezed for width:
    radius headers are bare numbers and the sample-wise notes go under the table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if isinstance(summaries, Mapping):
        summaries = [summaries]
    radii = _table_radii(summaries, radii)
    header, rows, sound = _table(summaries, radii)
    header[2:2 + len(radii)] = [f"{r:g}" for r in radii]
    notes = [f"{row[0]} {row[1]}: {row[-1]}" for row in rows if row[-1]]
    table = Table(title=title or "certified accuracy (%) at l2 radius r", title_justify="left",
                  caption="\n".join(notes) or None, caption_justify="left", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    for i, column in enumerate(header[:-1]):
        number = i >= 2
        longest = max([len(column)] + [len(row[i]) for row in rows])
        # numbers are never cut (a cropped "0.45" for 0.454 would mislead); names fold instead
        table.add_column(column, justify="right" if number else "left", no_wrap=True, min_width=longest)
    for row, is_sound in zip(rows, sound):
        table.add_row(*row[:-1], style={False: "red", None: "yellow"}.get(is_sound))
    if console is None:
        # On a narrow terminal (or a log file: 80 columns) rich would squeeze or drop whole columns; print the
        # table at its natural width and let long lines wrap instead of losing names or numbers.
        natural = sum(column.min_width + 2 for column in table.columns) + 2
        console = Console(width=max(Console().width, natural))
    console.print(table, crop=False)


def envelope(summaries, radii=None) -> tuple[np.ndarray, list[str | None]]:
    """Best certified accuracy at each radius (default: the first summary's grid) over the jobs' headline
    variants, and which job reaches it, from the summaries.

    Only sound headline variants count (an upper bound is no certificate); NaN and None where no job has
    the radius on its grid.
    """
    if isinstance(summaries, Mapping):
        summaries = [summaries]
    return _grid_envelope(summaries, _table_radii(summaries, radii))


def _grid_envelope(summaries, radii) -> tuple[np.ndarray, list[str | None]]:
    best = np.full(len(radii), np.nan)
    best_name: list[str | None] = [None] * len(radii)
    for summary in summaries:
        variants = _variants(summary)
        if not variants or _is_sound(variants[0][1]) is False:
            continue
        for i, r in enumerate(radii):
            value = _value_at(summary, variants[0][1], r)
            if value is not None and not value <= best[i]:  # "not <=" so that NaN is beaten
                best[i], best_name[i] = value, _name(summary)
    return best, best_name


# ---------------------------------------------------------------------------------------------------- plot


def _main_rows(summary: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """(radius, correct) of the headline variant from the run's rows, if a rows file reproduces the summary.

    The rows of a variant live in ``certify_<variant>.tsv`` or ``certify.tsv`` (column ``radius``, or
    ``radius_raw`` for unallocated sample-wise radii); the one whose numbers equal the summary's is used, so
    a half-written or unrelated rows file never draws a curve that disagrees with the table.
    """
    variants = _variants(summary)
    if "path" not in summary or not variants:
        return None
    variant_name, variant = variants[0]
    run_dir = Path(summary["path"])
    candidates = [p for p in (run_dir / f"certify_{variant_name}.tsv", run_dir / "certify.tsv") if p.is_file()]
    for path in candidates:
        rows = read_rows(path)
        for column in ("radius", "radius_raw"):
            if column not in rows:
                continue
            got = summarize_rows((rows[column], rows["correct"], rows["predict"]), summary.get("radii", []))
            if got["num_points"] == variant.get("num_points") and np.allclose(
                got["certified_accuracy"], variant.get("certified_accuracy", []), rtol=0, atol=1e-9
            ):
                correct = rows["correct"].to_numpy().astype(bool) & (rows["predict"].to_numpy() != ABSTAIN)
                return rows[column].to_numpy(dtype=float), correct
    if candidates:
        warnings.warn(
            f"{_name(summary)}: no rows in {', '.join(map(str, candidates))} reproduce summary.json; "
            "plotting the summary's grid instead",
            stacklevel=3,
        )
    return None


def plot_certified_accuracy(summaries, path, envelope: bool = True, title: str | None = None) -> dict:
    """Certified accuracy against l2 radius: one curve per job (its headline variant) and, with ``envelope``,
    the best over the jobs at each radius as a thick dashed black line, as in Cohen et al.'s figures. Saves
    a PNG to ``path``.

    A job whose rows are at hand is drawn as its exact step curve (see ``certified_accuracy_curve``); else
    its summary grid is drawn as markers joined by lines. The envelope is exact when every job is exact,
    else it is taken on the grid. Unsound headline variants are drawn dotted and left out of the envelope.
    Returns ``{"path", "curves": {name: (x, y)}, "envelope": (x, y) or None}``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in threads

    if isinstance(summaries, Mapping):
        summaries = [summaries]
    curves, exact, grid_jobs, drawn = {}, {}, [], []
    for summary in summaries:
        variants = _variants(summary)
        if not variants:
            continue
        name, variant = _name(summary), variants[0][1]
        sound = _is_sound(variant) is not False
        rows = _main_rows(summary)
        if rows is not None:
            curves[name] = certified_accuracy_curve(*rows)
            if sound:
                exact[name] = rows
        else:
            known = [(float(r), _value_at(summary, variant, r)) for r in summary.get("radii", [])]
            known = [(r, v) for r, v in known if v is not None]
            if not known:
                continue
            curves[name] = tuple(map(np.asarray, zip(*known)))
            if sound:
                grid_jobs.append(summary)
        label = name if len(variants) == 1 else f"{name} ({variants[0][0]})"
        drawn.append((name, label if sound else f"{label} {UNSOUND_MARK}", sound, rows is not None))

    envelope_xy, envelope_exact = None, not grid_jobs
    if envelope and (exact or grid_jobs):
        if envelope_exact:
            x = np.unique(np.concatenate([curves[name][0] for name in exact]))
            y = np.max([certified_accuracy(radius, correct, x) for radius, correct in exact.values()], axis=0)
        else:
            x = np.asarray(sorted({round(float(r), 10) for s in grid_jobs for r in s.get("radii", [])}))
            y, _ = _grid_envelope(grid_jobs, x)
            for radius, correct in exact.values():  # exact jobs are known at every radius
                y = np.fmax(y, certified_accuracy(radius, correct, x))
            x, y = x[~np.isnan(y)], y[~np.isnan(y)]
        envelope_xy = (x, y)

    x_end = 1.05 * max([0.25] + [float(x[-1]) for x, _ in curves.values()])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, label, sound, is_exact) in enumerate(drawn):
        x, y = curves[name]
        style = {"color": f"C{i % 10}", "linestyle": "-" if sound else ":", "linewidth": 1.3, "label": label}
        if is_exact:  # y[i] holds on (x[i-1], x[i]]; 0 after the largest certified radius
            ax.step(np.append(x, x_end), np.append(y, 0.0), where="pre", **style)
        else:
            ax.plot(x, y, marker="o", markersize=3, **style)
    if envelope_xy is not None:
        x, y = envelope_xy
        style = {"color": "black", "linestyle": "--", "linewidth": 3, "zorder": 1.5}  # under the job curves
        if envelope_exact:
            ax.step(np.append(x, x_end), np.append(y, 0.0), where="pre", label="envelope (best over jobs)", **style)
        else:
            ax.plot(x, y, label="envelope (best over jobs, on the grid)", **style)
    ax.set_xlim(0, x_end)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(r"radius ($\ell_2$)")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if drawn:
        outside = len(drawn) > 8  # a long legend would hide the curves
        ax.legend(fontsize="small", loc="upper left" if outside else "upper right",
                  bbox_to_anchor=(1.01, 1.0) if outside else None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return {"path": str(path), "curves": curves, "envelope": envelope_xy}


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
    """Which test points were evaluated (SPEC section 1: results differ by several points between subsets)."""
    points = summary.get("points") or {}
    if not points:
        return ""
    split, skip = points.get("split", "test"), points.get("skip", 1)
    selection = f"{split}[::{int(skip)}]" if skip and skip != 1 else split
    limit = points.get("max", -1)
    if limit is not None and limit >= 0:
        selection += f", max {_fmt(limit, 'd')}"
    count = points.get("count")
    return selection if count is None else f"{_fmt(count, 'd')} of {selection}"


def _runs_table(summaries) -> str:
    header = ["job", "dataset", "model", "objective", "sigma policy", "sigma", "n0", "n", "alpha", "points",
              "wall time"]
    rows = [[
        _name(s), s.get("dataset", ""), s.get("model", ""), s.get("objective", ""), s.get("sigma_policy", ""),
        _fmt(s.get("sigma"), "g"), _fmt(s.get("n0"), "d"), _fmt(s.get("n"), "d"), _fmt(s.get("alpha"), "g"),
        _points(s), _duration(s.get("wall_time_s")),
    ] for s in summaries]
    return _markdown(header, rows, numeric_from=5, numeric_to=9)


def write_report(dir: str | os.PathLike, out: str | os.PathLike | None = None, radii=None) -> dict:
    """Write ``report.md`` (tables and the plot), ``report.tex`` (the table) and ``certified_accuracy.png``
    for every run under ``dir`` into ``out`` (default ``dir``). Returns ``{"markdown", "latex", "plot"}``
    paths. Raises FileNotFoundError when ``dir`` is missing or holds no ``summary.json``."""
    summaries = load_summaries(dir)
    if not summaries:
        raise FileNotFoundError(f"{dir}: no summary.json found (is it a run or sweep folder?)")
    out = Path(dir if out is None else out)
    out.mkdir(parents=True, exist_ok=True)
    radii = _table_radii(summaries, radii)
    title = Path(dir).resolve().name

    plot_path = out / PLOT_NAME
    plot_certified_accuracy(summaries, plot_path, envelope=True, title=title)

    best, best_name = envelope(summaries, radii)
    # A job is named only where it certifies something: at 0 % every job ties.
    envelope_rows = [[f"{r:g}", _fmt(100 * b, ".1f"), n if b > 0 else ""] for r, b, n in zip(radii, best, best_name)]
    any_unsound = any(_is_sound(v) is False for s in summaries for _, v in _variants(s))
    lines = [
        f"# Certification report: {title}",
        "",
        f"{len(summaries)} run(s) under `{Path(dir)}`. Certified accuracy (%) at l2 radius r: share of ALL "
        "evaluated points whose smoothed prediction is correct with certified radius >= r (an abstain counts "
        "as wrong). ACR: mean over all points of the certified radius, 0 where wrong or abstained. A blank "
        "cell: that radius is not on the job's grid (nothing is interpolated).",
        "",
        format_table(summaries, radii, fmt="markdown"),
        "",
    ]
    if any_unsound:
        lines += [f"Variants marked {UNSOUND_MARK} list sample-wise radii before allocation: an upper bound, "
                  "not a certificate (SPEC section 4).", ""]
    lines += [
        "## Envelope",
        "",
        "Best certified accuracy at each radius over the jobs' headline variants (sound ones only).",
        "",
        _markdown(["r", "certified accuracy %", "job"], envelope_rows, numeric_from=0, numeric_to=2),
        "",
        f"![certified accuracy against radius]({PLOT_NAME})",
        "",
        "## Runs",
        "",
        _runs_table(summaries),
        "",
    ]
    markdown_path, latex_path = out / "report.md", out / "report.tex"
    markdown_path.write_text("\n".join(lines))
    latex_path.write_text(
        f"% ssmooth-report {_latex_escape(title)}: certified accuracy (%) at l2 radius r\n"
        + format_table(summaries, radii, fmt="latex") + "\n"
    )
    return {"markdown": str(markdown_path), "latex": str(latex_path), "plot": str(plot_path)}
