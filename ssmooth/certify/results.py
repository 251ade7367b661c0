"""Per-point certification rows: flushed as produced, resumable, keyed by dataset index."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ssmooth.report.metrics import read_rows  # noqa: F401  (re-exported: the one reader of row files)

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
        with open(self.path, "rb") as f:
            data = f.read()
        # Bytes up to the last newline are complete rows; a kill can only tear what comes after it.
        end = data.rfind(b"\n") + 1
        header_end = data.find(b"\n") + 1
        if header_end == 0:
            # Not even the header is complete, so there is no row to lose: write the header again.
            with open(self.path, "w") as f:
                f.write("\t".join(self.columns) + "\n")
            return
        header = data[: header_end - 1].decode().split("\t")
        if tuple(header) != self.columns:
            raise ValueError(
                f"{self.path} has columns {header}, expected {list(self.columns)}: it belongs to another kind of "
                "run; use a new output folder"
            )
        for number, line in enumerate(data[header_end:end].split(b"\n")[:-1], start=2):
            fields = line.split(b"\t")
            if len(fields) != len(self.columns) or not fields[0].lstrip(b"-").isdigit():
                raise ValueError(f"{self.path}, line {number}: not a row of {len(self.columns)} fields: {line[:80]!r}")
            self.done.add(int(fields[0]))
        if end < len(data):
            # Cut the torn tail in place: one truncate never rewrites, and so never endangers, a complete row.
            os.truncate(self.path, end)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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
