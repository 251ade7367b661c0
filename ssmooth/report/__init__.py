"""Certified accuracy, ACR, tables and plots for runs, sweeps and published per-image logs.

One module per job:
- ``metrics``: certified accuracy, ACR, summaries of rows, the standard radii (the only part certification
  imports);
- ``sources``: run folders, sweeps and published logs read into summaries;
- ``curves``: each source's certificate variants as curves, grouped by dataset, and the envelope;
- ``tables``: markdown, LaTeX and terminal tables;
- ``plots``: certified accuracy against radius;
- ``document``: ``report.md``, ``report.tex`` and the plots of a set of sources.

    from ssmooth.report import load_sources, write_report
    write_report(["outputs/sweeps/S", "cohen_logs/"], out="reports/cmp", labels={...}, dataset="cifar10")

Pure: numpy and pandas only; matplotlib (without pyplot, so no global backend) and rich load on first use.
"""
from ssmooth.report.curves import (
    ANY_INPUT,
    THIS_TEST_SET,
    UNKNOWN_SOUNDNESS_MARK,
    UNSOUND_MARK,
    dataset_name,
    envelope,
    envelopes,
    group_by_dataset,
    subset_note,
    title_of,
)
from ssmooth.report.document import write_report
from ssmooth.report.metrics import (
    ABSTAIN,
    UNKNOWN_DATASET,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_curve,
    dataset_key,
    paired_difference,
    radius_grid,
    read_rows,
    standard_radii,
    summarize_rows,
)
from ssmooth.report.plots import PLOT_NAME, plot_certified_accuracy, plot_run
from ssmooth.report.sources import LOG_COLUMNS, PUBLISHED, load_log, load_sources, load_summaries, read_log
from ssmooth.report.tables import format_table, print_table

__all__ = [
    "ABSTAIN",
    "ANY_INPUT",
    "LOG_COLUMNS",
    "PLOT_NAME",
    "PUBLISHED",
    "THIS_TEST_SET",
    "UNKNOWN_DATASET",
    "UNKNOWN_SOUNDNESS_MARK",
    "UNSOUND_MARK",
    "average_certified_radius",
    "certified_accuracy",
    "certified_accuracy_curve",
    "paired_difference",
    "dataset_key",
    "dataset_name",
    "envelope",
    "envelopes",
    "format_table",
    "group_by_dataset",
    "load_log",
    "load_sources",
    "load_summaries",
    "plot_certified_accuracy",
    "plot_run",
    "print_table",
    "radius_grid",
    "read_log",
    "read_rows",
    "standard_radii",
    "subset_note",
    "summarize_rows",
    "title_of",
    "write_report",
]
