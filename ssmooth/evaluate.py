"""Certify a trained model on a test subset: constant-sigma certificate, and for sample-wise runs the selected
levels, the unallocated radii, every allocation rule (each verified before anything is written), the constant
certificate at the best single level of the grid, and with a level selector the inductive certificate. Each
result is a certificate kind (``ssmooth.certify.kinds``): its summary entry says whether it is sound and where.

Shared by ``ssmooth-train`` (after fit), ``ssmooth-certify`` (a checkpoint) and the certification callback.
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
from ssmooth.certify.allocation import allocate, verify_allocation
from ssmooth.certify.inductive import INDUCTIVE_COLUMNS, certify_points_inductive
from ssmooth.certify.results import ROW_COLUMNS, SAMPLEWISE_COLUMNS, RowWriter, read_rows, write_rows, write_summary
from ssmooth.certify.run import certify_points
from ssmooth.certify.stats import require_useful_sample_size

POLICIES = ("constant", "samplewise", "inductive")
ALLOCATION_RULES = ("fill", "halving", "lp")
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
    compare_allocations: bool = True
    radii: list[float] | None = None  # report radii; None: the dataset's standard radii
    autocast: str | None = None
    channels_last: bool = True  # weights and inputs: 1.1-2x faster conv nets on CPU (docs/PERFORMANCE.md)
    compile: bool = False  # torch.compile the model: pays off on long runs; the first call compiles
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the key and value of the first bad setting."""
        checks = [
            ("certify.n0", self.n0, self.n0 >= 1, "must be >= 1"),
            ("certify.n", self.n, self.n >= 1, "must be >= 1"),
            ("certify.alpha", self.alpha, 0 < self.alpha < 1, "must be in (0, 1)"),
            ("certify.batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1"),
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
            ("certify.sigma", self.sigma, self.sigma is None or self.sigma > 0, "must be > 0"),
            ("certify.selection_samples", self.selection_samples, self.selection_samples >= 1, "must be >= 1"),
            ("certify.selection_cap", self.selection_cap, self.selection_cap in ("certifiable", "draws"),
             "must be 'certifiable' or 'draws'"),
            ("certify.autocast", self.autocast, self.autocast in AUTOCAST, f"must be one of {list(AUTOCAST)}"),
        ]
        for key, value, ok, why in checks:
            if not ok:
                raise ValueError(f"{key}={value!r} {why}")
        require_useful_sample_size(self.n, self.alpha, "certify")


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
    selector: tuple[nn.Module, Sequence[float], float] | None = None,
) -> dict:
    """Certify ``points`` (items ``(x, y, index)``) and write rows + ``summary.json`` into ``out_dir``.

    ``selector``: ``(h_e, grid, sigma_e)``, the level selector of the inductive certificate (``load_selector``);
    when given, the inductive certificate is computed on the same points, beside the constant one and, when
    ``grid`` is given too, the transductive ones and the best single level.
    Re-running into the same folder resumes every TSV where it stopped. Returns the summary.
    """
    cfg.validate()
    if cfg.policy is None:
        cfg = replace(cfg, policy="inductive" if selector is not None else "samplewise" if grid else "constant")
    if cfg.policy == "inductive" and selector is None:
        raise ValueError("certify.policy=inductive needs a checkpoint with a level selector (the pipeline's "
                         "selector stage writes one)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model = model.to(device)  # certify and select_sigma switch to eval mode themselves and switch back
    if cfg.channels_last:
        # A copy: the caller's model (e.g. one still training) keeps its memory format.
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model, dynamic=False)
    sigma0 = float(cfg.sigma if cfg.sigma is not None else base_sigma)
    radii = list(cfg.radii) if cfg.radii is not None else report.standard_radii(dataset)
    common = dict(n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, batch_size=cfg.batch_size, num_classes=num_classes,
                  points_per_group=cfg.points_per_group or max(1, cfg.batch_size // cfg.n), seed=cfg.seed,
                  device=device, autocast_dtype=AUTOCAST[cfg.autocast], channels_last=cfg.channels_last)
    variants: dict[str, dict] = {}

    constant_path = out / ("certify.tsv" if cfg.policy == "constant" else "certify_constant.tsv")
    _run(model, points, constant_path, ROW_COLUMNS, sigma=sigma0, common=common, label="constant", cfg=cfg)
    constant_rows = read_rows(constant_path)
    variants["constant"] = kinds.CONSTANT.entry(constant_rows, radii, sigma=sigma0)
    main = "constant"
    extra: dict = {}

    if grid and cfg.best_constant and cfg.policy != "constant":
        by_sigma = {}
        for level in sorted(float(s) for s in grid):
            path = constant_path if level == sigma0 else out / f"certify_constant_s{level:g}.tsv"
            _run(model, points, path, ROW_COLUMNS, sigma=level, common=common, label=f"constant {level:g}", cfg=cfg)
            by_sigma[level] = read_rows(path)
        variants["constant_best"] = kinds.best_constant(by_sigma, radii)

    if cfg.policy == "samplewise" or (grid and cfg.policy == "inductive"):  # with a grid, inductive runs beside
        if not grid:
            raise ValueError("certify.policy=samplewise needs a grid of levels (noise.grid_factors or certify.grid_factors)")
        grid = sorted(float(s) for s in grid)
        from ssmooth.selection import select_sigma

        m = cfg.selection_samples
        clip = (1 / (2 * m), max(1 - 1 / (2 * m), cfg.alpha ** (1 / cfg.n))) \
            if cfg.selection_cap == "certifiable" else None

        def choose_levels(x, generator):
            return select_sigma(model, x, grid, num_samples=m, labels=None, generator=generator,
                                batch_size=cfg.batch_size, soft=cfg.soft_selection, clip=clip)

        raw_path = out / "certify_raw.tsv"
        _run(model, points, raw_path, SAMPLEWISE_COLUMNS, sigma=choose_levels, common=common, label="sample-wise",
             cfg=cfg)
        raw = read_rows(raw_path)
        variants["samplewise_raw"] = kinds.SAMPLEWISE_RAW.entry(
            raw, radii, note="unallocated radii: an upper bound, not a certificate")
        # Allocation sees every evaluated point, in dataset-index order; it never sees labels.
        position = {int(points[i][2]): i for i in range(len(points))}
        x_all = torch.stack([points[position[int(i)]][0] for i in raw["idx"]])
        sigma_all = raw["sigma"].to_numpy(np.float64)
        radius_raw = raw["radius_raw"].to_numpy(np.float64)
        rules = ALLOCATION_RULES if cfg.compare_allocations else (cfg.allocation,)
        for rule in rules:
            allocation = allocate(x_all, sigma_all, radius_raw, rule=rule)
            r = allocation.radius
            verify_allocation(x_all, sigma_all, r, radius_raw)  # raises AllocationError: the run stops
            rows = raw.copy()
            rows["radius"] = r
            write_rows(rows[list(SAMPLEWISE_COLUMNS)], out / f"certify_{rule}.tsv")
            stats = {"num_points_T": allocation.num_points, "num_conflicting_pairs": allocation.num_conflicts,
                     # NaN when no point was certified: null keeps summary.json strict JSON
                     "mean_r_over_R": None if np.isnan(allocation.mean_ratio) else allocation.mean_ratio}
            variants[f"samplewise_{rule}"] = kinds.transductive(rule).entry(rows, radii, allocation=rule, **stats)
            if rule == cfg.allocation and cfg.policy == "samplewise":
                write_rows(rows[list(SAMPLEWISE_COLUMNS)], out / "certify.tsv")
        main = f"samplewise_{cfg.allocation}"
        levels, counts = np.unique(sigma_all, return_counts=True)
        extra["selected_sigma_histogram"] = {f"{s:g}": int(c) for s, c in zip(levels, counts)}
        extra["grid"] = grid

    if selector is not None:
        h_e, selector_grid, sigma_e = selector
        h_e = h_e.to(device)
        if cfg.channels_last:
            h_e = copy.deepcopy(h_e).to(memory_format=torch.channels_last)
        path = out / ("certify.tsv" if cfg.policy == "inductive" else "certify_inductive.tsv")
        runner = functools.partial(certify_points_inductive, selector=h_e, grid=selector_grid, sigma_e=sigma_e)
        _run(model, points, path, INDUCTIVE_COLUMNS, sigma=None, common=common, label="inductive", cfg=cfg,
             runner=runner)
        rows = read_rows(path)
        variants["inductive"] = kinds.INDUCTIVE.entry(rows, radii, sigma_e=float(sigma_e),
                                                      **kinds.inductive_details(rows, selector_grid))
        if cfg.policy == "inductive":
            main = "inductive"

    summary = {
        "name": (meta or {}).get("name", out.name),
        "dataset": dataset,
        "model": (meta or {}).get("model", {}).get("name", ""),
        "objective": (meta or {}).get("objective", ""),
        "sigma_policy": cfg.policy,
        "sigma": sigma0,
        "allocation": cfg.allocation if cfg.policy != "constant" else None,
        "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
        "points": {"split": cfg.split, "skip": cfg.skip, "max": cfg.max, "start": cfg.start,
                   "count": int(len(constant_rows)), "indices": [int(i) for i in constant_rows["idx"]]},
        "radii": radii,
        "main": main,
        "variants": variants,
        "wall_time_s": round(time.perf_counter() - began, 2),
        "train_wall_time_s": (meta or {}).get("train_wall_time_s"),  # the model's training, when known
        "certify_config": asdict(cfg),
        **extra,
    }
    write_summary(summary, out / "summary.json")
    return summary


def _run(model, points, path, columns, *, sigma, common, label, cfg, runner=None) -> None:
    with RowWriter(path, columns) as writer:
        remaining = sum(1 for i in range(len(points)) if int(points[i][2]) not in writer.done)
        if remaining == 0:
            return
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(points), initial=len(points) - remaining, desc=f"certify ({label})", unit="pt")
        try:
            if runner is None:
                certify_points(model, points, writer, sigma=sigma, progress=bar.update if bar else None, **common)
            else:
                runner(model, points, writer, progress=bar.update if bar else None, **common)
        finally:
            if bar is not None:
                bar.close()
