"""ssmooth-report: tables (markdown and LaTeX) and plots for runs, sweeps and published per-image logs.

    ssmooth-report outputs/sweeps/S                                   # report.md, report.tex, plots into S
    ssmooth-report cohen/noise_0.25.tsv --dataset cifar10             # ... into cohen/noise_0.25_report/
    ssmooth-report outputs/sweeps/S --out reports/s --radii 0 0.5 1 1.5 2
    ssmooth-report outputs/runs/R cohen_logs/ --dataset cifar10 --out reports/vs_cohen
    ssmooth-report outputs/runs/R --label "Cohen 0.25@cifar10=cohen/noise_0.25.tsv" --out reports/vs_cohen

A PATH is a run folder (it holds summary.json), a sweep folder (many runs), a published log (a TSV with the
header "idx label predict radius correct time"; extra columns are ignored) or a folder of logs; symlinks are
followed. Logs are summarized from their rows. Sources are compared only within one dataset: each dataset has
its own table, envelope and plot, and a note says when two sources were certified on different test points.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ssmooth.report import group_by_dataset, load_sources, print_table, title_of, write_report
from ssmooth.report.document import default_out

PROG = "ssmooth-report"

EPILOG = """\
Published logs record no dataset, and none is guessed: say it with --dataset (every log given none) or per
path with --label NAME@DATASET=PATH. A log without a dataset is reported in an "unknown dataset" section, with
no envelope, never mixed into another dataset's comparison. Runs record their dataset in summary.json.

The radius grid is the union of the standard grids of the datasets present (CIFAR-10 0 to 2.25 by 0.25,
MNIST 0 to 4 by 0.5, ImageNet 0 to 3 by 0.5, others 0 to 2 by 0.25), or --radii; the terminal shows a few of
them, report.md and report.tex all. An envelope is the best SOUND certificate at each radius over every variant
of every source on that dataset, one per scope: certificates for any input, and transductive ones (this test
set only), never mixed. Per-point radii before the transductive allocation are an upper bound, marked in
report.md and left out of report.tex and the plots unless --unsound.

Exit status: 0, or 2 with one line on stderr for a missing path, a bad log, or nothing to report."""


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _parse_label(text: str) -> tuple[str, str | None, Path]:
    """NAME[@DATASET]=PATH, split at the first "=" (a name holds no "="; a path may)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--label {text!r}: expected NAME=PATH or NAME@DATASET=PATH")
    name, at, dataset = name.rpartition("@") if "@" in name else (name, "", "")
    if at and not (name and dataset):
        raise ValueError(f"--label {text!r}: expected NAME@DATASET=PATH with both NAME and DATASET")
    return name, dataset or None, Path(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="*", metavar="PATH",
                        help="run folders, sweep folders, published logs (TSV) or folders of logs")
    parser.add_argument("--label", action="append", default=[], metavar="NAME[@DATASET]=PATH",
                        help="add PATH (if not given already) and name its curve NAME; @DATASET names the "
                             "dataset of a published log. Repeatable")
    parser.add_argument("--dataset", default=None, metavar="DATASET",
                        help="dataset of every published log that --label gives none (e.g. cifar10)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default, for one PATH: that folder, or beside a published "
                             "log a folder named after it, e.g. noise_0.25_report/)")
    parser.add_argument("--radii", type=float, nargs="+", default=None, metavar="R",
                        help="radii of the tables (default: the union of the datasets' standard grids)")
    parser.add_argument("--unsound", action="store_true",
                        help="also put unsound upper bounds in report.tex and the plots (dotted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, or 2 with a message on stderr (missing path, bad log, nothing found)."""
    args = _parser().parse_args(argv)
    if args.radii is not None and min(args.radii) < 0:
        return _fail(f"--radii must be >= 0, got {args.radii}")
    try:
        labelled = [_parse_label(text) for text in args.label]
    except ValueError as err:
        return _fail(str(err))
    paths = list(dict.fromkeys([*args.paths, *(path for _, _, path in labelled)]))
    if not paths:
        return _fail("give at least one PATH (a run or sweep folder, or a published log)")
    for path in paths:
        if not path.exists():
            return _fail(f"{path}: no such file or directory")
    out = args.out or default_out(paths)
    if out is None:
        return _fail("--out is needed when there are several sources (it names the folder to write into)")
    labels = {path: name for name, _, path in labelled}
    datasets = {path: dataset for _, dataset, path in labelled if dataset}
    radii = sorted(args.radii) if args.radii else None

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a skipped summary or a rows file at odds with it must be seen
        warnings.showwarning = lambda message, *_, **__: print(f"{PROG}: warning: {message}", file=sys.stderr)
        try:
            summaries = load_sources(paths, labels=labels, dataset=args.dataset, datasets=datasets)
            if not summaries:
                return _fail(f"{', '.join(map(str, paths))}: no summary.json and no published log found "
                             "(is it a run or sweep folder, or a TSV with the header "
                             "'idx label predict radius correct time'?)")
            written = write_report(paths, out, radii=radii, include_unsound=args.unsound, summaries=summaries)
        except (ValueError, FileNotFoundError) as err:  # a bad log, a summary that breaks the contract
            return _fail(str(err))
        except OSError as err:  # e.g. the folder beside a log is not writable
            return _fail(f"cannot write the report into {out}: {err.strerror or err} (choose a folder with --out)")
        for key, group in group_by_dataset(summaries).items():
            print_table(group, radii=radii, title=f"{title_of(group)}: certified accuracy (%) at l2 radius r")
    print(f"report written into {out}:")
    for path in [written["markdown"], written["latex"], *written["plots"], *written["pdfs"]]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
