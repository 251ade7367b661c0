"""What runs on each rank or shard when certification is spread over processes, GPUs, nodes or cluster jobs.

  split   part K of N certifies the points at positions K, K + N, K + 2N, ... of the certified subset
          (positions in the subset, so every part gets the same share of easy and hard points);
  rows    each part writes its own folder: the usual row files (flushed, resumable) and ``part.json``, which
          records the part, the dataset indices it owes and the fingerprint of what produced its rows (the run
          folder fingerprint of ``ssmooth.certify.runfolder``, plus the kind of device that drew the noise);
  merge   one process reads every part, refuses a missing, incomplete, duplicated or foreign part, keeps each
          dataset index exactly once, refuses a gap, and writes the merged row files; the caller then runs the
          allocation once over all points, verifies it and writes the summary.

Ranks of one job (``distributed=ddp``) and independent jobs (``certify.num_shards``) are both parts: the same
split, the same files, the same merge. Every point draws its noise from its own streams (dataset index, seed,
purpose), so the merged rows equal those of one process certifying every point.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ssmooth.certify.results import read_rows, write_rows
from ssmooth.certify.runfolder import OUTPUT_PATTERNS, diff_fingerprints, holds_rows

PART_RECORD = "part.json"


class MergeError(ValueError):
    """A part folder cannot be merged; the message names the folder and what is wrong."""


def part_positions(num_points: int, num_parts: int, part: int) -> list[int]:
    """Positions in the certified subset that part ``part`` of ``num_parts`` certifies."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part {part} of {num_parts}: need 0 <= part < num_parts")
    return list(range(part, num_points, num_parts))


def write_record(folder: Path, record: dict) -> None:
    tmp = folder / (PART_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder / PART_RECORD)


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / PART_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def check_fingerprint(folder: Path, found: dict, expected: dict) -> None:
    """Raise MergeError naming the first setting in which ``found`` differs from ``expected`` (fingerprints of
    ``ssmooth.certify.runfolder.fingerprint``)."""
    differ = diff_fingerprints(found, expected)
    if differ:
        key = differ[0]
        raise MergeError(f"{folder} was certified with {key}={found.get(key)!r}, this run has "
                         f"{key}={expected.get(key)!r}: it belongs to another certification")


def start_part(folder: Path, *, part: int, num_parts: int, indices: Sequence[int], fp: dict) -> None:
    """Record that ``folder`` holds part ``part`` of ``num_parts``; resuming a part checks it is the same one."""
    folder.mkdir(parents=True, exist_ok=True)
    old = read_record(folder)
    outputs = [p for pattern in OUTPUT_PATTERNS for p in folder.glob(pattern)]
    if old is not None and holds_rows(outputs):  # a part that stopped before its first row holds nothing to keep
        check_fingerprint(folder, old["fingerprint"], fp)
        if (old["part"], old["num_parts"]) != (part, num_parts):
            raise MergeError(f"{folder} holds part {old['part']} of {old['num_parts']}, not {part} of {num_parts}: "
                             "use another output folder")
    write_record(folder, {"part": part, "num_parts": num_parts, "complete": False, "files": [],
                          "indices": [int(i) for i in indices], "fingerprint": fp, "started": time.time()})


def finish_part(folder: Path, files: Sequence[str]) -> None:
    """Mark the part complete once every row file holds all of its indices, with its wall time (of the attempt
    that finished it: an interrupted attempt's rows are kept, its time is not)."""
    record = read_record(folder)
    owed = set(record["indices"])
    for name in files:
        found = set(read_rows(folder / name)["idx"].astype(int))
        if found != owed:
            raise MergeError(f"{folder / name} holds {len(found & owed)} of the part's {len(owed)} points")
    began = record.get("started")
    wall = None if began is None else round(time.time() - began, 2)
    write_record(folder, {**record, "complete": True, "files": list(files), "wall_time_s": wall})


def merged_wall_time(summary: dict, folders: Sequence[str | os.PathLike]) -> dict:
    """``summary`` of a merge with the parts' time: ``wall_time_s`` becomes the slowest part plus the merge (what
    one waits for when the parts run side by side), ``parts_wall_time_s`` holds the parts' count, sum (the
    compute spent) and slowest; ``merge_wall_time_s`` the merge's own. A part without a time leaves the summary
    as it was."""
    walls = [(read_record(folder) or {}).get("wall_time_s") for folder in folders]
    if not walls or any(w is None for w in walls):
        return summary
    merge = summary.get("wall_time_s") or 0.0
    return {**summary, "wall_time_s": round(max(walls) + merge, 2), "merge_wall_time_s": merge,
            "parts_wall_time_s": {"count": len(walls), "sum": round(sum(walls), 2), "slowest": max(walls)}}


def parts_device(folders: Sequence[str | os.PathLike]) -> str | None:
    """The kind of device the first readable part drew its noise on. The merge draws none itself, so it takes
    the parts' kind and can run on any machine (GPU shards merge on a CPU node); a part of another kind than the
    first is then refused as a part of another certification."""
    for folder in map(Path, folders):
        record = read_record(folder)
        if record is not None:
            return record["fingerprint"].get("device")
    return None


def merge_parts(folders: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None, expected: dict,
                indices: Sequence[int]) -> list[str]:
    """Merge the part folders into ``out_dir``: every row file once per dataset index, in index order.
    ``out_dir=None`` checks everything and writes nothing.

    ``expected`` is the fingerprint of this run and ``indices`` the dataset indices of the whole subset.
    Raises MergeError, naming the folder, for a missing or incomplete part, a part of another certification
    or another split, a part given twice or missing from the list, an index certified twice, or a gap.
    Returns the names of the merged row files.
    """
    records = {}
    for folder in map(Path, folders):
        record = read_record(folder)
        if record is None:
            raise MergeError(f"{folder}: no {PART_RECORD}; not a part (shard or rank) of a certification run")
        check_fingerprint(folder, record["fingerprint"], expected)
        if not record["complete"]:
            raise MergeError(f"{folder}: part {record['part']} of {record['num_parts']} is incomplete (rows still "
                             "missing); resume it with the same command before merging")
        if record["part"] in records:
            raise MergeError(f"{folder} and {records[record['part']][0]} are both part {record['part']}")
        records[record["part"]] = (folder, record)
    counts = {r["num_parts"] for _, r in records.values()}
    if len(counts) != 1:
        raise MergeError(f"the parts were split in different numbers of parts: {sorted(counts)}")
    num_parts = counts.pop()
    missing = sorted(set(range(num_parts)) - set(records))
    if missing:
        raise MergeError(f"part(s) {missing} of {num_parts} missing from the folders given")
    names = sorted({tuple(r["files"]) for _, r in records.values()})
    if len(names) != 1:
        raise MergeError(f"the parts hold different row files: {names}")
    expected_indices = sorted(int(i) for i in indices)
    for name in names[0]:
        frames = [read_rows(folder / name) for folder, _ in records.values()]
        merged = pd.concat(frames).sort_values("idx", kind="stable").reset_index(drop=True)
        twice = merged["idx"][merged["idx"].duplicated()].tolist()
        if twice:
            raise MergeError(f"{name}: dataset index(es) {twice[:5]} certified by more than one part")
        found = merged["idx"].astype(int).tolist()
        if found != expected_indices:
            gap = sorted(set(expected_indices) - set(found))
            extra = sorted(set(found) - set(expected_indices))
            what = [f"miss dataset index(es) {gap[:5]}"] if gap else []
            what += [f"hold index(es) {extra[:5]} outside this run's subset"] if extra else []
            raise MergeError(f"{name}: the parts {' and '.join(what)}")
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_rows(merged, Path(out_dir) / name)
    return list(names[0])
