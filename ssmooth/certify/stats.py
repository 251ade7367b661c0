"""The statistics behind CERTIFY and PREDICT (Cohen et al. 2019), all from SciPy."""
from __future__ import annotations

import numpy as np
from scipy.stats import beta, binomtest, norm


def lower_confidence_bound(nA, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from nA successes in n.

    Equals ``proportion_confint(nA, n, alpha=2 * alpha, method="beta")[0]``; 0 when nA == 0.
    """
    nA = np.asarray(nA, dtype=np.float64)
    # beta.ppf is undefined for a = 0; the exact bound there is 0.
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, np.maximum(nA, 1e-300), n - nA + 1)
    return np.where(nA > 0, bound, 0.0)


def radius_from_pA(pA_lower, sigma) -> np.ndarray:
    """Cohen's l2 radius sigma * Phi^-1(pA_lower); meaningful only where pA_lower >= 1/2."""
    return np.asarray(sigma, dtype=np.float64) * norm.ppf(np.asarray(pA_lower, dtype=np.float64))


def max_certifiable_radius(n: int, alpha: float, sigma: float = 1.0) -> float:
    """The largest radius n samples can certify: all n votes agree, pA_lower = alpha ** (1 / n)."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def require_useful_sample_size(n: int, alpha: float, prefix: str = "certify") -> None:
    """Raise ValueError when n samples at alpha cannot certify even 1% of sigma (all votes agreeing): every point
    would abstain or get a useless radius. ``prefix`` names the config keys in the message."""
    largest = max_certifiable_radius(n, alpha, 1.0)
    if largest < 0.01:
        raise ValueError(
            f"{prefix}.n={n} with {prefix}.alpha={alpha} can certify at most {largest:.4f} * sigma (all votes "
            f"agreeing): every point would abstain or get a useless radius; raise {prefix}.n"
        )


def two_sided_pvalue(nA, nB) -> np.ndarray:
    """p-value of the two-sided binomial test nA ~ Bin(nA + nB, 1/2), used by PREDICT."""
    nA = np.atleast_1d(np.asarray(nA, dtype=np.int64))
    nB = np.atleast_1d(np.asarray(nB, dtype=np.int64))
    return np.array([binomtest(int(a), int(a + b), 0.5).pvalue if a + b > 0 else 1.0 for a, b in zip(nA, nB)])


def upper_confidence_bound(count, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from ``count`` successes in n;
    1 when count == n."""
    count = np.asarray(count, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - alpha, count + 1, np.maximum(n - count, 1e-300))
    return np.where(count < n, bound, 1.0)
