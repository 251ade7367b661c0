"""Certificate kinds as a registry: each kind owns how its rows are produced and how its summary entry is made.

``certify_model`` (ssmooth/evaluate.py) builds one ``Job`` for a test set and loops over the requested kinds:
first every kind's rows (resumable row files; a part of a distributed run stops there), then every kind's
entries. Adding a kind is one module here with a class that has ``name``, ``needs(job)``, ``rows(job)`` and
``entries(job)``, and one line in ``REGISTRY``; ``cascade.py`` is the smallest complete example.
"""
from __future__ import annotations

from ssmooth.certify.kinds.base import (ALLOCATION_RULES, ANY_INPUT, CASCADE, CHOSEN_ON_EVALUATED, CONSTANT,
                                        CONSTANT_BEST, INDUCTIVE, INDUCTIVE_SET, KINDS, NOT_A_CERTIFICATE, ROUTED,
                                        ROUTED_SET, SAMPLEWISE_RAW, THIS_TEST_SET, CertificateKind, best_constant,
                                        cascade_details, inductive_details, kind, transductive)
from ssmooth.certify.kinds.cascade import Cascade
from ssmooth.certify.kinds.constant import CONSTANT_COLUMNS, Constant, ConstantBest
from ssmooth.certify.kinds.job import Job
from ssmooth.certify.kinds.samplewise import SAMPLEWISE_ROW_COLUMNS, Samplewise
from ssmooth.certify.kinds.selector import Inductive, InductiveSet, Routed, RoutedSet

REGISTRY = {k.name: k for k in (Constant(), ConstantBest(), Samplewise(), Inductive(), Routed(), InductiveSet(),
                                RoutedSet(), Cascade())}
# The main entry of each policy, and the kinds certified when ``certify.kinds`` is not given: the policy's own
# certificate, the constant one at the base level and, where there is a grid, the best single level (the honest
# baseline for any per-sample claim).
MAIN_KIND = {"constant": "constant", "samplewise": "samplewise", "inductive": "inductive", "routed": "routed",
             "cascade": "cascade"}


def default_kinds(policy: str, *, grid: bool, best_constant: bool = True) -> list[str]:
    if policy == "constant":
        return ["constant"]
    chosen = ["constant"] + (["constant_best"] if best_constant else [])
    if policy == "inductive" and grid:
        chosen.append("samplewise")  # the transductive certificates of the same model, on the same points
    return chosen + [MAIN_KIND[policy]]


def requested(names, job: Job) -> list:
    """The registry entries for ``names`` (in order, without repeats); ValueError naming a kind that is unknown
    or that this model cannot certify (e.g. routed without experts)."""
    chosen = []
    for name in names:
        if name not in REGISTRY:
            raise ValueError(f"certify.kinds: unknown kind {name!r}; known: {sorted(REGISTRY)}")
        missing = REGISTRY[name].needs(job)
        if missing:
            raise ValueError(f"certify.kinds: {name} needs {missing}")
        if REGISTRY[name] not in chosen:
            chosen.append(REGISTRY[name])
    return chosen


__all__ = ["ALLOCATION_RULES", "ANY_INPUT", "CASCADE", "CHOSEN_ON_EVALUATED", "CONSTANT", "CONSTANT_BEST",
           "CONSTANT_COLUMNS", "INDUCTIVE", "INDUCTIVE_SET", "KINDS", "MAIN_KIND", "NOT_A_CERTIFICATE", "REGISTRY", "ROUTED", "ROUTED_SET",
           "SAMPLEWISE_RAW", "SAMPLEWISE_ROW_COLUMNS", "THIS_TEST_SET", "CertificateKind", "Job", "best_constant",
           "cascade_details", "default_kinds", "inductive_details", "kind", "requested", "transductive"]
