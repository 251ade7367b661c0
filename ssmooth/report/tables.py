"""Tables of certified accuracy: markdown and LaTeX (every column) and the terminal (rich)."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ssmooth.report.curves import (
    UNKNOWN_SOUNDNESS_MARK,
    UNSOUND_MARK,
    _as_list,
    _caveat,
    _certificate,
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
        text += f" constant_best: Cohen's certificate at the best single level of the grid ({caveat}; this favours it)."
    return text


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
