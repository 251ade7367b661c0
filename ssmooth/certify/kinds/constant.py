"""Cohen's certificate at the base level, and at every level of the grid for the best single level."""
from __future__ import annotations

from ssmooth.certify.kinds.base import CONSTANT, best_constant
from ssmooth.certify.kinds.job import Job
from ssmooth.certify.results import ROW_COLUMNS

# Every row also carries the forward passes its point cost (n0 + estimation draws), so that a report can show
# cost beside accuracy and compare fixed with adaptive sampling.
CONSTANT_COLUMNS = ROW_COLUMNS + ("samples",)


def constant_path(job: Job):
    return job.out / ("certify.tsv" if job.policy == "constant" else "certify_constant.tsv")


class Constant:
    name = "constant"

    def needs(self, job: Job) -> str | None:
        return None

    def rows(self, job: Job) -> list:
        path = constant_path(job)
        job.produce(path, CONSTANT_COLUMNS, "constant", sigma=job.sigma0)
        return [path]

    def entries(self, job: Job) -> dict:
        rows = job.read(constant_path(job))
        return {"constant": CONSTANT.entry(rows, job.radii, sigma=job.sigma0,
                                           forward_passes=int(rows["samples"].sum()))}


class ConstantBest:
    """Every level certified on its own (by its expert where there are experts, else by the model), and the
    level with the highest ACR reported: the baseline a per-sample method has to beat."""

    name = "constant_best"

    def needs(self, job: Job) -> str | None:
        return None if job.grid or job.experts else "a grid of levels or experts"

    def _paths(self, job: Job) -> dict:
        if job.experts:
            # the model certified by the constant kind, when it is an expert at its own level, is not run twice
            return {level: (constant_path(job) if expert is job.model and level == job.sigma0
                            else job.out / f"certify_expert_s{level:g}.tsv", expert)
                    for level, expert in zip(job.expert_levels, job.experts)}
        return {level: (constant_path(job) if level == job.sigma0 else job.out / f"certify_constant_s{level:g}.tsv",
                        job.model) for level in sorted(float(s) for s in job.grid)}

    def rows(self, job: Job) -> list:
        paths = self._paths(job)
        for level, (path, model) in paths.items():
            job.produce(path, CONSTANT_COLUMNS, f"constant {level:g}", sigma=level, model=model)
        return [path for path, _ in paths.values()]

    def entries(self, job: Job) -> dict:
        paths = self._paths(job)
        by_sigma = {level: job.read(path) for level, (path, _) in paths.items()}
        best = best_constant(by_sigma, job.radii)
        # choosing the best level took every level's certification
        return {"constant_best": {**best, "rows_file": paths[best["sigma"]][0].name, "experts": bool(job.experts),
                                  "forward_passes": sum(int(rows["samples"].sum()) for rows in by_sigma.values())}}
