"""Plots of certified accuracy against radius: exact step curves from the rows, and the envelope."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ssmooth.report.curves import (
    ANY_INPUT,
    SCOPES,
    THIS_TEST_SET,
    UNSOUND_MARK,
    _as_list,
    _check_one_dataset,
    _curves,
    _grid_envelope,
)
from ssmooth.report.metrics import certified_accuracy, certified_accuracy_curve

PLOT_NAME = "certified_accuracy.png"
_LINESTYLES = ["-", (0, (5, 1)), "-.", (0, (3, 1, 1, 1, 1, 1))]


def plot_certified_accuracy(summaries, path, envelope: bool = True, title: str | None = None,
                            include_unsound: bool = False) -> dict:
    """Certified accuracy (%) against l2 radius: one curve per sound variant of every source (unsound ones
    dotted, only with ``include_unsound``) and, with ``envelope``, the best sound certificate at each radius,
    one envelope per scope (any input: thick dashed black; this test set: thick dotted black), drawn on
    top. Saves ``path`` (PNG) and the same name with ``.pdf``.

    A variant whose rows are at hand is drawn as its exact step curve (see ``certified_accuracy_curve``); else
    its summary grid is drawn as markers joined by lines. An envelope is exact when every sound curve of its
    scope is exact, else it is taken on the grid. Sources must share one dataset when ``envelope`` is on.
    Returns ``{"path", "pdf", "curves": {label: (x, y)}, "envelopes": {scope: (x, y)}, "envelope": the any-input
    envelope or None}`` with y in [0, 1].
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in threads

    summaries = _as_list(summaries)
    if envelope:
        _check_one_dataset(summaries)
    curves = _curves(summaries, include_unsound)
    drawn = _drawable(curves)
    x_end = 1.05 * max([0.25] + [float(xy[0][-1]) for xy, _, _ in drawn.values()])
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    _draw_curves(ax, drawn, x_end)
    envelopes = {}
    for scope in SCOPES if envelope else ():
        sound = [c for c in curves if c.sound is True and c.scope == scope]
        if sound:
            exact = all(c.rows is not None for c in sound)
            envelopes[scope] = _envelope_xy(sound, drawn, exact)
            _draw_envelope(ax, envelopes[scope], exact, x_end, scope)
    _finish(fig, ax, x_end, title, len(drawn) + len(envelopes))
    path = Path(path)
    pdf = _save(fig, path)
    curves_xy = {label: xy for label, (xy, _, _) in drawn.items()}
    return {"path": str(path), "pdf": str(pdf), "curves": curves_xy, "envelopes": envelopes,
            "envelope": envelopes.get(ANY_INPUT)}


def plot_run(summary: dict, run_dir, path=None, title: str | None = None) -> dict:
    """The plot of one finished run: the exact step curve of each sound certificate from the rows in
    ``run_dir`` (never grid points joined by lines, which would show accuracy between two radii that no point
    reaches), no envelope. Saves ``path`` (default ``run_dir/certified_accuracy.png``) and its PDF; returns
    what ``plot_certified_accuracy`` returns."""
    run_dir = Path(run_dir)
    located = {**summary, "path": str(run_dir)}  # where the rows files are
    return plot_certified_accuracy([located], path or run_dir / PLOT_NAME, envelope=False, title=title)


def _drawable(curves) -> dict:
    """label -> ((x, y), exact, curve): the exact step curve where the rows are at hand, else the summary's grid
    (a curve with no known value is left out)."""
    drawn = {}
    for curve in curves:
        if curve.rows is not None:
            drawn[curve.label] = (certified_accuracy_curve(curve.rows["radius"], curve.rows["correct"]), True, curve)
            continue
        radii = curve.summary.get("radii", [])
        known = [(float(r), v) for r, v in zip(radii, curve.values(radii)) if v is not None]
        if known:
            drawn[curve.label] = (tuple(map(np.asarray, zip(*known))), False, curve)
    return drawn


def _envelope_xy(sound, drawn, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """The best of the ``sound`` curves: exactly (at every breakpoint of any of them) or on their grids."""
    if exact:
        x = np.unique(np.concatenate([drawn[c.label][0][0] for c in sound if c.label in drawn]))
        y = np.max([certified_accuracy(c.rows["radius"], c.rows["correct"], x) for c in sound], axis=0)
        return x, y
    x = np.asarray(sorted({round(float(r), 10) for c in sound for r in c.summary.get("radii", [])}))
    y, _ = _grid_envelope(sound, x)
    return x[~np.isnan(y)], y[~np.isnan(y)]


def _draw_curves(ax, drawn: dict, x_end: float) -> None:
    for i, (label, ((x, y), exact, curve)) in enumerate(drawn.items()):
        style = {"color": f"C{i % 10}", "linewidth": 1.4, "zorder": 2,
                 "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)] if curve.sound is not False else ":",
                 # a long legend entry folds instead of running off the figure
                 "label": textwrap.fill(label if curve.sound is not False else f"{label} {UNSOUND_MARK}", 90)}
        if exact:  # y[i] holds on (x[i-1], x[i]]; 0 after the largest certified radius
            ax.step(np.append(x, x_end), 100 * np.append(y, 0.0), where="pre", **style)
        else:
            ax.plot(x, 100 * np.asarray(y), marker="o", markersize=3, **style)


# Both black (no curve is), told apart by their dashes.
_ENVELOPE_STYLES = {ANY_INPUT: {"color": "black", "linestyle": (0, (4, 2)), "linewidth": 2.4},
                    THIS_TEST_SET: {"color": "black", "linestyle": (0, (1, 1.5)), "linewidth": 2.0}}


def _draw_envelope(ax, xy, exact: bool, x_end: float, scope: str) -> None:
    x, y = xy
    label = f"envelope, {scope}: best sound certificate" + ("" if exact else " (on the grid)")
    # On top of the curves it bounds, so that it stays visible where it coincides with one of them.
    style = {**_ENVELOPE_STYLES[scope], "alpha": 0.85, "zorder": 3}
    if exact:
        ax.step(np.append(x, x_end), 100 * np.append(y, 0.0), where="pre", label=label, **style)
    else:
        ax.plot(x, 100 * y, label=label, **style)


def _finish(fig, ax, x_end: float, title: str | None, entries: int) -> None:
    ax.set_xlim(0, x_end)
    ax.set_ylim(0, 102)
    ax.set_xlabel(r"$\ell_2$ radius r")
    ax.set_ylabel("certified accuracy (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if entries > 6:
        # A long legend would hide the curves, or squeeze the axes beside it: it goes under them, one entry a
        # line, and the figure grows to hold it.
        fig.set_size_inches(7.5, 4.6 + 0.2 * (entries + 1))
        fig.legend(fontsize="small", loc="outside lower center")
    elif entries:
        ax.legend(fontsize="small", loc="upper right")


def _save(fig, path: Path) -> Path:
    """Saves ``path`` (PNG) and the same name with ``.pdf``; returns the PDF's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf = path.with_suffix(".pdf")
    fig.savefig(path, dpi=150)
    fig.savefig(pdf)
    return pdf
