"""Adaptive sample sizes against cases with a known answer: the guarantee, the cap, abstention, the budget."""
import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from ssmooth.certify import ABSTAIN, certify, certify_adaptive, max_certifiable_radius
from ssmooth.certify.adaptive import choose_sample_sizes, default_sizes

# Geometric known-answer cases put points outside [0, 1] on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:x holds values in")


class Threshold(nn.Module):
    """1-D inputs; class 1 when x > 0. At x = m, P(class of sign m) = Phi(|m| / sigma) and the smoothed
    classifier is constant on the ball of radius |m| exactly: the true radius is known."""

    def forward(self, x):
        x = x.flatten(1)[:, :1]
        return torch.cat([-x, x], dim=1)


class Always(nn.Module):
    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, 3] = 1.0
        return out


class Scatter(nn.Module):
    """Ten classes about equally likely under noise: every point should abstain."""

    def forward(self, x):
        cls = (x.flatten(1)[:, 0] * 1000).floor().long() % 10
        return nn.functional.one_hot(cls, 10).float()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_share_of_wrong_certificates_stays_within_the_binomial_bound():
    # Many points with known margins; a certificate is wrong when it names the wrong class or a radius beyond |m|.
    sigma, alpha, num = 1.0, 0.05, 3000
    pA = np.linspace(0.5, 0.995, num)
    margins = torch.tensor(sigma * norm.ppf(pA), dtype=torch.float32)
    margins[::2] *= -1  # both classes
    x = margins[:, None]
    cert = certify_adaptive(Threshold(), x, sigma, n0=50, n=800, alpha=alpha, max_radius_loss=0.3,
                            batch_size=200_000, num_classes=2, generator=gen(1))
    assert len(np.unique(cert.samples.numpy())) >= 4  # sizes really vary from point to point
    truth = (margins > 0).long()
    answered = cert.prediction != ABSTAIN
    wrong = answered & ((cert.prediction != truth) | (cert.radius > margins.abs() + 1e-5))
    assert answered.float().mean() > 0.7
    # Each certificate fails with probability <= alpha, independently: the count is at most Binomial(num, alpha).
    assert int(wrong.sum()) <= binom.ppf(1 - 1e-6, num, alpha)


def test_deterministic_classifier_keeps_every_sample_and_reaches_the_cap():
    n, alpha, sigma = 10_000, 0.001, 0.5
    cert = certify_adaptive(Always(), torch.zeros(3, 1, 4, 4), sigma, n0=100, n=n, alpha=alpha,
                            max_radius_loss=0.05, batch_size=10_000, num_classes=10, generator=gen())
    assert cert.prediction.tolist() == [3, 3, 3]
    assert cert.samples.tolist() == [100 + n] * 3
    assert cert.radius.numpy() == pytest.approx(max_certifiable_radius(n, alpha, sigma), rel=1e-5)


def test_points_bound_to_abstain_take_the_smallest_size():
    n = 4096
    cert = certify_adaptive(Scatter(), torch.rand(20, 1), 1.0, n0=100, n=n, alpha=0.001, max_radius_loss=0.01,
                            batch_size=100_000, num_classes=10, generator=gen())
    assert (cert.prediction == ABSTAIN).all()
    assert cert.samples.tolist() == [100 + min(default_sizes(n))] * 20


def test_mean_radius_loss_stays_within_budget_for_far_fewer_samples():
    # pA = 0.9 everywhere: the radius at n is about sigma * 1.2, and the budget allows a much smaller size.
    sigma, alpha, n, budget, num = 0.5, 0.001, 20_000, 0.05, 300
    x = torch.full((num, 1), sigma * float(norm.ppf(0.9)))
    fixed = certify(Threshold(), x, sigma, n0=100, n=n, alpha=alpha, batch_size=500_000, num_classes=2,
                    generator=gen(2))
    adaptive = certify_adaptive(Threshold(), x, sigma, n0=100, n=n, alpha=alpha, max_radius_loss=budget,
                                batch_size=500_000, num_classes=2, generator=gen(3))
    loss = fixed.radius.double().mean() - adaptive.radius.double().mean()
    spread = ((fixed.radius.double().var() + adaptive.radius.double().var()) / num).sqrt()
    assert loss <= budget + 3 * spread
    assert loss > 0  # fewer samples do cost radius: the comparison has power
    assert adaptive.samples.double().mean() < (100 + n) / 3


def test_size_rule_known_answers():
    sizes = default_sizes(10_000)
    assert sizes[0] == 40 and sizes[-1] == 10_000
    kA = np.array([0, 30, 70, 90, 99, 100])
    chosen = choose_sample_sizes(kA, 100, 0.25, sizes, 0.001, 0.02)
    assert chosen[0] == chosen[1] == 40  # well below 1/2: will abstain
    assert chosen[-1] == 10_000  # all pilot votes agree: only n reaches the cap
    assert list(chosen) == sorted(chosen)  # higher pA, more samples, in this range
    # a larger budget never asks for more samples; a zero budget keeps n wherever the radius could be positive
    looser = choose_sample_sizes(kA, 100, 0.25, sizes, 0.001, 0.08)
    assert (looser <= chosen).all() and looser.sum() < chosen.sum()
    assert (choose_sample_sizes(kA[2:], 100, 0.25, sizes, 0.001, 0.0) == 10_000).all()


def test_points_of_all_sizes_share_forward_batches():
    calls = []

    class Counting(Threshold):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    x = torch.linspace(0.1, 3.0, 40)[:, None]
    cert = certify_adaptive(Counting(), x, 1.0, n0=20, n=1000, alpha=0.01, max_radius_loss=0.05,
                            batch_size=100_000, num_classes=2, generator=gen())
    assert len(np.unique(cert.samples.numpy())) >= 3
    assert len(calls) == 2  # one batch for every pilot, one for every point's estimation draws
    assert sum(calls) == int(cert.samples.sum())


def test_per_point_streams_make_a_point_independent_of_its_group():
    x = torch.linspace(0.1, 3.0, 12)[:, None]
    kw = dict(n0=20, n=2000, alpha=0.01, max_radius_loss=0.05, batch_size=333, num_classes=2, seed=7)
    together = certify_adaptive(Threshold(), x, 1.0, indices=list(range(100, 112)), **kw)
    alone = certify_adaptive(Threshold(), x[5:6], 1.0, indices=[105], **kw)
    assert alone.samples.item() == together.samples[5].item()
    assert alone.count.item() == together.count[5].item()
    assert alone.radius.item() == together.radius[5].item()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_radius_loss=-0.1), "max_radius_loss"),
    (dict(sizes=[10, 5000]), "sample sizes"),
    (dict(pilot_confidence=1.0), "pilot_confidence"),
    (dict(alpha=0.0), "alpha"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    args = dict(n0=10, n=1000, alpha=0.01, max_radius_loss=0.02, batch_size=100, num_classes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        certify_adaptive(Threshold(), torch.zeros(2, 1), 1.0, **args)


def test_certify_model_with_adaptive_sampling_writes_samples_and_counts_forward_passes(tmp_path):
    from ssmooth.certify.results import read_rows
    from ssmooth.certify.runfolder import FingerprintMismatch
    from ssmooth.evaluate import CertifyConfig, certify_model

    # margins from 0.05 to 2: sizes differ from point to point; labels are the true classes
    margins = torch.linspace(0.05, 2.0, 24)
    points = [(torch.tensor([float(m)]), 1, i) for i, m in enumerate(margins)]
    common = dict(n0=50, n=4000, alpha=0.01, batch_size=200_000, radii=[0.0, 0.5], progress=False,
                  channels_last=False)
    fixed = certify_model(Threshold(), points, tmp_path / "fixed", CertifyConfig(**common), num_classes=2,
                          base_sigma=1.0)
    adaptive = certify_model(Threshold(), points, tmp_path / "adaptive",
                             CertifyConfig(**common, sampling="adaptive", max_radius_loss=0.1), num_classes=2,
                             base_sigma=1.0)
    rows = read_rows(tmp_path / "adaptive" / "certify.tsv")
    assert (read_rows(tmp_path / "fixed" / "certify.tsv")["samples"] == 4050).all()
    assert fixed["forward_passes"] == 24 * 4050
    assert adaptive["forward_passes"] == int(rows["samples"].sum()) < fixed["forward_passes"] / 2
    assert rows["samples"].nunique() >= 2 and rows["samples"].max() <= 4050
    assert adaptive["sampling"] == "adaptive" and adaptive["max_radius_loss"] == 0.1
    # fixed and adaptive rows never share a folder: resuming one with the other is refused
    with pytest.raises(FingerprintMismatch, match="sampling"):
        certify_model(Threshold(), points, tmp_path / "fixed",
                      CertifyConfig(**common, sampling="adaptive", max_radius_loss=0.1), num_classes=2, base_sigma=1.0)
    with pytest.raises(ValueError, match="certify.sampling='sometimes'"):
        CertifyConfig(sampling="sometimes").validate()
