"""Per-point levels chosen at test time: the unallocated radii (an upper bound, not a certificate) and the
transductive certificate of every allocation rule, verified before anything is written."""
from __future__ import annotations

import numpy as np
import torch

from ssmooth.certify.allocation import allocate, verify_allocation
from ssmooth.certify.kinds.base import ALLOCATION_RULES, SAMPLEWISE_RAW, transductive
from ssmooth.certify.kinds.job import Job
from ssmooth.certify.results import SAMPLEWISE_COLUMNS, write_rows
from ssmooth.certify.run import dataset_indices

SAMPLEWISE_ROW_COLUMNS = SAMPLEWISE_COLUMNS + ("samples",)


def _raw_path(job: Job):
    return job.out / "certify_raw.tsv"


class Samplewise:
    name = "samplewise"

    def needs(self, job: Job) -> str | None:
        return None if job.grid else "a grid of levels (noise.grid_factors or certify.grid_factors)"

    def rows(self, job: Job) -> list:
        from ssmooth.selection import select_sigma

        cfg, grid = job.cfg, sorted(float(s) for s in job.grid)
        m = cfg.selection_samples
        clip = (1 / (2 * m), max(1 - 1 / (2 * m), cfg.alpha ** (1 / cfg.n))) \
            if cfg.selection_cap == "certifiable" else None
        model = job.model

        def choose_levels(x, streams):
            # the "level" streams: never the draws that certification uses
            return select_sigma(model, x, grid, num_samples=m, labels=None, streams=streams("level", len(grid) * m),
                                batch_size=cfg.batch_size, soft=cfg.soft_selection, clip=clip)

        job.produce(_raw_path(job), SAMPLEWISE_ROW_COLUMNS, "sample-wise", sigma=choose_levels)
        return [_raw_path(job)]

    def entries(self, job: Job) -> dict:
        cfg, grid = job.cfg, sorted(float(s) for s in job.grid)
        raw = job.read(_raw_path(job))
        # the level selection's draws are forward passes too: m per grid level per point
        selection = len(raw) * len(grid) * cfg.selection_samples
        job.state["extra_passes"] = job.state.get("extra_passes", 0) + selection
        passes = int(raw["samples"].sum()) + selection
        entries = {"samplewise_raw": SAMPLEWISE_RAW.entry(
            raw, job.radii, forward_passes=passes, note="unallocated radii: an upper bound, not a certificate")}
        # Allocation sees every evaluated point, in dataset-index order; it never sees labels.
        position = {idx: i for i, idx in enumerate(dataset_indices(job.points))}
        x_all = torch.stack([job.points[position[int(i)]][0] for i in raw["idx"]])
        sigma_all = raw["sigma"].to_numpy(np.float64)
        radius_raw = raw["radius_raw"].to_numpy(np.float64)
        for rule in ALLOCATION_RULES if cfg.compare_allocations else (cfg.allocation,):
            rows, stats = _allocated(raw, x_all, sigma_all, radius_raw, rule)
            write_rows(rows[list(SAMPLEWISE_ROW_COLUMNS)], job.out / f"certify_{rule}.tsv")
            # the allocation draws nothing: the certificate cost what the per-point levels and radii cost
            entries[f"samplewise_{rule}"] = transductive(rule).entry(rows, job.radii, allocation=rule,
                                                                     forward_passes=passes, **stats)
            if rule == cfg.allocation and job.policy == "samplewise":
                write_rows(rows[list(SAMPLEWISE_ROW_COLUMNS)], job.out / "certify.tsv")
        levels, counts = np.unique(sigma_all, return_counts=True)
        job.state.setdefault("extra", {}).update(
            selected_sigma_histogram={f"{s:g}": int(c) for s, c in zip(levels, counts)}, grid=grid)
        return entries


def _allocated(raw, x_all, sigma_all, radius_raw, rule: str):
    """The rows of the transductive certificate with allocation ``rule``, and the allocation's statistics."""
    allocation = allocate(x_all, sigma_all, radius_raw, rule=rule)
    # raises AllocationError: the run stops before anything is written
    verify_allocation(x_all, sigma_all, allocation.radius, radius_raw, answered=allocation.answered)
    rows = raw.copy()
    rows["radius"] = allocation.radius
    # Another level answers at the same location: this point gives up its answer (see allocation.py).
    rows.loc[~allocation.answered, ["predict", "correct"]] = (-1, 0)
    stats = {"num_points_T": allocation.num_points, "num_conflicting_pairs": allocation.num_conflicts,
             "num_dropped_duplicates": allocation.num_dropped,
             # NaN when no point was certified: null keeps summary.json strict JSON
             "mean_r_over_R": None if np.isnan(allocation.mean_ratio) else allocation.mean_ratio}
    return rows, stats
