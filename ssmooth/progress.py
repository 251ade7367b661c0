"""Progress bars that stay readable in a log file.

On a terminal this is tqdm's bar. When the output is a file (a SLURM job, ``> run.log``), tqdm's carriage returns
would pile every update onto one very long line; there the bar prints a plain line at most every
``FILE_INTERVAL_S`` seconds (and at the end) instead.
"""
from __future__ import annotations

import sys

FILE_INTERVAL_S = 30.0


class _LinePerUpdate:
    """A stream that turns each of tqdm's redraws into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**kwargs):
    """``tqdm(**kwargs)`` on a terminal; one line per ``FILE_INTERVAL_S`` seconds when stderr is not one."""
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", sys.stderr)
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(file=stream, **kwargs)
    return tqdm(file=_LinePerUpdate(stream), mininterval=FILE_INTERVAL_S, maxinterval=FILE_INTERVAL_S * 10,
                dynamic_ncols=False, ncols=100, ascii=True, **kwargs)
