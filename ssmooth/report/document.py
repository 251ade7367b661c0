"""The report of a set of sources: ``report.md`` (tables, envelopes, notes, plots, settings), ``report.tex`` and
a plot per dataset."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from ssmooth.report.curves import (
    UNSOUND_MARK,
    _curves,
    _describe,
    _is_sound,
    _name,
    _table_radii,
    _variants,
    dataset_name,
    envelopes,
    group_by_dataset,
    subset_note,
    title_of,
)
from ssmooth.report.metrics import UNKNOWN_DATASET, paired_difference
from ssmooth.report.plots import PLOT_NAME, plot_certified_accuracy
from ssmooth.report.sources import PUBLISHED, load_sources
from ssmooth.report.tables import _drop_empty_columns, _fmt, _latex_escape, _markdown, _table, format_table

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


_INTRO = ("Certified accuracy (%) at l2 radius r: share of ALL evaluated points whose smoothed prediction is "
          "correct with certified radius >= r (an abstain counts as wrong). ACR: mean over all points of the "
          "certified radius, 0 where wrong or abstained. Numbers are computed from the per-point rows where they "
          "are at hand; a blank cell is a radius off a run's recorded grid (nothing is interpolated). Sources of "
          "different datasets are never compared: each dataset has its own table, envelope and plot.")


def write_report(dir, out: str | os.PathLike | None = None, radii=None, labels: Mapping | None = None,
                 dataset: str | None = None, datasets: Mapping | None = None,
                 include_unsound: bool = False, summaries: list[dict] | None = None) -> dict:
    """Write ``report.md`` (tables, envelopes, notes, plots, settings), ``report.tex`` (a booktabs table per
    dataset, sound certificates only unless ``include_unsound``) and a plot per dataset (PNG and PDF) into
    ``out`` for every run, sweep and published log in ``dir`` (one path or a list; see ``load_sources`` for
    ``labels``, ``dataset`` and ``datasets``). ``out`` defaults to ``dir`` when it is one folder, and to a folder
    named after it beside one published log (see ``default_out``).

    ``summaries`` already loaded from ``dir`` by ``load_sources`` are used as they are.

    Returns ``{"markdown", "latex", "plot" (the first plot), "plots", "pdfs"}`` paths. Raises
    FileNotFoundError when a path is missing or nothing certified is found.
    """
    paths = [dir] if isinstance(dir, (str, os.PathLike)) else list(dir)
    if summaries is None:
        summaries = load_sources(paths, labels=labels, dataset=dataset, datasets=datasets)
    if not summaries:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: no summary.json and no published log found")
    out = _out_dir(paths, out)
    out.mkdir(parents=True, exist_ok=True)
    radii = _table_radii(summaries, radii)
    groups = group_by_dataset(summaries)
    title = title_of(summaries)
    lines = [f"# Certification report: {title}", "", f"{len(summaries)} source(s). {_INTRO}", ""]
    plots, pdfs, latex = [], [], []
    for key, group in groups.items():
        plot_path = out / _plot_name(key, len(groups) > 1)
        drawn = plot_certified_accuracy(group, plot_path, envelope=key != UNKNOWN_DATASET, title=title_of(group),
                                        include_unsound=include_unsound)
        plots.append(drawn["path"])
        pdfs.append(drawn["pdf"])
        lines += _dataset_section(key, group, radii, plot_path)
        latex.append(format_table(group, radii, fmt="latex", include_unsound=include_unsound,
                                  caption=f"Certified accuracy (%) at l2 radius r, {title_of(group)}"))
    lines += ["## Sources", "", _runs_table(summaries), ""]
    markdown_path, latex_path = out / "report.md", out / "report.tex"
    markdown_path.write_text("\n".join(lines))
    scope = "every variant" if include_unsound else "sound certificates only"
    latex_path.write_text(f"% ssmooth-report: {_latex_escape(title)} ({scope})\n" + "\n\n".join(latex) + "\n")
    return {"markdown": str(markdown_path), "latex": str(latex_path), "plot": plots[0], "plots": plots,
            "pdfs": pdfs}


def default_out(paths: list) -> Path | None:
    """Where a report goes when no ``out`` is given: the folder itself for one folder (a run or a sweep), the
    run folder for one ``summary.json``, a folder beside one published log named after it (``noise_0.25.tsv``
    -> ``noise_0.25_report/``); None for several sources."""
    if len(paths) != 1:
        return None
    path = Path(paths[0])
    if path.is_dir():
        return path
    return path.parent if path.name == "summary.json" else path.parent / f"{path.stem}_report"


def _out_dir(paths: list, out) -> Path:
    out = default_out(paths) if out is None else Path(out)
    if out is None:
        raise ValueError("say where to write the report (out) when there are several sources")
    return out


def _dataset_section(key: str, group: list[dict], radii, plot_path: Path) -> list[str]:
    """The lines of one dataset's section of report.md: notes, the full table, the envelope and the plot."""
    lines = [f"## {dataset_name(key)}", ""]
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
    if key != UNKNOWN_DATASET:
        lines += _envelope_section(group, radii) + _paired_section(group)
    lines += [f"![certified accuracy against radius, {dataset_name(key)}]({plot_path.name}) "
              f"([PDF]({plot_path.with_suffix('.pdf').name}))", ""]
    return lines


def _envelope_section(group: list[dict], radii) -> list[str]:
    """One envelope per scope, side by side: certificates for any input and for this test set never mix."""
    found = envelopes(group, radii)
    if not found:
        return []
    header, columns = ["r"], [[f"{r:g}" for r in radii]]
    for scope, (best, names) in found.items():
        header += [f"{scope} %", "reached by"]
        columns.append([_fmt(100 * b, ".1f") for b in best])
        # A curve is named only where it certifies something: at 0 % every curve ties.
        columns.append([n if b > 0 else "" for b, n in zip(best, names)])
    rows = [list(cells) for cells in zip(*columns)]
    text = (f"Envelope: the best sound certificate for {next(iter(found))} at each radius over every variant above."
            if len(found) == 1 else
            "Envelopes: the best sound certificate at each radius, one per scope (where the certificate holds): "
            "certificates for any input, and transductive certificates, which hold for this test set only. "
            "The two are never mixed.")
    right = {i for i, h in enumerate(header) if h != "reached by"}
    return [text, "", _markdown(header, rows, right=right), ""]


def _paired_section(group: list[dict]) -> list[str]:
    """Each sound certificate against the best single level (constant_best) of its run, or the only one of the
    dataset, point by point on the points both certified."""
    curves = [c for c in _curves(group, include_unsound=False) if c.rows is not None]
    baselines = [c for c in curves if c.kind == "constant_best"]
    rows = []
    for curve in curves:
        if curve in baselines:
            continue
        own = [b for b in baselines if b.summary is curve.summary]
        base = own[0] if own else baselines[0] if len(baselines) == 1 else None
        if base is None or not set(base.rows["idx"]) & set(curve.rows["idx"]):
            continue
        d = paired_difference(curve.rows, base.rows)
        rows.append([curve.job, curve.certificate, f"{base.job} {base.variant_name}", f"{d['mean']:+.4f}",
                     _fmt(d["se"], ".4f"), f"{d['better']} / {d['worse']}", str(d["num_points"])])
    if not rows:
        return []
    text = ("Against the best single level (constant_best, its level chosen on the evaluated points with their "
            "labels, which favours it): the mean difference of per-point certified radii (0 where wrong or "
            "abstained) on the points both certified, its standard error, and how many points gained or lost "
            "radius.")
    header = ["job", "certificate", "against", "ACR difference", "standard error", "better / worse", "points"]
    return [text, "", _markdown(header, rows, 3, 7), ""]
