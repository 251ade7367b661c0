"""Certificates that hold for any input through a smoothed level selector: the inductive one (one classifier at
the chosen level) and expert routing (the expert of the chosen level), both reporting min(R_s, R_c); and their
level-set forms, certified over every level the selector may pick within the radius."""
from __future__ import annotations

import functools

from ssmooth.certify.inductive import certify_points_inductive
from ssmooth.certify.levelset import certify_points_level_set
from ssmooth.certify.kinds.base import INDUCTIVE, INDUCTIVE_SET, ROUTED, ROUTED_SET, inductive_details
from ssmooth.certify.kinds.job import Job


class Inductive:
    name = "inductive"
    kind = INDUCTIVE
    certify_points = staticmethod(certify_points_inductive)

    def needs(self, job: Job) -> str | None:
        return None if job.selector is not None else "a checkpoint with a level selector (the pipeline's selector stage)"

    def classifier(self, job: Job):
        return job.model

    def rows(self, job: Job) -> list:
        h_e, grid, sigma_e = job.selector
        classifier = self.classifier(job)
        runner = functools.partial(_certify_with, self.certify_points, classifier, selector=h_e, grid=grid,
                                   sigma_e=sigma_e)
        path = job.main_path(self.name)
        job.produce(path, self.kind.columns, self.name, sigma=None, runner=runner)
        return [path]

    def entries(self, job: Job) -> dict:
        _, grid, sigma_e = job.selector
        rows = job.read(job.main_path(self.name))
        return {self.name: self.kind.entry(rows, job.radii, sigma_e=float(sigma_e),
                                           forward_passes=int(rows["samples"].sum()),
                                           **inductive_details(rows, grid))}


class Routed(Inductive):
    name = "routed"
    kind = ROUTED

    def needs(self, job: Job) -> str | None:
        missing = super().needs(job)
        if missing or not job.experts:
            return missing or "experts, one per level of the selector's grid (certify.experts or the pipeline's)"
        _, grid, _ = job.selector
        if sorted(float(s) for s in grid) != sorted(job.expert_levels):
            return f"experts at the selector's grid {sorted(grid)}, got levels {sorted(job.expert_levels)}"
        return None

    def classifier(self, job: Job):
        _, grid, _ = job.selector
        by_level = dict(zip(job.expert_levels, job.experts))
        return [by_level[float(s)] for s in grid]


class InductiveSet(Inductive):
    name = "inductive_set"
    kind = INDUCTIVE_SET
    certify_points = staticmethod(certify_points_level_set)


class RoutedSet(Routed):
    name = "routed_set"
    kind = ROUTED_SET
    certify_points = staticmethod(certify_points_level_set)


def _certify_with(certify_points, classifier, _model, points, writer, **kw):
    """A runner for Job.produce that certifies with ``classifier`` (a model, or experts) whatever model it gets."""
    certify_points(classifier, points, writer, **kw)
