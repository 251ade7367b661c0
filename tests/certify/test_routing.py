"""Expert routing: the inductive certificate with one classifier per grid level."""
import pytest
import torch
from torch import nn

from ssmooth.certify.inductive import certify_inductive

GRID = [0.25, 0.5]


class Constant(nn.Module):
    def __init__(self, label: int, num_classes: int):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, z):
        return nn.functional.one_hot(torch.full((len(z),), self.label), self.num_classes).float()


class HalfSpace(nn.Module):
    def forward(self, z):
        return nn.functional.one_hot((z[:, 0] > 0).long(), 2).float()


class LevelBySign(nn.Module):
    """Level 1 where the second coordinate is positive, else level 0: routes points by their position."""

    def forward(self, z):
        return nn.functional.one_hot((z[:, 1] > 0).long(), 2).float()


def test_each_point_goes_to_the_expert_of_its_level():
    x = torch.tensor([[0.0, -3.0], [0.0, 3.0], [0.0, 4.0]])
    cert = certify_inductive([Constant(0, 3), Constant(2, 3)], LevelBySign(), x, GRID, sigma_e=0.5, n0=20, n=500,
                             alpha=0.01, num_classes=3, seed=0, indices=[7, 8, 9])
    assert cert.level.tolist() == [0, 1, 1]
    assert cert.prediction.tolist() == [0, 2, 2]
    assert cert.sigma.tolist() == GRID[:1] + GRID[1:] * 2


def test_experts_that_are_one_model_give_the_single_model_certificate():
    x = torch.tensor([[0.3, -2.0], [-0.4, 2.0], [0.05, 1.0], [1.0, -1.0]])
    options = dict(sigma_e=0.5, n0=20, n=800, alpha=0.001, num_classes=2, seed=3, indices=[0, 1, 2, 3])
    single = certify_inductive(HalfSpace(), LevelBySign(), x, GRID, **options)
    routed = certify_inductive([HalfSpace(), HalfSpace()], LevelBySign(), x, GRID, **options)
    # Per-point streams: routing changes which call certifies a point, never its draws.
    for field in ("prediction", "radius", "sigma", "level", "samples"):
        assert torch.equal(getattr(single, field), getattr(routed, field)), field


def test_one_expert_per_level_is_required():
    with pytest.raises(ValueError, match="3 experts for a grid of 2 levels"):
        certify_inductive([HalfSpace()] * 3, LevelBySign(), torch.zeros(1, 2), GRID, sigma_e=0.5, n0=10, n=100,
                          num_classes=2, seed=0, indices=[0])
