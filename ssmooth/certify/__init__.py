"""Certification: CERTIFY/PREDICT (core), their statistics, radius allocation across a test set, result rows."""
from ssmooth.certify.adaptive import certify_adaptive
from ssmooth.certify.allocation import AllocationError, allocate, allocate_radii, verify_allocation
from ssmooth.certify.core import ABSTAIN, Certificate, certify, predict, sample_counts
from ssmooth.certify.stats import lower_confidence_bound, max_certifiable_radius

__all__ = [
    "ABSTAIN", "AllocationError", "Certificate", "allocate", "allocate_radii", "certify", "certify_adaptive",
    "lower_confidence_bound", "max_certifiable_radius", "predict", "sample_counts", "verify_allocation",
]
