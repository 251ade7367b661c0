"""A certification folder is a contract: its rows come from one checkpoint and one set of settings.

``fingerprint(...)`` records what changes a certification's rows (the checkpoint's content, the points and their
pixels, the sampling and the noise levels, the kind of device that draws the noise, the version of the
certification scheme and of the package); ``open_run_folder`` writes it to ``fingerprint.json``
before the first row, resumes a folder whose fingerprint is the same, and refuses any other one unless asked
to start it afresh. It also takes an exclusive lock, so two processes never append to one folder at once.

Settings that leave every row's distribution unchanged are left out on purpose, so that changing them resumes
instead of being refused: batch sizes, points per group, channels-last, compile, progress bars, the report
radii, and the allocation rule (every allocation is recomputed from the unallocated rows at each run).

Pure: no Lightning, no Hydra; torch only for hashing an in-memory model.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = "certify.lock"
# What a certification writes into its folder; an overwrite removes exactly these, never checkpoints or logs.
OUTPUT_PATTERNS = ("certify*.tsv", "certify*.tsv.tmp", "summary.json", "summary.json.tmp", "certified_accuracy.png")
# The compared keys, in a fixed order: other tools (shard merging) rely on this set.
FINGERPRINT_KEYS = ("checkpoint_sha256", "dataset", "split", "subset", "points_sha256", "pixels_sha256", "n0", "n",
                    "alpha", "policy", "sigma", "grid", "selection", "seed", "autocast", "device",
                    "certification_scheme", "version")
# The version of the rules that turn settings into rows: bump it whenever the rows of unchanged settings would
# change (the noise draws, their order or pieces, a statistic), so that a folder never mixes rows of two schemes.
# 1: per-point streams; 2: CPU streams seeded with all 63 bits of their seed.
SCHEME_VERSION = 2


class RunFolderError(ValueError):
    """A folder that must not be certified into as asked; the message says why and what to do instead."""


class FingerprintMismatch(RunFolderError):
    """The folder holds rows of another checkpoint or other settings."""


class FolderLocked(RunFolderError):
    """Another live process is certifying into the folder."""


def fingerprint(
    *,
    checkpoint_sha256: str,
    dataset: str,
    split: str,
    subset: Mapping,
    indices: Iterable[int],
    labels: Iterable[int],
    pixels_sha256: str,
    n0: int,
    n: int,
    alpha: float,
    policy: str,
    sigma: float,
    grid: Sequence[float] | None = None,
    selection: Mapping | None = None,
    seed: int = 0,
    autocast: str | None = None,
    device: str = "cpu",
    version: str | None = None,
) -> dict:
    """What produced a folder's rows, as a JSON-ready dict with the keys ``FINGERPRINT_KEYS``.

    ``subset`` is the user's definition of the points (e.g. skip/max/start); ``indices`` and ``labels`` are the
    points it gave, hashed, so a dataset that changed under the same definition is caught too, and
    ``pixels_sha256`` (``points_pixels_sha256``) catches other images under the same indices and labels.
    ``grid`` and ``selection`` matter only for sample-wise runs: pass None for a constant level. ``device`` is the
    kind of device that draws the noise ("cpu", "cuda"): the same seed draws other noise on another kind.
    """
    if version is None:
        from ssmooth import __version__ as version
    points = hashlib.sha256()
    for i, y in zip(indices, labels, strict=True):
        points.update(f"{int(i)}:{int(y)};".encode())
    fp = {
        "checkpoint_sha256": str(checkpoint_sha256),
        "dataset": str(dataset),
        "split": str(split),
        "subset": {k: subset[k] for k in sorted(subset)},
        "points_sha256": points.hexdigest(),
        "pixels_sha256": str(pixels_sha256),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "policy": str(policy),
        "sigma": float(sigma),
        "grid": None if grid is None else [float(s) for s in grid],
        "selection": None if selection is None else {k: selection[k] for k in sorted(selection)},
        "seed": int(seed),
        "autocast": autocast,
        "device": str(device),
        "certification_scheme": SCHEME_VERSION,
        "version": str(version),
    }
    # A JSON round trip: the dict compares equal to what fingerprint.json gives back.
    return json.loads(json.dumps(fp))


def diff_fingerprints(a: Mapping, b: Mapping) -> list[str]:
    """The keys whose values differ between two fingerprints (a key missing on one side differs)."""
    keys = list(FINGERPRINT_KEYS) + sorted((set(a) | set(b)) - set(FINGERPRINT_KEYS))
    return [k for k in keys if (k in a) != (k in b) or a.get(k) != b.get(k)]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed: the checkpoint's identity whatever its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes and bytes, in key order): the identity of an
    in-memory model, e.g. one certified right after training. Not equal to its checkpoint file's hash."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        _update_with_tensor(digest, name, tensor)
    return digest.hexdigest()


def points_pixels_sha256(points) -> str:
    """sha256 of the pixels of every item ``(x, y, index)`` of ``points``, in order, read the cheapest way: one
    in-memory tensor of images as it is, image files by their bytes (no decoding: ImageNet-size subsets hash at
    disk speed), any other dataset item by item."""
    import torch

    digest = hashlib.sha256()
    images, paths = getattr(points, "images", None), getattr(points, "paths", None)
    if isinstance(images, torch.Tensor) and len(images) == len(points):
        _update_with_tensor(digest, "images", images)
    elif paths is not None and len(paths) == len(points):
        for path in paths:
            digest.update(file_sha256(path).encode())
    else:
        for position in range(len(points)):
            _update_with_tensor(digest, str(position), points[position][0])
    return digest.hexdigest()


def _update_with_tensor(digest, name: str, tensor) -> None:
    import torch

    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
    # As raw bytes: numpy has no bfloat16, and equal bytes is what "the same values" means.
    digest.update(t.view(torch.uint8).numpy().data)


class RunFolder:
    """An open certification folder: fingerprint checked or written, exclusive lock held until ``close``."""

    def __init__(self, path: Path, fingerprint: dict, lock_fd: int, resumed: bool):
        self.path, self.fingerprint, self.resumed = path, fingerprint, resumed
        self._lock_fd: int | None = lock_fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_run_folder(out_dir: str | os.PathLike, fp: Mapping, overwrite: bool = False) -> RunFolder:
    """Lock ``out_dir`` and make sure its rows belong to ``fp``; call before any work and before any row.

    - no rows yet: ``fp`` is written to ``fingerprint.json``;
    - the same fingerprint: the folder resumes;
    - another fingerprint, or rows without one: FingerprintMismatch naming the differing keys, unless
      ``overwrite``, which removes this folder's certification outputs (never checkpoints or logs) and starts
      afresh;
    - another live process holds the folder: FolderLocked.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(out)
    try:
        resumed = _check_or_write(out, dict(fp), overwrite)
    except BaseException:
        os.close(lock_fd)
        raise
    return RunFolder(out, dict(fp), lock_fd, resumed)


def _lock(out: Path) -> int:
    # flock, not a PID file: the kernel drops the lock when the holder dies (even by SIGKILL or a node reboot of
    # a local disk), so a killed run never leaves the folder stuck, and there is no stale PID to misjudge.
    # On NFS, Linux maps flock onto POSIX byte-range locks, which the server arbitrates across nodes.
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = path.read_text().strip() or "unknown"
        raise FolderLocked(
            f"{out} is in use by another certification (process {holder}); wait for it to finish, or certify into "
            "a new folder (hydra.run.dir=...)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}@{os.uname().nodename}\n".encode())  # for the message above only
    return fd


def _outputs(out: Path) -> list[Path]:
    return sorted({p for pattern in OUTPUT_PATTERNS for p in out.glob(pattern)})


def holds_rows(outputs: Iterable[Path]) -> bool:
    """True when any output holds a result: a row past a row file's header, a summary or a plot."""
    for path in outputs:
        if not path.name.endswith((".tsv", ".tsv.tmp")):
            return True
        with open(path, "rb") as f:
            f.readline()  # the header
            if f.read(1):
                return True
    return False


def _check_or_write(out: Path, fp: dict, overwrite: bool) -> bool:
    """True when the folder resumes earlier rows of the same fingerprint."""
    fp_path = out / FINGERPRINT_FILE
    outputs = _outputs(out)
    if fp_path.is_file():
        try:
            recorded = json.loads(fp_path.read_text())
        except json.JSONDecodeError:
            recorded = {}
        differ = diff_fingerprints(recorded, fp)
        if not differ:
            return True
        if not holds_rows(outputs):  # a run that stopped before its first row left nothing to protect
            for path in outputs:
                path.unlink(missing_ok=True)
            _write_json(fp_path, fp)
            return False
        reason = "holds rows of other settings: " + "; ".join(_describe(k, recorded, fp) for k in differ)
    elif outputs:
        reason = f"holds certification results ({outputs[0].name}) but no {FINGERPRINT_FILE} to show what made them"
    else:
        _write_json(fp_path, fp)
        return False
    if not overwrite:
        raise FingerprintMismatch(
            f"{out} {reason}. Certify into a new folder (hydra.run.dir=...), or start this one afresh with "
            "certify.overwrite=true (deletes its rows and summary)"
        )
    # Fingerprint first: a kill in between leaves rows without a fingerprint, which is refused, never trusted.
    fp_path.unlink(missing_ok=True)
    for path in outputs:
        path.unlink(missing_ok=True)
    _write_json(fp_path, fp)
    return False


def _describe(key: str, recorded: Mapping, new: Mapping) -> str:
    def short(value):
        text = json.dumps(value)
        return text[:13] + '..."' if key.endswith("sha256") else text

    old = short(recorded[key]) if key in recorded else "missing"
    now = short(new[key]) if key in new else "missing"
    return f"{key} {old} in the folder, {now} now"


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
