"""Certify a trained model on a test subset: constant-sigma certificate, and for sample-wise runs the selected
levels, the unallocated radii and every allocation rule, each verified before anything is written.

Shared by ``ssmooth-train`` (after fit), ``ssmooth-certify`` (a checkpoint) and the certification callback.

The output folder is a contract (``ssmooth.certify.runfolder``): before any work, its fingerprint (checkpoint
content, points, sampling, levels, version) is written, or compared with the one already there: the same one
resumes, another one is refused unless ``certify.overwrite=true``. A lock keeps a second process out. The
summary covers exactly the requested points.
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ssmooth import report
from ssmooth.certify import kinds
from ssmooth.certify.checks import check_run
from ssmooth.certify.distributed import (finish_part, merge_parts, merged_wall_time, part_positions, parts_device,
                                         start_part)
from ssmooth.certify.kinds import ALLOCATION_RULES, CONSTANT_COLUMNS, SAMPLEWISE_ROW_COLUMNS  # noqa: F401
from ssmooth.certify.results import RowWriter, read_rows, write_summary
from ssmooth.certify.run import certify_points, dataset_indices
from ssmooth.certify.runfolder import fingerprint, open_run_folder, points_pixels_sha256, state_dict_sha256
from ssmooth.certify.stats import require_useful_sample_size

POLICIES = ("constant", "samplewise", "inductive", "routed", "cascade")
SAMPLING = ("fixed", "adaptive")
AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CertifyConfig:
    """What ``certify.*`` may hold; an unknown key is a TypeError at construction (no silent typos)."""

    enabled: bool = True
    split: str = "test"
    skip: int = 1  # every skip-th test image (Cohen's --skip)
    max: int = -1  # positions below max only, as in Cohen's certify.py (-1: all)
    start: int = 0
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    # fixed: n estimation draws per point; adaptive: n_i <= n chosen from the n0 selection draws, aiming at a
    # radius at most max_radius_loss (l2 units) below the one at n (docs/ADAPTIVE_SAMPLING.md)
    sampling: str = "fixed"
    max_radius_loss: float = 0.02
    points_per_group: int | None = None  # None: enough points to fill one forward batch of the n samples
    policy: str | None = None  # None: as the model was trained (a level selector: inductive; a grid: sample-wise)
    sigma: float | None = None  # constant level; None: the base level the model was trained at
    grid_factors: list[float] | None = None  # sample-wise grid, sigma * factor; None: the training grid
    selection_samples: int = 64
    soft_selection: bool = False
    # Score levels by the radius CERTIFY can reach: p is capped at alpha ** (1 / n), the best n samples can
    # certify, instead of 1 - 1 / (2 m). Otherwise a large level that is nearly unanimous outscores a small one
    # whose certificate is already at the n-sample ceiling.
    selection_cap: str = "certifiable"  # certifiable | draws
    allocation: str = "fill"  # the headline rule; every rule is computed and reported
    # Sample-wise and inductive runs also certify at every single level of the grid and report the best (the
    # honest baseline for any per-sample claim); costs one constant certification per level.
    best_constant: bool = True
    # The certificate kinds to compute on the same points (ssmooth.certify.kinds.REGISTRY); None: the policy's
    # own, the constant one and, with a grid, the best single level.
    kinds: list[str] | None = None
    p0: float = 0.5  # cascade: a level answers when its top class has probability >= p0
    # Routed and cascade certificates with one expert per level: checkpoint paths, or one folder holding
    # experts.json (the pipeline's experts stage); None: the model at every level.
    experts: list[str] | str | None = None
    compare_allocations: bool = True
    radii: list[float] | None = None  # report radii; None: the dataset's standard radii
    autocast: str | None = None
    channels_last: bool = True  # weights and inputs: 1.1-2x faster conv nets on CPU (docs/PERFORMANCE.md)
    compile: bool = False  # torch.compile the model: pays off on long runs; the first call compiles
    seed: int = 0
    progress: bool = True
    overwrite: bool = False  # a folder holding rows of other settings is started afresh instead of refused
    # Independent jobs (a SLURM array): job K of N certifies the points at positions K, K + N, ... of the subset
    # into its own folder; a last job with merge=true and shard_dirs=[...] merges, allocates and summarizes.
    num_shards: int = 1
    shard: int = 0
    merge: bool = False
    shard_dirs: list[str] | str | None = None  # the shard folders, or one glob pattern

    def validate(self) -> None:
        """Raise ValueError naming the key and value of the first bad setting."""
        checks = [
            ("certify.n0", self.n0, self.n0 >= 1, "must be >= 1"),
            ("certify.n", self.n, self.n >= 1, "must be >= 1"),
            ("certify.alpha", self.alpha, 0 < self.alpha < 1, "must be in (0, 1)"),
            ("certify.batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1"),
            ("certify.sampling", self.sampling, self.sampling in SAMPLING, f"must be one of {SAMPLING}"),
            ("certify.max_radius_loss", self.max_radius_loss, self.max_radius_loss >= 0, "must be >= 0 (l2 units)"),
            ("certify.points_per_group", self.points_per_group,
             self.points_per_group is None or self.points_per_group >= 1, "must be null (auto) or >= 1"),
            ("certify.skip", self.skip, self.skip >= 1, "must be >= 1"),
            ("certify.max", self.max, self.max == -1 or self.max >= 1, "must be -1 (all) or >= 1"),
            ("certify.start", self.start, self.start >= 0, "must be >= 0"),
            ("certify.split", self.split, self.split in ("train", "test"), "must be 'train' or 'test'"),
            ("certify.policy", self.policy, self.policy is None or self.policy in POLICIES,
             f"must be null (as trained) or one of {POLICIES}"),
            ("certify.allocation", self.allocation, self.allocation in ALLOCATION_RULES,
             f"must be one of {ALLOCATION_RULES}"),
            ("certify.sigma", self.sigma, self.sigma is None or 0 < self.sigma < float("inf"),
             "must be finite and > 0"),
            ("certify.p0", self.p0, 0.5 <= self.p0 < 1, "must be in [0.5, 1)"),
            ("certify.selection_samples", self.selection_samples, self.selection_samples >= 1, "must be >= 1"),
            ("certify.selection_cap", self.selection_cap, self.selection_cap in ("certifiable", "draws"),
             "must be 'certifiable' or 'draws'"),
            ("certify.autocast", self.autocast, self.autocast in AUTOCAST, f"must be one of {list(AUTOCAST)}"),
            ("certify.num_shards", self.num_shards, self.num_shards >= 1, "must be >= 1"),
            ("certify.shard", self.shard, 0 <= self.shard < self.num_shards,
             f"must be in 0..{self.num_shards - 1} (certify.num_shards={self.num_shards})"),
            ("certify.shard_dirs", self.shard_dirs, not self.merge or bool(self.shard_dirs),
             "must list the shard folders to merge (certify.merge=true)"),
            ("certify.merge", self.merge, not (self.merge and self.num_shards > 1),
             "merges shards: run it without certify.num_shards"),
        ]
        for key, value, ok, why in checks:
            if not ok:
                raise ValueError(f"{key}={value!r} {why}")
        require_useful_sample_size(self.n, self.alpha, "certify")


class CertificationInterrupted(KeyboardInterrupt):
    """Ctrl-C during certification; the message says what was kept and how to resume (printed as one line)."""


def certification_points(datamodule, cfg: CertifyConfig):
    """The points ``certify.split/skip/max/start`` name: positions ``start, start + skip, ...`` below ``max`` of
    the split (Cohen's semantics), items ``(x, y, dataset index)``. Training points come without augmentation:
    the certificate is about the stored image."""
    if cfg.split == "test":
        return datamodule.test_points(cfg.skip, cfg.max, cfg.start)
    from ssmooth.data import IndexedDataset

    datamodule.setup()
    train = datamodule.train_set
    stop = len(train) if cfg.max == -1 else min(cfg.max, len(train))
    chosen = train.subset(torch.arange(cfg.start, stop, cfg.skip))
    if len(chosen) == 0:
        raise ValueError(f"certify.start={cfg.start}, certify.max={cfg.max}: no point of the {len(train)} training "
                         "points is selected")
    return IndexedDataset(chosen.images, chosen.labels, chosen.indices)


def run_fingerprint(cfg: CertifyConfig, points, *, checkpoint_sha256: str, dataset: str, sigma: float,
                    grid: Sequence[float] | None, selector=None, experts=None,
                    device: torch.device | str = "cpu") -> dict:
    """The fingerprint of a certification with these settings on these points (see ssmooth.certify.runfolder).
    ``cfg.policy`` must be resolved; ``grid`` and the selection settings count only where per-point levels are
    chosen by test-time selection (sample-wise runs, and inductive runs with a grid, which report both); a level
    selector counts by its weights, grid and noise level."""
    samplewise = cfg.policy == "samplewise" or (cfg.policy == "inductive" and bool(grid))
    selection = {"selection_samples": cfg.selection_samples, "soft_selection": cfg.soft_selection,
                 "selection_cap": cfg.selection_cap} if samplewise else None
    labels = points.labels if hasattr(points, "labels") else [points[i][1] for i in range(len(points))]
    fp = fingerprint(
        checkpoint_sha256=checkpoint_sha256, dataset=dataset, split=cfg.split,
        subset={"skip": cfg.skip, "max": cfg.max, "start": cfg.start}, indices=dataset_indices(points),
        labels=[int(y) for y in labels], n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, policy=cfg.policy, sigma=sigma,
        grid=sorted(float(s) for s in grid) if (samplewise or cfg.policy == "cascade") and grid else None,
        selection=selection, seed=cfg.seed,
        autocast=cfg.autocast,
        pixels_sha256=points_pixels_sha256(points), device=torch.device(device).type,
    )
    if cfg.sampling != "fixed":
        # Rows of fixed and adaptive sampling (or of two budgets) must never share a folder; fixed runs keep the
        # fingerprint they always had.
        fp["sampling"] = {"kind": cfg.sampling, "max_radius_loss": float(cfg.max_radius_loss)}
    if experts:
        # rows of other experts must never be resumed as these
        fp["experts"] = {f"{float(s):g}": state_dict_sha256(m) for s, m in zip(*experts)}
    if cfg.p0 != 0.5:
        fp["p0"] = float(cfg.p0)
    if selector is not None:
        h_e, selector_grid, sigma_e = selector
        fp["selector"] = {"sha256": state_dict_sha256(h_e), "grid": [float(s) for s in selector_grid],
                          "sigma_e": float(sigma_e)}
    return fp


def certify_model(
    model: nn.Module,
    points,
    out_dir: str | Path,
    cfg: CertifyConfig,
    *,
    num_classes: int,
    base_sigma: float,
    grid: Sequence[float] | None = None,
    dataset: str = "",
    meta: dict | None = None,
    device: torch.device | str = "cpu",
    checkpoint_sha256: str | None = None,
    rows_only: bool = False,
    merge_from: Sequence[str | Path] | None = None,
    bar: dict | None = None,
    selector: tuple[nn.Module, Sequence[float], float] | None = None,
    experts: tuple[Sequence[float], Sequence[nn.Module]] | None = None,
) -> dict:
    """Certify ``points`` (items ``(x, y, index)``) and write rows + ``summary.json`` into ``out_dir``.

    ``selector``: ``(h_e, grid, sigma_e)``, the level selector of the inductive certificate (``load_selector``).
    ``experts``: ``(levels, models)``, one model per level, for expert routing, the cascade and the best single
    level. ``cfg.kinds`` names the certificate kinds computed on the same points (ssmooth.certify.kinds);
    by default the policy's own, the constant one and, with a grid, the best single level.

    ``checkpoint_sha256``: the sha256 of the checkpoint file the model was loaded from; None hashes the model's
    state_dict (a model certified right after training). Re-running into the same folder with the same
    fingerprint resumes every TSV where it stopped; another fingerprint raises FingerprintMismatch, a second
    process FolderLocked (both RunFolderError), before any work. Ctrl-C raises CertificationInterrupted.
    Returns the summary.

    Distributed runs: with ``rows_only`` (one part) it writes the per-point rows and stops before the
    allocation, returning ``{"files": [row files]}``; with ``merge_from`` (the part folders) it first merges
    their rows into ``out_dir``, under its lock, so nothing is certified again. ``bar``: extra tqdm settings.

    Long for what it promises (run folders, parts, interrupts); the body only opens the folder and hands over."""
    check_run(points, base_sigma=base_sigma, grid=grid)
    cfg, sigma0, fp = _settled(model, points, cfg, base_sigma=base_sigma, grid=grid, dataset=dataset,
                               checkpoint_sha256=checkpoint_sha256, selector=selector, experts=experts,
                               device=device)
    out = Path(out_dir)
    if merge_from is not None:  # a bad part is refused before this folder is touched
        fp = {**fp, "device": parts_device(merge_from) or fp["device"]}  # the merge draws no noise itself
        merge_parts(merge_from, None, fp, dataset_indices(points))
    with open_run_folder(out, fp, overwrite=cfg.overwrite):
        if merge_from is not None:
            merge_parts(merge_from, out, fp, dataset_indices(points))
        try:
            summary = _certify_locked(model, points, out, cfg, fp, num_classes=num_classes, sigma0=sigma0, grid=grid,
                                      dataset=dataset, meta=meta, device=device, rows_only=rows_only, bar=bar,
                                      selector=selector, experts=experts)
            if merge_from is not None:  # the parts' own time, not only this merge's
                summary = merged_wall_time(summary, merge_from)
                write_summary(summary, out / "summary.json")
            return summary
        except CertificationInterrupted:
            raise
        except KeyboardInterrupt:
            raise CertificationInterrupted(
                f"interrupted after every row was written to {out}; re-run the same command to finish the summary"
            ) from None


def _settled(model, points, cfg: CertifyConfig, *, base_sigma: float, grid=None, dataset: str = "",
             checkpoint_sha256: str | None = None, selector=None, experts=None, device: torch.device | str = "cpu",
             **_) -> tuple[CertifyConfig, float, dict]:
    """The resolved settings, the constant level and the fingerprint of certifying ``points`` this way: one
    computation for a run folder and for the parts of a distributed run, so that the two always agree."""
    cfg = _resolved(cfg, grid, selector, experts)
    sigma0 = float(cfg.sigma if cfg.sigma is not None else base_sigma)
    fp = run_fingerprint(cfg, points, dataset=dataset, sigma=sigma0, grid=grid,
                         checkpoint_sha256=checkpoint_sha256 or state_dict_sha256(model), selector=selector,
                         experts=experts, device=device)
    return cfg, sigma0, fp


def _resolved(cfg: CertifyConfig, grid, selector=None, experts=None) -> CertifyConfig:
    """``cfg`` validated, with the policy decided (inductive with a level selector, sample-wise when the model
    was trained with a grid, else constant)."""
    cfg.validate()
    if cfg.policy is None:
        policy = "inductive" if selector is not None else "samplewise" if grid else "constant"
        cfg = replace(cfg, policy="routed" if experts and selector is not None else policy)
    if cfg.policy == "routed" and not (experts and selector is not None):
        raise ValueError("certify.policy=routed needs a level selector and experts (certify.experts=[...])")
    if cfg.policy == "cascade" and not (grid or experts):
        raise ValueError("certify.policy=cascade needs a grid of levels or experts (certify.experts=[...])")
    if experts and len(experts[0]) != len(experts[1]):
        raise ValueError(f"experts: {len(experts[1])} models for {len(experts[0])} levels")
    # Unknown or impossible kinds are refused here, before the run folder is touched.
    from types import SimpleNamespace

    kinds.requested(_kind_names(cfg, grid), SimpleNamespace(
        grid=grid, selector=selector, experts=experts[1] if experts else None,
        expert_levels=[float(s) for s in experts[0]] if experts else None))
    if cfg.policy == "samplewise" and not grid:
        raise ValueError("certify.policy=samplewise needs a grid of levels (noise.grid_factors or certify.grid_factors)")
    if cfg.policy == "inductive" and selector is None:
        raise ValueError("certify.policy=inductive needs a checkpoint with a level selector (the pipeline's "
                         "selector stage writes one)")
    return cfg


def _certify_locked(model, points, out: Path, cfg: CertifyConfig, fp: dict, *, num_classes, sigma0, grid, dataset,
                    meta, device, rows_only=False, bar=None, selector=None, experts=None) -> dict:
    """Every requested kind's rows, then their entries and the summary. One piece on purpose: the summary's
    fields are listed in one place, the order in which a run folder is filled."""
    began = time.perf_counter()
    requested = dataset_indices(points)
    common = dict(n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, batch_size=cfg.batch_size, num_classes=num_classes,
                  points_per_group=cfg.points_per_group or max(1, cfg.batch_size // cfg.n), seed=cfg.seed,
                  device=device, autocast_dtype=AUTOCAST[cfg.autocast], channels_last=cfg.channels_last,
                  sampling=cfg.sampling, max_radius_loss=cfg.max_radius_loss)
    original, model = model, _prepared(model, cfg, device)

    def produce(path, columns, label, *, sigma=None, runner=None, model=model):
        _run(model, points, path, columns, common=common, label=label, cfg=cfg, bar=bar, sigma=sigma, runner=runner)

    if selector is not None:
        h_e, selector_grid, sigma_e = selector
        selector = (_prepared(h_e, replace(cfg, compile=False), device), selector_grid, sigma_e)
    job = kinds.Job(model=model, points=points, out=out, cfg=cfg, policy=cfg.policy, sigma0=sigma0,
                    grid=sorted(float(s) for s in grid) if grid else None,
                    radii=list(cfg.radii) if cfg.radii is not None else report.standard_radii(dataset),
                    produce=produce, read=functools.partial(_requested_rows, requested=requested),
                    selector=selector,
                    experts=[model if m is original else _prepared(m, cfg, device) for m in experts[1]]
                    if experts else None,
                    expert_levels=[float(s) for s in experts[0]] if experts else None)
    chosen = kinds.requested(_kind_names(cfg, grid), job)
    # Every row file first (a part of a distributed run stops there; the merge brings them together), then the
    # summary entries, each kind's own.
    files = list(dict.fromkeys(path for k in chosen for path in k.rows(job)))
    if rows_only:
        return {"files": [path.name for path in files]}
    variants: dict[str, dict] = {}
    for k in chosen:
        variants.update(k.entries(job))
    main = f"samplewise_{cfg.allocation}" if cfg.policy == "samplewise" else kinds.MAIN_KIND[cfg.policy]
    if main not in variants:  # certify.kinds left the policy's own kind out: the first one computed leads
        main = next(iter(variants))
    # every noisy forward pass of this run: each row file once, and the test-time level selection's draws
    forward_passes = sum(int(job.read(path)["samples"].sum()) for path in files) + job.state.get("extra_passes", 0)
    first = job.read(files[0])
    summary = {
        "name": (meta or {}).get("name", out.name),
        "dataset": dataset,
        "model": (meta or {}).get("model", {}).get("name", ""),
        "objective": (meta or {}).get("objective", ""),
        "sigma_policy": cfg.policy,
        "sigma": sigma0,
        "allocation": cfg.allocation if "samplewise" in {k.name for k in chosen} else None,
        "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
        "sampling": cfg.sampling, "max_radius_loss": cfg.max_radius_loss if cfg.sampling == "adaptive" else None,
        "forward_passes": forward_passes,
        "points": {"split": cfg.split, "skip": cfg.skip, "max": cfg.max, "start": cfg.start,
                   "count": int(len(first)), "indices": [int(i) for i in first["idx"]]},
        "radii": job.radii,
        "kinds": [k.name for k in chosen],
        "main": main,
        "variants": variants,
        "wall_time_s": round(time.perf_counter() - began, 2),
        "train_wall_time_s": (meta or {}).get("train_wall_time_s"),  # the model's training, when known
        "certify_config": asdict(cfg),
        "fingerprint": fp,
        **job.state.get("extra", {}),
    }
    write_summary(summary, out / "summary.json")
    return summary


def _kind_names(cfg: CertifyConfig, grid) -> list[str]:
    if cfg.kinds is not None:
        return list(cfg.kinds)
    return kinds.default_kinds(cfg.policy, grid=bool(grid), best_constant=cfg.best_constant)


def _prepared(model: nn.Module, cfg: CertifyConfig, device) -> nn.Module:
    """The model on ``device``, channels-last and compiled as configured. certify and select_sigma switch to
    eval mode themselves and switch back."""
    model = model.to(device)
    if cfg.channels_last:
        # A copy: the caller's model (e.g. one still training) keeps its memory format.
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model, dynamic=False)
    return model


def _requested_rows(path: Path, requested: list[int]):
    """The rows of exactly the requested points, in index order: a row left in the folder by another subset is
    never counted, and a requested point without a row is an error, not a smaller denominator."""
    rows = read_rows(path)
    rows = rows[rows["idx"].isin(requested)].reset_index(drop=True)
    missing = sorted(set(requested) - set(int(i) for i in rows["idx"]))
    if missing:
        raise RuntimeError(f"{path}: no row for {len(missing)} of the {len(requested)} requested points "
                           f"(first: index {missing[0]})")
    return rows


def _run(model, points, path, columns, *, sigma, common, label, cfg, bar=None, runner=None) -> None:
    """Certify every requested point that ``path`` has no row for (``runner``: another certificate's rows)."""
    requested = set(dataset_indices(points))
    with RowWriter(path, columns) as writer:
        remaining = len(requested - writer.done)
        if remaining == 0:
            return
        progress = None
        if cfg.progress:
            from ssmooth.progress import progress_bar  # one line per 30 s when written to a file

            settings = {"desc": "certify", **(bar or {})}
            settings["desc"] += f" ({label})"
            progress = progress_bar(total=len(points), initial=len(points) - remaining, unit="pt", **settings)
        try:
            update = progress.update if progress else None
            if runner is None:
                certify_points(model, points, writer, sigma=sigma, progress=update, **common)
            else:
                runner(model, points, writer, progress=update, **common)
        except KeyboardInterrupt:
            kept = len(requested & writer.done)
            raise CertificationInterrupted(f"interrupted: {kept}/{len(requested)} rows kept in {path}; re-run the "
                                           "same command to resume") from None
        finally:
            if progress is not None:
                progress.close()


# ---------------------------------------------------------------------------------------------------------------
# Certification spread over ranks (one process per GPU, any number of nodes) or independent jobs (shards): what
# runs where is in ssmooth/certify/distributed.py; these functions only wire it to certify_model.


def certify_part(model: nn.Module, points, folder: str | Path, cfg: CertifyConfig, *, part: int, num_parts: int,
                 **kw) -> None:
    """Certify part ``part`` of ``num_parts`` of ``points`` into ``folder`` (rows and part.json; resumable).
    part.json records the fingerprint of the WHOLE run, which the merge compares across parts."""
    folder = Path(folder)
    _, _, fp = _settled(model, points, cfg, **kw)
    share = points.subset(part_positions(len(points), num_parts, part))
    start_part(folder, part=part, num_parts=num_parts, indices=dataset_indices(share), fp=fp)
    done = certify_model(model, share, folder, cfg, rows_only=True, **kw)
    finish_part(folder, done["files"])


def certify_on_ranks(model: nn.Module, points, out_dir: str | Path, cfg: CertifyConfig, *, rank: int,
                     world_size: int, barrier, **kw) -> dict | None:
    """Collective: every rank calls it. Rank r certifies part r into ``out_dir/parts/rank<r>``; after a barrier,
    rank 0 merges the parts, allocates, verifies and writes the summary (returned; None on other ranks).
    ``out_dir`` must be on a filesystem every rank sees. One process (world_size 1) is plain certify_model."""
    if world_size == 1:
        return certify_model(model, points, out_dir, cfg, **kw)
    parts = [Path(out_dir) / "parts" / f"rank{r}" for r in range(world_size)]
    bar = {"desc": f"rank {rank}/{world_size} certify", "position": rank}
    certify_part(model, points, parts[rank], cfg, part=rank, num_parts=world_size, bar=bar, **kw)
    barrier()
    if rank != 0:
        return None
    return certify_model(model, points, out_dir, cfg, merge_from=parts, **kw)
