"""Per-point certification rows (SPEC section 6): flushed as produced, resumable, keyed by dataset index."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ssmooth.report import read_rows  # noqa: F401  (re-exported: the one reader of row files)

ROW_COLUMNS = ("idx", "label", "predict", "radius", "correct", "sigma", "time")
SAMPLEWISE_COLUMNS = ROW_COLUMNS + ("radius_raw",)


class RowWriter:
    """Appends tab-separated rows to ``path`` and flushes each batch, so a killed run loses at most the batch
    in flight. Re-opening an existing file resumes it: a torn last line is cut off, and ``done`` holds the
    dataset indices already written so the caller can skip them."""

    def __init__(self, path: str | os.PathLike, columns=ROW_COLUMNS):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[int] = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._recover()
        else:
            with open(self.path, "w") as f:
                f.write("\t".join(self.columns) + "\n")
        self._file = open(self.path, "a")

    def _recover(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        header = lines[0].split("\t")
        if tuple(header) != self.columns:
            raise ValueError(
                f"{self.path} has columns {header}, expected {list(self.columns)}: it belongs to another kind of "
                "run; use a new output folder"
            )
        # Everything before the last newline is complete; the tail after it was torn by a kill.
        complete = [line for line in lines[1:-1] if line]
        torn = lines[-1] != ""
        for line in complete:
            self.done.add(int(line.split("\t", 1)[0]))
        if torn:
            with open(self.path, "w") as f:
                f.write("\n".join([lines[0], *complete]) + "\n")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            idx = int(row["idx"])
            if idx in self.done:
                continue  # never write a point twice (resume, DistributedSampler padding)
            self.done.add(idx)
            self._file.write("\t".join(_format(row[c]) for c in self.columns) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _format(value) -> str:
    # Full round-trip precision: rounding a radius to nearest could overstate a certificate.
    return repr(float(value)) if isinstance(value, float) else str(value)


def merge_rows(paths, out: str | os.PathLike) -> pd.DataFrame:
    """Merge per-rank row files into one, keyed by dataset index (drops DistributedSampler duplicates)."""
    frames = [pd.read_csv(p, sep="\t") for p in paths if Path(p).exists()]
    merged = pd.concat(frames).drop_duplicates("idx", keep="first").sort_values("idx").reset_index(drop=True)
    write_rows(merged, out)
    return merged


def write_rows(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    tmp = Path(str(path) + ".tmp")
    frame.to_csv(tmp, sep="\t", index=False)
    os.replace(tmp, path)


def write_summary(summary: dict, path: str | os.PathLike) -> None:
    """Write the summary JSON atomically (a reader never sees half a file)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    os.replace(tmp, path)
