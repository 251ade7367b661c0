"""The cascade certificate against cases whose answer is known in closed form."""
import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from ssmooth.certify import ABSTAIN
from ssmooth.certify.cascade import (CASCADE_COLUMNS, alpha_shares, certify_cascade,
                                     certify_points_cascade)
from ssmooth.certify.results import RowWriter
from ssmooth.report import read_rows


class Constant(nn.Module):
    def __init__(self, label: int, num_classes: int = 10):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, self.label] = 1.0
        return logits


class Uniform(nn.Module):
    """Each of ``num_classes`` classes with probability 1 / num_classes under any Gaussian noise: the class is the
    bucket of Phi(noise / sigma) of the first coordinate, for inputs whose first coordinate is 0."""

    def __init__(self, sigma: float, num_classes: int = 10):
        super().__init__()
        self.sigma, self.num_classes = sigma, num_classes

    def forward(self, x):
        u = torch.special.ndtr(x[:, 0] / self.sigma)
        label = (u * self.num_classes).long().clamp(max=self.num_classes - 1)
        return nn.functional.one_hot(label, self.num_classes).float()


class HalfSpace(nn.Module):
    """Class 1 where the first coordinate exceeds ``threshold``, else class 0."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        d = x[:, 0] - self.threshold
        return torch.stack([-d, d], dim=1)


def test_sure_top_level_answers_there():
    alpha, n = 0.001, 1000
    cert = certify_cascade(Constant(3), torch.zeros(4, 5), [0.25, 0.5], n0=20, n=n, alpha=alpha, num_classes=10,
                           generator=torch.Generator().manual_seed(0))
    assert cert.prediction.tolist() == [3] * 4
    assert cert.sigma.tolist() == [0.5] * 4 and cert.stage.tolist() == [0] * 4
    # Every vote agrees: the Clopper-Pearson bound is (alpha share) ** (1 / n); the top level's share is alpha / 4.
    expected = 0.5 * norm.ppf((alpha / 4) ** (1 / n))
    assert torch.allclose(cert.radius, torch.full((4,), expected, dtype=torch.float64), rtol=1e-9)
    assert torch.isinf(cert.radius_abstention).all()
    assert cert.samples.tolist() == [1020] * 4


def test_abstaining_top_level_hands_down_and_caps_the_radius():
    alpha, n, top, low = 0.001, 2000, 1.0, 0.9
    x = torch.zeros(6, 5)
    cert = certify_cascade([Uniform(top), Constant(3)], x, [top, low], n0=50, n=n, alpha=alpha, num_classes=10,
                           generator=torch.Generator().manual_seed(1))
    assert cert.prediction.tolist() == [3] * 6
    assert cert.sigma.tolist() == pytest.approx([low] * 6) and cert.stage.tolist() == [1] * 6
    # The last level takes its whole share alpha / 2 for the lower bound.
    assert torch.allclose(cert.radius_level, torch.full((6,), low * norm.ppf((alpha / 2) ** (1 / n)),
                                                        dtype=torch.float64))
    # Every class of the top level has probability 0.1: its upper bound lies between 0.1 and 0.2 here, so the
    # abstention term sigma_top * (0 - Phi^-1(upper)) lies between these two values.
    assert bool((cert.radius_abstention <= top * -norm.ppf(0.1)).all())
    assert bool((cert.radius_abstention >= top * -norm.ppf(0.2)).all())
    assert torch.equal(cert.radius, torch.minimum(cert.radius_level, cert.radius_abstention))
    assert bool((cert.radius < cert.radius_level).all())  # the cap binds in this case
    assert cert.samples.tolist() == [2 * (50 + n)] * 6


def test_interval_holding_p0_abstains():
    # A point exactly on the half-space's boundary: p = 1/2 at every level, neither above p0 nor surely below.
    cert = certify_cascade(HalfSpace(0.0), torch.zeros(3, 2), [0.5, 0.25], n0=20, n=500, alpha=0.01,
                           num_classes=2, generator=torch.Generator().manual_seed(2))
    assert cert.prediction.tolist() == [ABSTAIN] * 3
    assert cert.radius.tolist() == [0.0] * 3 and cert.sigma.tolist() == [0.0] * 3


def test_shares_add_up_to_alpha():
    for levels in (1, 2, 5):
        shares = alpha_shares(0.001, levels, 10)
        assert sum(lower + 10 * upper for lower, upper in shares) == pytest.approx(0.001)


def _cascade_answer(d, experts, p0):
    """The exact cascade at positions ``d`` along the half-spaces' normal: (class, or -1 where it abstains)."""
    answer = np.full(d.shape, -1)
    open_ = np.ones(d.shape, bool)
    for sigma, threshold in experts:
        p1 = norm.cdf((d - threshold) / sigma)
        top = np.where(p1 > 0.5, 1, 0)
        here = open_ & (np.maximum(p1, 1 - p1) > p0)
        answer[here] = top[here]
        open_ &= ~here
    return answer


@pytest.mark.parametrize("p0", [0.5, 0.8])
def test_over_certification_on_half_spaces_stays_within_the_binomial_bound(p0):
    # Top expert at sigma 1 flips at 1.5, lower expert at 0.25 flips at 0: between them the top level's class 0
    # caps the lower level's answers (the abstention term binds), which a rule without that term gets wrong.
    experts = [(1.0, 1.5), (0.25, 0.0)]
    alpha, points = 0.05, 300
    d = torch.linspace(-3, 3, points)
    x = torch.stack([d, torch.zeros(points)], dim=1)
    cert = certify_cascade([HalfSpace(t) for _, t in experts], x, [s for s, _ in experts], n0=50, n=500,
                           alpha=alpha, p0=p0, num_classes=2, generator=torch.Generator().manual_seed(3))
    scan = np.linspace(-8, 8, 64001)
    truth = _cascade_answer(scan, experts, p0)
    wrong = 0
    for k in range(points):
        c, r = int(cert.prediction[k]), float(cert.radius[k])
        if c == ABSTAIN:
            continue
        ball = np.abs(scan - float(d[k])) < r
        at_x = _cascade_answer(np.array([float(d[k])]), experts, p0)[0]
        wrong += int(at_x != c or bool((truth[ball] != c).any()))
    certified = int((cert.prediction != ABSTAIN).sum())
    assert certified > points // 2
    assert wrong <= binom.ppf(0.999, certified, alpha)


def test_rows_resume_without_duplicates(tmp_path):
    points = [(torch.zeros(5), 3, i) for i in range(6)]
    path = tmp_path / "rows.tsv"
    options = dict(levels=[0.5, 0.25], n0=10, n=200, alpha=0.01, batch_size=100, num_classes=10, seed=4)
    with RowWriter(path, CASCADE_COLUMNS) as writer:
        certify_points_cascade(Constant(3), points[:4], writer, **options)
    with RowWriter(path, CASCADE_COLUMNS) as writer:
        certify_points_cascade(Constant(3), points, writer, **options)
    rows = read_rows(path)
    assert sorted(rows["idx"]) == list(range(6))
    assert (rows["predict"] == 3).all() and (rows["stage"] == 0).all()
    # Per-point streams: a point's row does not depend on which run certified it.
    with RowWriter(tmp_path / "fresh.tsv", CASCADE_COLUMNS) as writer:
        certify_points_cascade(Constant(3), points, writer, **options)
    fresh = read_rows(tmp_path / "fresh.tsv").sort_values("idx")
    assert np.allclose(fresh["radius"].to_numpy(), rows.sort_values("idx")["radius"].to_numpy())


def test_adaptive_cuts_samples_of_sure_points_only():
    x = torch.zeros(2, 5)
    cert = certify_cascade([Uniform(1.0), Constant(3)], x, [1.0, 0.25], n0=100, n=4000, alpha=0.001,
                           num_classes=10, sampling="adaptive", max_radius_loss=0.2,
                           generator=torch.Generator().manual_seed(5))
    assert cert.prediction.tolist() == [3, 3]
    # The top level may hand the points down, so it keeps all n; the sure lower level takes fewer.
    assert bool((cert.samples < 2 * (100 + 4000)).all()) and bool((cert.samples > 100 + 4000).all())


def test_refusals():
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="p0"):
        certify_cascade(Constant(3), x, [0.5], n0=10, n=100, num_classes=10, p0=0.4)
    with pytest.raises(ValueError, match="levels"):
        certify_cascade(Constant(3), x, [0.5, -1.0], n0=10, n=100, num_classes=10)
    with pytest.raises(ValueError, match="2 models for 3 levels"):
        certify_cascade([Constant(3)] * 2, x, [0.5, 0.25, 1.0], n0=10, n=100, num_classes=10)
