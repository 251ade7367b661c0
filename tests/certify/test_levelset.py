"""The selector certificate over the set of levels the selector may pick: known answers and its error rate."""
import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from scipy.stats import beta as beta_dist
from torch import nn

from ssmooth.certify.inductive import certify_inductive
from ssmooth.certify.levelset import certify_level_set, entry_radii
from ssmooth.certify.results import read_rows
from ssmooth.data import IndexedDataset
from ssmooth.evaluate import CertifyConfig, certify_model

GRID = [0.25, 0.5, 0.75, 1.0]
# the selectors below put their boundaries far apart in input units; the pixel-range warning is not the point
pytestmark = pytest.mark.filterwarnings("ignore:x holds values")


class Sure(nn.Module):
    """Says ``label`` for every input: its certificate is the largest n samples allow."""

    def __init__(self, label: int, num_classes: int = 3):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, z):
        return nn.functional.one_hot(torch.full((len(z),), self.label), self.num_classes).float()


class Boundary(nn.Module):
    """Level 1 where the first coordinate is above 0.5, else level 2: a selector boundary at z0 = 0.5."""

    def forward(self, z):
        return nn.functional.one_hot(torch.where(z[:, 0] > 0.5, 1, 2), len(GRID)).float()


def largest(level: float, n: int, alpha: float) -> float:
    """Cohen's radius when all n votes agree: level * Phi^-1(alpha ** (1 / n))."""
    return level * norm.ppf(alpha ** (1 / n))


N, ALPHA = 10_000, 0.001
OPTIONS = dict(n0=100, n=N, alpha=ALPHA, num_classes=3, seed=1)


def test_a_point_on_the_selector_boundary_is_certified_where_the_inductive_certificate_abstains():
    x = torch.tensor([[0.5, 0.0]])
    experts = [Sure(0)] * 4
    cert = certify_level_set(experts, Boundary(), x, GRID, 1.0, indices=[0], **OPTIONS)
    inductive = certify_inductive(experts, Boundary(), x, GRID, 1.0, indices=[0], **OPTIONS)
    assert int(inductive.prediction[0]) == -1  # the level itself cannot be certified there
    entry = cert.entry[0].numpy()
    # Levels 1 and 2 share the votes, so both may be picked at once; 0 and 3 got none and enter far out.
    assert entry[1] == 0 and entry[2] < 0.05 and entry[0] > 1.0 and entry[3] == entry[0]
    # Every level entered before the radius, so U holds all four: each certificate ran at alpha / 2 / 4.
    share = ALPHA / 2 / 4
    # the two boundary levels, then level 0 (it enters before their radii); level 3 enters at the same distance,
    # where the radius already stops, so it is never certified
    assert int(cert.certified_levels[0]) == 3
    expected = min(largest(0.5, N, share), largest(0.75, N, share), entry[0])
    assert int(cert.prediction[0]) == 0 and float(cert.radius[0]) == pytest.approx(expected, rel=1e-9)


def test_a_sure_selector_gives_cohens_certificate_of_its_level_at_half_alpha():
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    cert = certify_level_set([Sure(2)] * 4, Boundary(), x, GRID, 1.0, indices=[0, 1], **OPTIONS)
    assert cert.level.tolist() == [1, 2] and cert.certified_levels.tolist() == [1, 1]
    # no other level can enter before the largest radius of the chosen one: U = {top}, the whole alpha / 2
    assert cert.radius.tolist() == pytest.approx([largest(0.5, N, ALPHA / 2), largest(0.75, N, ALPHA / 2)],
                                                 rel=1e-9)
    inductive = certify_inductive([Sure(2)] * 4, Boundary(), x, GRID, 1.0, indices=[0, 1], **OPTIONS)
    assert torch.equal(inductive.radius, cert.radius)


def test_a_level_that_disagrees_caps_the_radius_at_its_entry_or_abstains_when_it_enters_at_once():
    grid = [0.5, 0.75, 1.0]

    class Between(nn.Module):  # level 1 above z0 = 0.5, level 2 below; level 0 is never said
        def forward(self, z):
            return nn.functional.one_hot(torch.where(z[:, 0] > 0.5, 1, 2), len(grid)).float()

    x = torch.tensor([[0.5, 0.0]])

    def run(experts):
        return certify_level_set(experts, Between(), x, grid, 0.5, indices=[0], **OPTIONS)

    agree = run([Sure(0)] * 3)
    r0 = float(agree.entry[0, 0])
    assert 0 < r0 < largest(0.5, N, ALPHA / 6)  # level 0 enters before its own radius, so it binds there
    assert float(agree.radius[0]) == pytest.approx(largest(0.5, N, ALPHA / 6), rel=1e-9)
    # level 0 says another class: the radius stops where level 0 may be picked
    apart = run([Sure(1), Sure(0), Sure(0)])
    assert int(apart.prediction[0]) == 0 and float(apart.radius[0]) == pytest.approx(r0, rel=1e-12)
    # a level that may be picked at once says another class: no certificate
    clash = run([Sure(0), Sure(0), Sure(1)])
    assert int(clash.prediction[0]) == -1 and float(clash.radius[0]) == 0.0


def test_entry_radii_never_overstate_the_distance_to_the_selector_boundary_more_often_than_alpha():
    """A half-space selector at distance d from its boundary: level 1 can win only beyond d, exactly. The entry
    radius of level 1 from n draws must exceed d in at most alpha / 2 of the runs (within a binomial margin);
    a rule without the halving, or with the bounds at the wrong level, fails by far."""
    rng = np.random.default_rng(0)
    sigma_e, d, n, alpha, runs = 1.0, 0.3, 200, 0.2, 40_000
    p_top = norm.cdf(d / sigma_e)
    top = rng.binomial(n, p_top, size=runs)
    votes = np.stack([top, n - top, np.zeros(runs, dtype=int)], axis=1)
    entry = entry_radii(np.zeros(runs, dtype=int), votes, n, alpha, sigma_e)
    over = int((entry[:, 1] > d).sum())
    assert over <= binom.ppf(1 - 1e-6, runs, alpha / 2)
    assert over > 0  # the bounds are not trivially loose: some runs come close to d


def points(num=6):
    images = torch.rand(num, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    return IndexedDataset(images, torch.zeros(num, dtype=torch.long), torch.arange(num))


@pytest.mark.parametrize("name", ["inductive_set", "routed_set"])
def test_the_level_set_kinds_write_their_rows_and_count_every_pass(tmp_path, name):
    class Flat(nn.Module):  # a selector that always says level 1
        def forward(self, z):
            return nn.functional.one_hot(torch.ones(len(z), dtype=torch.long), len(GRID)).float()

    cfg = CertifyConfig(n0=16, n=400, alpha=0.01, batch_size=512, points_per_group=4, progress=False,
                        radii=[0, 0.25], kinds=[name])
    summary = certify_model(Sure(0, 2), points(), tmp_path, cfg, num_classes=2, base_sigma=0.5, grid=GRID,
                            dataset="toy", selector=(Flat(), GRID, 1.0), experts=(GRID, [Sure(0, 2)] * 4))
    entry = summary["variants"][name]
    rows = read_rows(tmp_path / f"certify_{name}.tsv")
    assert summary["main"] == name and entry["sound"] and entry["setting"] == "any input"
    assert entry["forward_passes"] == int(rows["samples"].sum()) and entry["mean_certified_levels"] == 1.0
    assert (rows["radius"] == largest(0.5, 400, 0.005)).all()


class HalfSpace(nn.Module):
    """Class 1 iff z[:, coord] > 0: smoothed at any level it answers [x_coord > 0] with exact radius |x_coord|."""

    def __init__(self, coord: int):
        super().__init__()
        self.coord = coord

    def forward(self, z):
        return nn.functional.one_hot((z[:, self.coord] > 0).long(), 2).float()


def test_the_deployed_classifier_is_wrong_inside_the_radius_at_most_alpha_over_two_of_the_time():
    """Two levels, half-space classifiers whose exact radius is |x_0| at every level, and a half-space selector
    that surely picks each point's level (one certificate per point, at the whole alpha / 2). The votes at that
    level sit where Clopper-Pearson is tight, so the classifier's certificate fails close to alpha / 2 of the
    time: a share taken at alpha, or a selector doubt that went unnoticed, shows."""
    rng = np.random.default_rng(1)
    grid, alpha, n0, n, num_points = [0.25, 0.5], 0.1, 30, 400, 10_000
    counts = np.arange(n // 2 + 1, n + 1)
    bound = beta_dist.ppf(alpha / 2, counts, n - counts + 1)
    p = rng.choice(bound[bound > 0.65] - 2e-4, num_points)
    level = rng.integers(0, 2, num_points)
    label = rng.integers(0, 2, num_points)
    margin = np.where(label == 1, 1, -1) * np.asarray(grid)[level] * norm.ppf(p)
    x = torch.tensor(np.stack([margin, np.where(level == 1, 4.0, -4.0)], axis=1), dtype=torch.float64)
    got = certify_level_set(HalfSpace(0), HalfSpace(1), x, grid, 1.0, n0=n0, n=n, alpha=alpha,
                            batch_size=1_000_000, num_classes=2, generator=torch.Generator().manual_seed(5),
                            selector_generator=torch.Generator().manual_seed(6))
    assert (got.level.numpy() == level).all() and (got.certified_levels.numpy() == 1).all()
    pred, radius = got.prediction.numpy(), got.radius.numpy()
    fails = (pred != -1) & ((pred != label) | (radius > np.abs(margin) + 1e-6))
    assert fails.sum() <= binom.ppf(1 - 1e-6, num_points, alpha / 2)
    assert fails.mean() > 0.6 * alpha / 2
