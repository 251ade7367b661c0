"""The inductive certificate (smoothed level selector + classifier at the chosen level) on fakes whose exact
radii are known: half-spaces, for which Cohen's bound with the true probability is the true radius."""
import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from ssmooth.certify.core import ABSTAIN, certify
from ssmooth.certify.inductive import certify_inductive, predict_inductive

# Geometric known-answer cases put points outside [0, 1] on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:x holds values in")

GRID = [0.25, 0.5]


class HalfSpace(nn.Module):
    """Class 1 iff z[:, coord] > 0 (two classes). At every sigma the smoothed classifier answers [x_coord > 0], and
    P(vote for it) = Phi(|x_coord| / sigma): the exact radius is |x_coord|, whatever sigma."""

    def __init__(self, coord: int):
        super().__init__()
        self.coord = coord

    def forward(self, z):
        return nn.functional.one_hot((z[:, self.coord] > 0).long(), 2).float()


class ConstantLevel(nn.Module):
    def __init__(self, level: int, num_levels: int = len(GRID)):
        super().__init__()
        self.level, self.num_levels = level, num_levels

    def forward(self, z):
        return nn.functional.one_hot(torch.full((len(z),), self.level), self.num_levels).float()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_a_constant_selector_gives_exactly_cohens_certificate_at_half_alpha():
    x = torch.tensor([[0.3, 0.0], [-0.8, 5.0], [0.02, -1.0], [0.0, 0.0], [2.0, 0.0]])
    alpha, n0, n = 0.001, 50, 2000
    for k, sigma in enumerate(GRID):
        got = certify_inductive(HalfSpace(0), ConstantLevel(k), x, GRID, sigma_e=max(GRID), n0=n0, n=n,
                                alpha=alpha, num_classes=2, generator=gen(1), selector_generator=gen(2))
        cohen = certify(HalfSpace(0), x, sigma, n0=n0, n=n, alpha=alpha / 2, num_classes=2, generator=gen(1))
        # Same draws for the classifier, so the same numbers, and the unanimous selector never binds.
        assert torch.equal(got.prediction, cohen.prediction)
        assert torch.equal(got.radius, cohen.radius)
        assert got.level.tolist() == [k] * len(x) and got.sigma.tolist() == [sigma] * len(x)
        r_s = max(GRID) * norm.ppf((alpha / 2) ** (1 / n))
        torch.testing.assert_close(got.radius_selector, torch.full((len(x),), r_s, dtype=torch.float64))
        assert not bool(got.selector_limits.any())
        assert got.samples.tolist() == [2 * (n0 + n)] * len(x)  # the selector's draws and the classifier's
        assert got.prediction.tolist()[:2] == [1, 0]
        assert got.prediction[3] == ABSTAIN and got.radius[3] == 0  # on the boundary: a tie, abstain


def test_a_selector_near_a_tie_limits_the_radius():
    # Selector margin 0.2 at sigma_e = 1 (p = 0.58): R_s is below 0.2; the classifier's margin 2 gives R_c > 0.5.
    x = torch.tensor([[2.0, 0.2], [2.0, -0.2], [2.0, 0.0]])
    alpha, n = 0.001, 20_000
    got = certify_inductive(HalfSpace(0), HalfSpace(1), x, GRID, sigma_e=1.0, n0=100, n=n, alpha=alpha,
                            num_classes=2, selector_n0=2000, generator=gen(3), selector_generator=gen(4))
    alone = certify(HalfSpace(1), x, 1.0, n0=2000, n=n, alpha=alpha / 2, num_classes=2, generator=gen(4))
    assert got.level.tolist()[:2] == [1, 0] and got.prediction.tolist()[:2] == [1, 1]
    assert got.sigma.tolist()[:2] == [0.5, 0.25]
    assert bool((got.radius_classifier[:2] > 0.5).all())
    # The radius is the selector's own Cohen certificate at alpha / 2, and below its exact radius 0.2.
    torch.testing.assert_close(got.radius[:2], alone.radius[:2])
    assert bool((got.radius[:2] > 0.1).all()) and bool((got.radius[:2] < 0.2).all())
    assert got.selector_limits.tolist() == [True, True, False]
    # A selector exactly at a tie abstains, and so does the deployed classifier, whatever the classifier says.
    assert got.level[2] == ABSTAIN and got.prediction[2] == ABSTAIN and got.radius[2] == 0


def test_over_certification_stays_within_half_alpha_per_part():
    """Points placed where Clopper-Pearson is tight: the true vote probability sits just below the lower bound
    that some vote count gives, so each part fails at a rate just under alpha / 2. A selector bound taken at
    alpha instead of alpha / 2 fails about 8.5% of these points and breaks the per-part limit (checked)."""
    rng = np.random.default_rng(0)
    alpha, n0, n, num_points, sigma_e = 0.1, 30, 400, 10_000, 1.0
    # Vote counts whose one-sided (1 - alpha/2) lower bound is above 1/2; the true p is just below that bound.
    counts = np.arange(n // 2 + 1, n + 1)
    bound = beta.ppf(alpha / 2, counts, n - counts + 1)
    # 2e-4 below: a margin the float32 radius still resolves, and the failure rate stays just under alpha / 2.
    tight = bound[bound > 0.65] - 2e-4
    p_selector = rng.choice(tight, num_points)
    p_classifier = rng.choice(tight, num_points)
    true_level = rng.integers(0, 2, num_points)
    selector_margin = np.where(true_level == 1, 1, -1) * sigma_e * norm.ppf(p_selector)
    sigma_true = np.asarray(GRID)[true_level]
    true_class = rng.integers(0, 2, num_points)
    classifier_margin = np.where(true_class == 1, 1, -1) * sigma_true * norm.ppf(p_classifier)
    x = torch.tensor(np.stack([classifier_margin, selector_margin], axis=1), dtype=torch.float64)

    got = certify_inductive(HalfSpace(0), HalfSpace(1), x, GRID, sigma_e=sigma_e, n0=n0, n=n, alpha=alpha,
                            batch_size=1_000_000, num_classes=2, generator=gen(5), selector_generator=gen(6))
    level, pred = got.level.numpy(), got.prediction.numpy()
    selector_fails = (level != ABSTAIN) & ((level != true_level) |
                                           (got.radius_selector.numpy() > np.abs(selector_margin) + 1e-6))
    # The exact radius of every smoothed half-space is |margin| at any level: the classifier's bound fails when
    # it certifies the wrong class or more than that, whichever level the selector picked.
    classifier_fails = (pred != ABSTAIN) & ((pred != true_class) |
                                            (got.radius_classifier.numpy() > np.abs(classifier_margin) + 1e-6))
    limit = lambda rate: binom.ppf(1 - 1e-6, num_points, rate)  # noqa: E731  (false alarm 1e-6)
    assert selector_fails.sum() <= limit(alpha / 2)
    assert classifier_fails.sum() <= limit(alpha / 2)
    deployed_fails = (pred != ABSTAIN) & ((pred != true_class) |
                                          (got.radius.numpy() > np.abs(classifier_margin) + 1e-6))
    assert (selector_fails | classifier_fails).sum() <= limit(alpha)
    assert deployed_fails.sum() <= limit(alpha)
    # The points are where the bound is tight: each part fails at close to alpha / 2, so a looser bound shows.
    assert selector_fails.mean() > 0.8 * alpha / 2 and classifier_fails.mean() > 0.6 * alpha / 2


def test_predict_inductive_abstains_when_either_part_does():
    x = torch.tensor([[1.5, 1.0], [1.5, 0.0], [0.0, -1.0]])
    labels, levels = predict_inductive(HalfSpace(0), HalfSpace(1), x, GRID, sigma_e=1.0, n=2000, alpha=0.01,
                                       num_classes=2, generator=gen(7), selector_generator=gen(8))
    assert levels.tolist() == [1, ABSTAIN, 0]  # the second point's selector is at a tie
    assert labels.tolist() == [1, ABSTAIN, ABSTAIN]  # the third point's classifier is at a tie


def test_bad_arguments_are_named():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="sigma_e"):
        certify_inductive(HalfSpace(0), HalfSpace(1), x, GRID, sigma_e=0.0, num_classes=2)
    with pytest.raises(ValueError, match="grid"):
        certify_inductive(HalfSpace(0), HalfSpace(1), x, [], sigma_e=1.0, num_classes=2)


def test_rows_resume_without_duplicates_and_with_the_same_numbers(tmp_path):
    from ssmooth.certify.inductive import INDUCTIVE_COLUMNS, certify_points_inductive
    from ssmooth.certify.results import RowWriter, read_rows
    from ssmooth.data import IndexedDataset

    x = torch.tensor([[0.4, 0.3], [-0.5, -0.2], [0.05, 0.6], [0.7, 0.01], [-0.3, 0.4]]).view(5, 1, 1, 2)
    data = IndexedDataset(x, torch.tensor([1, 0, 1, 1, 0]), torch.arange(10, 15))
    run = dict(selector=Flat(HalfSpace(1)), grid=GRID, sigma_e=0.5, n0=20, n=500, alpha=0.01, batch_size=2000,
               num_classes=2, points_per_group=2, seed=3)
    with RowWriter(tmp_path / "all.tsv", INDUCTIVE_COLUMNS) as writer:
        certify_points_inductive(Flat(HalfSpace(0)), data, writer, **run)
    with RowWriter(tmp_path / "resumed.tsv", INDUCTIVE_COLUMNS) as writer:  # killed after the first group
        certify_points_inductive(Flat(HalfSpace(0)), data.subset(slice(0, 2)), writer, **run)
    with RowWriter(tmp_path / "resumed.tsv", INDUCTIVE_COLUMNS) as writer:
        certify_points_inductive(Flat(HalfSpace(0)), data, writer, **run)
    whole, resumed = read_rows(tmp_path / "all.tsv"), read_rows(tmp_path / "resumed.tsv")
    assert resumed["idx"].tolist() == list(range(10, 15))
    assert whole.equals(resumed.drop(columns="time").assign(time=whole["time"])[whole.columns])
    assert (resumed["radius"] <= resumed[["radius_selector", "radius_classifier"]].min(axis=1) + 1e-6).all()


class Flat(nn.Module):
    """Images [k, 1, 1, 2] seen as points [k, 2]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z):
        return self.inner(z.flatten(1))
