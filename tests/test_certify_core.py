"""CERTIFY / PREDICT against cases with a known answer (SPEC section 1)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from ssmooth.certify import ABSTAIN, certify, lower_confidence_bound, max_certifiable_radius, predict, sample_counts

# Geometric known-answer cases put points outside [0, 1] on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:x holds values in")


class Constant(nn.Module):
    """Always predicts ``label``, whatever the noise."""

    def __init__(self, label: int, num_classes: int = 3):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        out = torch.zeros(len(x), self.num_classes)
        out[:, self.label] = 1.0
        return out


class Linear(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: class 1 on the positive side."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32))
        self.b = float(b)

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], dim=1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_deterministic_classifier_gets_the_largest_possible_radius():
    n, alpha, sigma = 1000, 0.001, 0.5
    cert = certify(Constant(2), torch.zeros(4, 1, 3, 3), sigma, n0=10, n=n, alpha=alpha, batch_size=300,
                   num_classes=3, generator=gen())
    assert cert.prediction.tolist() == [2, 2, 2, 2]
    assert cert.count.tolist() == [n] * 4
    np.testing.assert_allclose(cert.pA_lower.numpy(), alpha ** (1 / n), rtol=1e-6)
    np.testing.assert_allclose(cert.radius.numpy(), sigma * norm.ppf(alpha ** (1 / n)), rtol=1e-5)
    assert cert.radius[0].item() == pytest.approx(max_certifiable_radius(n, alpha, sigma), rel=1e-5)


def test_largest_radius_matches_the_spec():
    assert max_certifiable_radius(100_000, 0.001, 1.0) == pytest.approx(3.81, abs=0.01)
    assert max_certifiable_radius(10, 0.001, 1.0) < 0.01


def test_clopper_pearson_bound_has_exact_coverage_at_least_one_minus_alpha():
    # Enumerate every outcome of Bin(n, p): the probability that the bound exceeds the true p must be <= alpha.
    n, alpha = 60, 0.05
    k = np.arange(n + 1)
    bounds = lower_confidence_bound(k, n, alpha)
    assert bounds[0] == 0.0 and np.all(np.diff(bounds) > 0)
    for p in np.linspace(0.01, 0.99, 99):
        failure = binom.pmf(k, n, p)[bounds > p].sum()
        assert failure <= alpha + 1e-12, (p, failure)
    # and it is not vacuous: near some p the failure probability comes close to alpha
    worst = max(binom.pmf(k, n, p)[bounds > p].sum() for p in np.linspace(0.01, 0.99, 981))
    assert worst > 0.6 * alpha


def test_bound_matches_the_statsmodels_formula_at_a_hand_point():
    # nA = n gives alpha ** (1 / n) exactly; nA = n - 1 is below it
    assert lower_confidence_bound(100, 100, 0.01) == pytest.approx(0.01 ** (1 / 100), rel=1e-9)
    assert lower_confidence_bound(99, 100, 0.01) < 0.01 ** (1 / 100)


def test_linear_classifier_radius_is_sound_and_tight():
    # g_sigma of a linear classifier is the same linear classifier, so the true certified radius is the distance
    # to the hyperplane. Cohen's radius may exceed it only when the bound fails: at most alpha of the time.
    torch.manual_seed(0)
    w = torch.tensor([3.0, 4.0])  # ||w|| = 5
    model = Linear(w, b=0.0)
    sigma, alpha, n = 1.0, 0.05, 400
    distance = 0.3  # p_A = Phi(0.3) ~ 0.618: the bound fails often enough to be measured
    x = (w / w.norm() * distance).repeat(600, 1)
    cert = certify(model, x, sigma, n0=50, n=n, alpha=alpha, batch_size=4000, num_classes=2, generator=gen(1))
    certified = cert.prediction == 1
    violations = (certified & (cert.radius > distance)).float().mean().item()
    assert violations <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / len(x))
    # the test has power: a bound without the confidence correction (the point estimate) violates far more
    naive = sigma * norm.ppf(np.clip(cert.count.numpy() / n, 1e-9, 1 - 1e-9))
    assert (naive > distance).mean() > 0.3

    # and with many samples the radius comes close to the true distance
    far = (w / w.norm() * 1.5).repeat(8, 1)
    tight = certify(model, far, sigma, n0=50, n=20_000, alpha=0.001, batch_size=20_000, num_classes=2,
                    generator=gen(2))
    assert (tight.radius <= 1.5).all()
    assert tight.radius.min().item() > 0.85 * 1.5


class FirstCoordinate(nn.Module):
    """Class 1 when the first coordinate is positive: at x = 0 under noise, a fair coin."""

    def forward(self, x):
        s = x.flatten(1)[:, 0]
        return torch.stack([-s, s], dim=1)


def test_fifty_fifty_classifier_abstains():
    x = torch.zeros(5, 4)
    cert = certify(FirstCoordinate(), x, 0.5, n0=100, n=2000, alpha=0.001, batch_size=1000, num_classes=2,
                   generator=gen(3))
    assert (cert.prediction == ABSTAIN).all()
    assert (cert.radius == 0).all()
    labels = predict(FirstCoordinate(), x, 0.5, n=2000, alpha=0.001, batch_size=1000, num_classes=2,
                     generator=gen(4))
    assert (labels == ABSTAIN).all()


def test_predict_with_ten_samples_at_alpha_0001_always_abstains():
    # even a classifier that never changes its mind: the two-sided p-value of 10/10 is 2 / 1024 > 0.001
    labels = predict(Constant(1), torch.zeros(3, 2), 0.25, n=10, alpha=0.001, batch_size=10, num_classes=3)
    assert (labels == ABSTAIN).all()
    labels = predict(Constant(1), torch.zeros(3, 2), 0.25, n=20, alpha=0.001, batch_size=10, num_classes=3)
    assert labels.tolist() == [1, 1, 1]


def test_same_seed_same_result_and_per_point_sigma():
    model = Linear(torch.tensor([1.0, 0.0]), b=0.0)
    x = torch.tensor([[0.2, 0.0], [0.2, 0.0]])
    sigma = torch.tensor([0.1, 2.0])
    a = sample_counts(model, x, sigma, 3000, batch_size=512, num_classes=2, generator=gen(7))
    b = sample_counts(model, x, sigma, 3000, batch_size=512, num_classes=2, generator=gen(7))
    assert torch.equal(a, b)
    assert a.sum(1).tolist() == [3000, 3000]
    # sigma 0.1 at distance 0.2: P(class 1) = Phi(2) = 0.977; sigma 2: Phi(0.1) = 0.54
    p = a[:, 1].double() / 3000
    assert p[0].item() == pytest.approx(norm.cdf(2.0), abs=0.02)
    assert p[1].item() == pytest.approx(norm.cdf(0.1), abs=0.04)


def test_noisy_copies_of_several_points_share_a_forward_batch():
    seen = []

    class Recorder(Constant):
        def forward(self, x):
            seen.append(len(x))
            return super().forward(x)

    sample_counts(Recorder(0), torch.zeros(10, 3), 0.5, 100, batch_size=1000, num_classes=3)
    assert seen == [1000]  # ten points x 100 draws in one forward pass, not ten


def test_noise_is_not_clipped_and_model_mode_is_restored():
    class Range(nn.Module):
        def __init__(self):
            super().__init__()
            self.lo, self.hi = 0.0, 0.0

        def forward(self, x):
            self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
            return torch.zeros(len(x), 2)

    model = Range().train()
    sample_counts(model, torch.full((2, 5), 0.5), 1.0, 200, batch_size=100, num_classes=2, generator=gen())
    assert model.lo < 0 and model.hi > 1
    assert model.training


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        certify(Constant(0), torch.zeros(1, 2), 0.5, n0=1, n=10, alpha=1.5, num_classes=3)
    with pytest.raises(ValueError, match="sigma"):
        certify(Constant(0), torch.zeros(1, 2), -0.5, n0=1, n=10, alpha=0.1, num_classes=3)
    with pytest.raises(ValueError, match="n0"):
        certify(Constant(0), torch.zeros(1, 2), 0.5, n0=0, n=10, alpha=0.1, num_classes=3)


class Recorder(nn.Module):
    """Class 0 always; keeps every input it sees (with x = 0 that is exactly the noise sigma * eps)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], dim=1)


@pytest.mark.parametrize("sigma", [0.7, 0.1])  # float32 rounds 0.7 down and 0.1 up
def test_noise_and_radius_use_one_sigma_and_the_radius_stays_float64(sigma):
    model, n0, n, alpha = Recorder(), 4, 8, 0.1
    cert = certify(model, torch.zeros(1, 1, 2, 3), sigma, n0=n0, n=n, alpha=alpha, batch_size=64, num_classes=2,
                   generator=gen(3))
    g = gen(3)
    eps = [torch.randn(k, 1, 2, 3, generator=g) for k in (n0, n)]
    sigma32 = torch.tensor(sigma, dtype=torch.float32)
    for seen, e in zip(model.seen, eps):
        assert torch.equal(seen, e * sigma32)  # drawn at float32(sigma) ...
    # ... and certified at exactly that value: all n votes agree, so pA_lower = alpha ** (1 / n)
    assert cert.radius.dtype == torch.float64 and cert.pA_lower.dtype == torch.float64
    pA_lower = alpha ** (1 / n)
    assert cert.pA_lower.item() == pytest.approx(pA_lower, rel=1e-12)
    assert cert.radius.item() == float(sigma32) * norm.ppf(cert.pA_lower.item())
    assert cert.radius.item() != float(np.float32(cert.radius.item()))  # no float32 rounding on the way
