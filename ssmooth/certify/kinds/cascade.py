"""The cascade: the levels from the largest down, answering at the first confident one (with the experts, each
level's own model; else the model at every level)."""
from __future__ import annotations

from ssmooth.certify.cascade import CASCADE_COLUMNS, certify_points_cascade
from ssmooth.certify.kinds.base import CASCADE, cascade_details
from ssmooth.certify.kinds.job import Job


def _levels_and_models(job: Job):
    if job.experts:
        return list(job.expert_levels), job.experts
    return sorted(float(s) for s in job.grid), job.model


class Cascade:
    name = "cascade"

    def needs(self, job: Job) -> str | None:
        return None if job.grid or job.experts else "a grid of levels or experts"

    def rows(self, job: Job) -> list:
        levels, models = _levels_and_models(job)

        def runner(_model, points, writer, **kw):
            certify_points_cascade(models, points, writer, levels=levels, p0=job.cfg.p0, **kw)

        path = job.main_path(self.name)
        job.produce(path, CASCADE_COLUMNS, self.name, sigma=None, runner=runner)
        return [path]

    def entries(self, job: Job) -> dict:
        levels, _ = _levels_and_models(job)
        rows = job.read(job.main_path(self.name))
        return {self.name: CASCADE.entry(rows, job.radii, p0=float(job.cfg.p0), experts=bool(job.experts),
                                         forward_passes=int(rows["samples"].sum()),
                                         **cascade_details(rows, levels))}
