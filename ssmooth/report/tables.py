"""Tables of certified accuracy: markdown and LaTeX (every column) and the terminal (rich)."""
from __future__ import annotations

import math
import re

from ssmooth.report.curves import (
    CHOSEN_ON_POINTS,
    UNKNOWN_SOUNDNESS_MARK,
    UNSOUND_MARK,
    _as_list,
    _caveat,
    _curves,
    _describe,
    _indices,
    _method,
    _sigma,
    _table_radii,
    _variants,
    dataset_name,
    group_by_dataset,
    subset_note,
)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(int(value) if spec == "d" else value, spec)  # JSON may hold 500.0 for a count


def _notes(curve) -> str:
    """What a result needs beside it: a sample-wise rule, its conflicts and how much radius it kept, and the
    other runs that hold the same certificate (shown once)."""
    variant, notes = curve.variant, []
    if "allocation" in variant:
        notes.append(f"allocation {variant['allocation']}")
    if "num_conflicting_pairs" in variant:
        notes.append(f"{variant['num_conflicting_pairs']} conflicting pairs")
    if "mean_r_over_R" in variant:
        notes.append(f"mean r/R {_fmt(variant['mean_r_over_R'], '.3f')}")
    if curve.repeated_in:
        notes.append(f"also certified, identically, by {', '.join(curve.repeated_in)} (shown once)")
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
            curve.certificate,
            *[_fmt(None if a is None else 100 * a, ".1f") for a in curve.values(radii)],
            _fmt(variant.get("acr"), ".4f"),
            _fmt(None if abstain is None else 100 * abstain, ".1f"),
            _fmt(variant.get("num_points"), "d"),
            *([_fmt(passes, ",.0f")] if cost else []),
            _notes(curve),
        ])
        sound.append(curve.sound)
    return header, rows, sound, (5, len(header) - 1)


def _markdown(header: list[str], rows: list[list[str]], numeric_from: int = 2, numeric_to: int | None = None,
              right: set[int] | None = None) -> str:
    """A markdown table; columns ``numeric_from`` to ``numeric_to`` (or those in ``right``) right-aligned."""
    numeric_to = len(header) if numeric_to is None else numeric_to
    right = set(range(numeric_from, numeric_to)) if right is None else right

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if i in right else "---" for i in range(len(header))]
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
    """The caption states what a reader needs: the measure, when shared the evaluated points, and how the best
    single level was chosen when it is in the table."""
    indices = {_indices(s) for s in group}
    if len(indices) == 1 and None not in indices:
        text += f" ({_describe(next(iter(indices)))} of the test set)"
    text += "; an abstain counts as wrong. ACR: average certified radius."
    caveats = dict.fromkeys(c for s in group for n, v in _variants(s) if (c := _caveat(n, v)))
    for caveat in caveats:
        text += (f" constant_best: Cohen's certificate at the best single level of the grid ({caveat}, with their "
                 "labels; this favours it).")
    return text


def print_table(summaries, radii=None, title: str | None = None, console=None) -> None:
    """A short table on the terminal (rich), one per dataset, within 120 columns: job, certificate (the run's
    headline marked *), where it holds, a few radii, ACR, abstain %, forward passes; unsound variants in red.
    A legend of the kinds and the notes go under it. Every column and radius is in ``format_table`` (report.md).
    """
    from rich.console import Console
    from rich.text import Text

    summaries = _as_list(summaries)
    radii = _few_radii(_table_radii(summaries, radii))
    groups = group_by_dataset(summaries)
    for key, group in groups.items():
        name = title or "certified accuracy (%) at l2 radius r"
        if len(groups) > 1:
            name += f" — {dataset_name(key)}"
        curves = _curves(group)
        table, natural = _terminal_table(curves, radii, name)
        # Within 120 columns: long job names fold; a narrower terminal wraps lines instead of losing numbers.
        out = console or Console(width=max(Console().width, natural))
        width = min(out.width, TERMINAL_WIDTH)
        out.print(table, crop=False, width=width)
        caption = _terminal_caption(curves, subset_note(group))
        if caption:  # under the table, as wide as the terminal allows (not squeezed to the table's width)
            out.print(Text(caption), crop=False, width=width)


TERMINAL_WIDTH = 120
_SHORT_KINDS = {"constant": "constant", "constant_best": "best level", "samplewise_raw": "raw levels",
                "per-point levels, unallocated": "raw levels", "inductive": "inductive",
                "published log": "published log"}
_LEGEND = {"constant": "constant: one σ", "best level": "best level: best grid σ†",  # one line for all kinds
           "transductive": "transductive: per-point σ", "raw levels": "raw levels: upper bound",
           "inductive": "inductive: σ selector", "published log": "published log: per-image log"}


def _few_radii(radii: list[float], at_most: int = 5) -> list[float]:
    """Every k-th radius from 0, so that at most about ``at_most`` remain (0, 0.5, 1, 1.5, 2 of CIFAR-10's grid)."""
    step = max(1, math.ceil(len(radii) / at_most)) if len(radii) > at_most + 1 else 1
    return radii[::step]


def _short_certificate(curve) -> str:
    """"transductive fill", "constant σ=0.5", "best level σ=0.25", "inductive", with " adaptive" for adaptive
    sampling."""
    kind = curve.kind
    if kind == "transductive" or (kind.startswith("samplewise_") and kind != "samplewise_raw"):
        text = f"transductive {curve.variant.get('allocation') or kind.removeprefix('samplewise_')}".strip()
    else:
        text = _SHORT_KINDS.get(kind, kind or curve.variant_name)
    sigma = curve.variant.get("sigma", curve.summary.get("sigma") if kind == "constant" else None)
    if sigma is not None and text in ("constant", "best level"):
        text += f" σ={float(sigma):g}"
    return text + (" adaptive" if curve.adaptive else "")


def _holds_for(curve) -> str:
    if curve.sound is None:
        return "not recorded"
    return "no: upper bound" if curve.sound is False else curve.scope + ("†" if _caveat(curve.variant_name,
                                                                                         curve.variant) else "")


def _compact(count) -> str:
    """4004000 -> "4.0M", 23880 -> "23.9k"."""
    if count is None:
        return ""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count:.0f}"


def _terminal_table(curves, radii, title: str):
    """The rich table and its natural width."""
    from rich import box
    from rich.table import Table
    from rich.text import Text  # cells as plain text: a name like "run [fixed]" is not markup

    several = _several(curves)
    header = ["job", "certificate", "holds for", *[f"{r:g}" for r in radii], "ACR", "abstain %", "passes"]
    rows = []
    for curve in curves:
        abstain = curve.variant.get("abstain_rate")
        rows.append([curve.job, _short_certificate(curve) + (" *" if curve.headline and id(curve.summary) in several
                                                             else ""), _holds_for(curve),
                     *[_fmt(None if a is None else 100 * a, ".1f") for a in curve.values(radii)],
                     _fmt(curve.variant.get("acr"), ".4f"), _fmt(None if abstain is None else 100 * abstain, ".1f"),
                     _compact(curve.forward_passes())])
    if not any(row[-1] for row in rows):  # no cost recorded
        header, rows = header[:-1], [row[:-1] for row in rows]
    # one space between columns (the box draws it): 120 columns hold job names of about 30 characters
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=0, pad_edge=False)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    table.add_column("job", overflow="fold", min_width=min(widths[0], 30))  # a longer name folds
    for i, column in enumerate(header[1:], start=1):
        # numbers are never cut (a cropped "0.45" for 0.454 would mislead)
        table.add_column(column, justify="left" if i < 3 else "right", no_wrap=True, min_width=widths[i])
    for curve, row in zip(curves, rows):
        table.add_row(*(Text(cell) for cell in row), style={False: "red", None: "yellow"}.get(curve.sound))
    return table, sum(w + 1 for w in widths) + 1


def _several(curves) -> set[int]:
    """The runs (by id of their summary) with more than one certificate shown: their headline is marked."""
    return {id(c.summary) for c in curves if not c.headline}


def _terminal_caption(curves, note: str | None) -> str | None:
    """The legend of the kinds shown, the marks, the notes of each row and the subset note."""
    several = _several(curves)
    legend = dict.fromkeys(t for c in curves for t in _LEGEND if _short_certificate(c).startswith(t))
    caption = ["; ".join(_LEGEND[t] for t in legend)] if legend else []
    if any(id(c.summary) in several for c in curves):
        caption.append("*: the run's headline certificate")
    if any(_caveat(c.variant_name, c.variant) for c in curves):
        caption.append(f"†: {CHOSEN_ON_POINTS}, with their labels (a favourable baseline)")
    caption += [f"{c.job} {_short_certificate(c)}: {_notes(c)}" for c in curves if _notes(c)]
    caption += [note] if note else []
    return "\n".join(caption) or None
