"""Per-sample noise-level selection (SPEC section 3 B and D) on models whose vote probabilities are known."""
import math

import pytest
import torch
from torch import nn

from ssmooth.selection import select_neighbour_levels, select_sigma, sigma_scores

DIM = 4096  # the noise-magnitude estimate ||z|| / sqrt(DIM) is within about 1% of sigma


class NoiseMeter(nn.Module):
    """Reads the noise level off its input (x = 0): P(class 0) = h(sigma_hat), two classes.

    With `threshold` the answer is hard: class 0 below it, class 1 above. Otherwise h(s) = Phi(2 - s), so the
    soft score at level s is s * (2 - s), largest at s = 1; hard votes go to class 0 at every s < 2.
    """

    def __init__(self, threshold=None):
        super().__init__()
        self.threshold = threshold
        self.register_buffer("anchor", torch.zeros(()))  # gives the model a device
        self.batches = []
        self.modes = []

    def forward(self, z):
        self.batches.append(len(z))
        self.modes.append(self.training)
        sigma_hat = z.flatten(1).norm(dim=1) / math.sqrt(z[0].numel())
        if self.threshold is not None:
            p0 = (sigma_hat < self.threshold).double().clamp(1e-6, 1 - 1e-6)
        else:
            p0 = torch.special.ndtr(2 - sigma_hat.double())
        return torch.stack([p0.log(), (1 - p0).log()], dim=1).float()


class AlwaysOne(nn.Module):
    """Confidently predicts class 1 whatever the input."""

    def forward(self, z):
        return torch.tensor([[-10.0, 10.0]]).expand(len(z), 2)


class CentreBand(nn.Module):
    """Class 0 iff |z_0| < 1 (x = 0): p_0(s) = 2 Phi(1/s) - 1, a genuinely random vote."""

    def forward(self, z):
        inside = z.flatten(1)[:, 0].abs() < 1
        return torch.stack([inside.float(), (~inside).float()], dim=1) * 5


def zeros(batch, shape=(1, 64, 64)):
    return torch.zeros(batch, *shape)


def test_soft_and_hard_scores_match_the_analytic_values():
    grid = [0.25, 0.5, 1.0, 1.5, 1.75]
    x = zeros(3)
    soft = sigma_scores(NoiseMeter(), x, grid, num_samples=8, soft=True)
    want = torch.tensor([s * (2 - s) for s in grid], dtype=torch.float64)
    assert soft.shape == (3, len(grid)) and soft.dtype == torch.float64
    torch.testing.assert_close(soft, want.expand(3, -1), atol=0.06, rtol=0)
    assert select_sigma(NoiseMeter(), x, grid, num_samples=8, soft=True).tolist() == [1.0] * 3
    # Hard votes: unanimous for class 0 at every level, so p = 1 is clipped to 1 - 1/(2m) and the largest wins.
    hard = sigma_scores(NoiseMeter(), x, grid, num_samples=8)
    z = torch.special.ndtri(torch.tensor(1 - 1 / 16, dtype=torch.float64))
    torch.testing.assert_close(hard, (torch.tensor(grid, dtype=torch.float64) * z).expand(3, -1))
    assert select_sigma(NoiseMeter(), x, grid, num_samples=8).tolist() == [1.75] * 3


def test_labels_versus_predicted_class():
    grid = [0.25, 0.5, 1.0, 2.0]
    model = NoiseMeter(threshold=0.75)  # class 0 at 0.25 and 0.5, class 1 at 1.0 and 2.0, always unanimous
    x = zeros(4)
    # Test time: the predicted class is right by definition at every level, so the largest level wins.
    assert select_sigma(model, x, grid, num_samples=4).tolist() == [2.0] * 4
    labels = torch.tensor([0, 1, 0, 1])
    assert select_sigma(model, x, grid, num_samples=4, labels=labels).tolist() == [0.5, 2.0, 0.5, 2.0]
    scores = sigma_scores(model, x, grid, num_samples=4, labels=labels)
    assert torch.isinf(scores[0, 2:]).all() and (scores[0, 2:] < 0).all() and torch.isfinite(scores[0, :2]).all()


def test_confidently_wrong_model():
    grid = [0.5, 0.25, 1.0]  # any order; the fallback is the smallest level, not the first
    x = zeros(2, (5,))
    wrong = select_sigma(AlwaysOne(), x, grid, num_samples=3, labels=torch.tensor([0, 0]))
    assert wrong.tolist() == [0.25, 0.25]
    assert torch.isneginf(sigma_scores(AlwaysOne(), x, grid, num_samples=3, labels=torch.tensor([0, 0]))).all()
    # Without labels the (unanimous) prediction counts: largest level.
    assert select_sigma(AlwaysOne(), x, grid, num_samples=3).tolist() == [1.0, 1.0]


def test_random_votes_match_the_analytic_probability_and_seed_reproduces():
    grid = [0.25, 0.5, 1.0, 2.0]
    x = torch.zeros(6, 3)
    labels = torch.zeros(6, dtype=torch.long)
    m = 400
    def seeded(seed):
        return {"num_samples": m, "labels": labels, "generator": torch.Generator().manual_seed(seed)}

    a = sigma_scores(CentreBand(), x, grid, **seeded(7))
    b = sigma_scores(CentreBand(), x, grid, **seeded(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    s = torch.tensor(grid, dtype=torch.float64)
    p = (2 * torch.special.ndtr(1 / s) - 1).clamp(1 / (2 * m), 1 - 1 / (2 * m))
    # p_0(2.0) = 0.38 < 1/2: the model is wrong there.
    assert torch.isneginf(a[:, 3]).all()
    # p = 0.68 at s = 1 with m = 400: standard error of s * Phi^-1(p) is about 0.06.
    torch.testing.assert_close(a[:, 1:3], (s * torch.special.ndtri(p))[1:3].expand(6, -1), atol=0.25, rtol=0)
    picked = select_sigma(CentreBand(), x, grid, **seeded(7))
    assert picked.tolist() == torch.tensor(grid)[a.argmax(dim=1)].tolist()
    other = sigma_scores(CentreBand(), x, grid, **seeded(8))
    assert not torch.equal(a, other)


def test_batches_are_shared_and_bounded_and_mode_restored():
    model = NoiseMeter(threshold=0.75)
    model.train()
    grid, m, batch = [0.25, 1.0, 2.0], 10, 7
    out = select_sigma(model, zeros(5), grid, num_samples=m, batch_size=batch)
    total = len(grid) * 5 * m
    assert sum(model.batches) == total and max(model.batches) <= batch
    assert len(model.batches) == math.ceil(total / batch)  # copies of different points share forward passes
    assert not any(model.modes) and model.training
    assert out.dtype == torch.float32 and out.shape == (5,)
    assert set(out.tolist()) <= {0.25, 1.0, 2.0}
    model.eval()
    select_sigma(model, zeros(1), grid, num_samples=2)
    assert not model.training


def test_values_come_from_the_grid_and_device_follows_x():
    grid = [0.12, 0.3, 0.7]
    out = select_sigma(CentreBand(), torch.rand(9, 2, 2), grid, num_samples=16,
                       generator=torch.Generator().manual_seed(0))
    assert out.device == torch.device("cpu")
    assert set(out.tolist()) <= set(torch.tensor(grid).tolist())
    with pytest.raises(ValueError, match="x holds no point"):  # nothing to choose a level for: a caller's mistake
        select_sigma(CentreBand(), torch.rand(0, 2, 2), grid)


def test_custom_clip():
    grid = [0.5, 1.0]
    x = zeros(1)
    scores = sigma_scores(NoiseMeter(threshold=0.75), x, grid, num_samples=2, clip=(0.1, 0.9))
    z = torch.special.ndtri(torch.tensor(0.9, dtype=torch.float64))
    torch.testing.assert_close(scores, torch.tensor([[0.5 * z, 1.0 * z]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": []}, "empty"),
        ({"grid": [0.25, 0.0]}, r"0\.0"),
        ({"grid": [-0.5, 1.0]}, r"-0\.5"),
        ({"grid": [0.5, float("nan")]}, "nan"),
        ({"num_samples": 0}, "num_samples.*0"),
        ({"batch_size": 0}, "batch_size"),
        ({"clip": (0.5, 0.5)}, "clip"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels"),
    ],
)
def test_validation(kwargs, match):
    args = {"grid": [0.25, 0.5], "num_samples": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        select_sigma(CentreBand(), torch.zeros(2, 3), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_on_gpu_with_a_cpu_generator():
    model = NoiseMeter(threshold=0.75).cuda()
    out = select_sigma(model, zeros(2), [0.25, 1.0], num_samples=4, generator=torch.Generator().manual_seed(0))
    assert out.device == torch.device("cpu") and out.tolist() == [1.0, 1.0]
    again = select_sigma(model, zeros(2).cuda(), [0.25, 1.0], num_samples=4,
                         generator=torch.Generator("cuda").manual_seed(0))
    assert again.device.type == "cuda" and again.tolist() == [1.0, 1.0]


def test_neighbour_step_moves_one_level_towards_the_best_score():
    # Soft scores s * (2 - s): best at s = 1 (grid index 2). Each step moves at most one level towards it.
    grid = [0.25, 0.5, 1.0, 1.5, 1.75]
    x, labels = zeros(5), torch.zeros(5, dtype=torch.long)
    current = torch.tensor([0, 1, 2, 3, 4])
    step = select_neighbour_levels(NoiseMeter(), x, labels, current, grid, num_samples=4, soft=True)
    assert step.tolist() == [1, 2, 2, 2, 3]
    # Confidently wrong at every level: one level down, and the bottom stays.
    wrong = select_neighbour_levels(AlwaysOne(), zeros(3, (5,)), torch.zeros(3, dtype=torch.long),
                                    torch.tensor([0, 2, 4]), grid, num_samples=2)
    assert wrong.tolist() == [0, 1, 3]


def test_neighbour_step_uses_a_given_estimate_of_the_current_level_instead_of_probing_it():
    grid = [0.25, 0.5, 1.0, 1.5, 1.75]
    model = NoiseMeter()
    x, labels = zeros(3), torch.zeros(3, dtype=torch.long)
    current = torch.tensor([2, 2, 0])
    # Made-up votes at the current level of the first and third samples; the second has no estimate (NaN)
    # and is probed; the third sits at the bottom of the grid: one neighbour only.
    estimate = (torch.tensor([0.9999, math.nan, 0.99]), torch.tensor([True, False, True]))
    m = 4
    step = select_neighbour_levels(model, x, labels, current, grid, num_samples=m, soft=True,
                                   current_estimate=estimate, batch_size=1000)
    assert sum(model.batches) == m * (2 + 3 + 1)
    # p is clipped to 1 - 1/(2m) = 0.875 (Phi^-1 = 1.15): the first stays (1.15 beats 0.5 * 1.15 and
    # 1.5 * Phi^-1(0.69) = 0.74); the third moves up (0.25 * 1.15 < 0.5 * 1.15).
    assert step.tolist() == [2, 2, 1]
    # Wrong at the current level by the estimate: the neighbours decide.
    step = select_neighbour_levels(NoiseMeter(), zeros(1), torch.zeros(1, dtype=torch.long), torch.tensor([3]),
                                   grid, num_samples=m, soft=True,
                                   current_estimate=(torch.tensor([0.99]), torch.tensor([False])))
    assert step.tolist() == [2]
