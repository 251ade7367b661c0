"""ssmooth-report: one table (markdown and LaTeX) and one plot for a run folder or a whole sweep.

    ssmooth-report outputs/multirun/2024-05-01/12-00-00       # report.md, report.tex, certified_accuracy.png there
    ssmooth-report outputs/multirun/2024-05-01/12-00-00 --out reports/sigma_sweep --radii 0 0.5 1 1.5 2

Every summary.json under DIR is one job; the table has a row per job and variant, the plot a curve per job and
the envelope (best certified accuracy at each radius over the sweep). The table is also printed.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ssmooth.report import load_summaries, print_table, write_report

PROG = "ssmooth-report"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, or 2 with a message on stderr when DIR is missing or holds no run."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, metavar="DIR", help="a run folder or a sweep folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    parser.add_argument("--radii", type=float, nargs="+", default=None, metavar="R",
                        help="radii of the table (default: the first run's grid)")
    args = parser.parse_args(argv)
    if args.radii is not None and min(args.radii) < 0:
        parser.error(f"--radii must be >= 0, got {args.radii}")

    if not args.dir.is_dir():
        return _fail(f"{args.dir}: no such directory")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a skipped summary or a rows file at odds with it must be seen
        warnings.showwarning = lambda message, *_, **__: print(f"{PROG}: warning: {message}", file=sys.stderr)
        try:
            summaries = load_summaries(args.dir)
            if not summaries:
                return _fail(f"{args.dir}: no summary.json found (is it a run or sweep folder?)")
            paths = write_report(args.dir, args.out, radii=sorted(args.radii) if args.radii else None)
        except ValueError as err:  # a summary that breaks the contract, e.g. radii and values of unequal length
            return _fail(str(err))
    print_table(summaries, radii=sorted(args.radii) if args.radii else None)
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
