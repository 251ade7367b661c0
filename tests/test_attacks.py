"""Properties of the SmoothAdv attacks: box and ball, loss ascent on the soft smoothed classifier, step size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssmooth.attacks import SmoothAdvDDN, SmoothAdvPGD
from ssmooth.objectives import soft_smoothed_loss

ATTACKS = {
    "pgd": lambda eps, steps, m: SmoothAdvPGD(eps=eps, steps=steps, num_noise=m),
    "ddn": lambda eps, steps, m: SmoothAdvDDN(eps=eps, steps=steps, num_noise=m),
}


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def linear_case(num_noise: int = 4, seed: int = 0):
    """Identity model on 3 features (the logits are the noisy input), correctly classified points."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor([[0.7, 0.3, 0.4], [0.2, 0.8, 0.5], [0.5, 0.4, 0.9]])
    y = torch.tensor([0, 1, 2])
    sigma = torch.tensor([0.1, 0.25, 0.5])
    noise = torch.randn(3, num_noise, 3, generator=generator)
    return nn.Identity(), x, y, sigma, noise


@pytest.mark.parametrize("name", ["pgd", "ddn"])
@settings(max_examples=15, deadline=None)
@given(eps=st.floats(0.05, 3.0), steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_result_stays_in_box_and_ball(name, eps, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 6, 6, generator=generator).round()  # pixels at 0 and 1: the box binds
    x[0] = torch.rand(1, 6, 6, generator=generator)
    noise = torch.randn(3, 2, 1, 6, 6, generator=generator)
    x_adv = ATTACKS[name](eps, steps, 2)(conv_model(), x, torch.tensor([0, 1, 2]), torch.tensor([0.1, 0.5, 1.0]), noise)
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (l2(x_adv - x) <= eps + 1e-6).all()


@pytest.mark.parametrize("name", ["pgd", "ddn"])
def test_soft_smoothed_loss_increases(name):
    model, x, y, sigma, noise = linear_case()
    x_adv = ATTACKS[name](0.5, 6, 4)(model, x, y, sigma, noise)
    before = soft_smoothed_loss(model, x, y, sigma, noise)
    after = soft_smoothed_loss(model, x_adv, y, sigma, noise)
    assert (after > before + 1e-3).all()


def test_pgd_increases_the_loss_on_a_conv_model():
    model = conv_model()
    torch.manual_seed(1)
    x, noise = torch.rand(4, 1, 6, 6), torch.randn(4, 3, 1, 6, 6)
    y, sigma = torch.tensor([0, 1, 2, 0]), torch.tensor([0.0, 0.12, 0.25, 0.5])
    x_adv = SmoothAdvPGD(eps=0.25, steps=3, num_noise=3)(model, x, y, sigma, noise)
    assert (soft_smoothed_loss(model, x_adv, y, sigma, noise) >= soft_smoothed_loss(model, x, y, sigma, noise)).all()


def test_pgd_ascends_the_log_of_the_mean_softmax():
    # draw 1 is confidently right, draw 2 wrong: the gradients of log(mean p_y) and of mean(log p_y) point
    # in different directions; one PGD step (then projection to the ball) moves exactly along the first
    x = torch.full((1, 3), 0.5, dtype=torch.float64)
    logits = np.array([[3.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    noise = torch.tensor((logits - 0.5)[None], dtype=torch.float64)  # sigma = 1: the identity model sees logits
    y, sigma = torch.tensor([0]), torch.ones(1, dtype=torch.float64)

    x_adv = SmoothAdvPGD(eps=0.1, steps=1, num_noise=2)(nn.Identity(), x, y, sigma, noise)

    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    e_y = np.eye(3)[0]
    grad_log_of_mean = -(p[:, :1] * (e_y - p)).sum(axis=0) / p[:, 0].sum()  # d/dx of -log(mean_j p_jy)
    grad_mean_of_log = -(e_y - p).mean(axis=0)  # d/dx of -mean_j log p_jy
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    assert unit(grad_log_of_mean) @ unit(grad_mean_of_log) < 0.9
    np.testing.assert_allclose((x_adv - x)[0].numpy(), 0.1 * unit(grad_log_of_mean), atol=1e-9)


def test_pgd_step_size_is_two_eps_over_steps():
    attack = SmoothAdvPGD(eps=0.5, steps=2, num_noise=4)
    assert attack.step_size == pytest.approx(0.5)
    attack.eps = 0.2  # warm-up sets eps; the step size follows
    assert attack.step_size == pytest.approx(0.2)

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, z):
            self.seen.append(z.detach().clone())
            return z

    # sigma = 0: the model sees x + delta_t, so the first step's length is visible
    model, x = Recorder(), torch.full((2, 3), 0.5)
    SmoothAdvPGD(eps=0.4, steps=4, num_noise=1)(model, x, torch.tensor([0, 1]), torch.zeros(2), torch.randn(2, 1, 3))
    assert len(model.seen) == 4
    torch.testing.assert_close(l2(model.seen[1] - x), torch.full((2,), 2 * 0.4 / 4))


@pytest.mark.parametrize("name", ["pgd", "ddn"])
def test_eps_zero_returns_x(name):
    model, x, y, sigma, noise = linear_case()
    torch.testing.assert_close(ATTACKS[name](0.0, 3, 4)(model, x, y, sigma, noise), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["pgd", "ddn"])
@pytest.mark.parametrize("training", [True, False])
def test_parameters_grad_and_mode_are_untouched(name, training):
    model = conv_model().train(training)
    x = torch.rand(2, 1, 6, 6)
    ATTACKS[name](0.5, 2, 2)(model, x, torch.tensor([0, 1]), torch.full((2,), 0.25), torch.randn(2, 2, 1, 6, 6))
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == training for m in model.modules())


def test_attacks_draw_their_own_noise_when_none_is_given():
    model, x, y, sigma, _ = linear_case()
    x_adv = SmoothAdvPGD(eps=0.3, steps=2, num_noise=8)(model, x, y, sigma)
    assert (l2(x_adv - x) <= 0.3 + 1e-6).all() and (x_adv != x).any()


def test_no_grad_pgd_runs_forward_only_and_follows_the_gradient():
    class ForwardOnly(nn.Module):
        def forward(self, z):
            assert not torch.is_grad_enabled()
            return z

    _, x, y, sigma, noise = linear_case(num_noise=2048)
    attack = SmoothAdvPGD(eps=0.05, steps=1, num_noise=2048)
    x_cheap = attack(ForwardOnly(), x, y, sigma, noise, no_grad=True)
    x_exact = attack(nn.Identity(), x, y, sigma, noise)
    cosine = torch.nn.functional.cosine_similarity(x_cheap - x, x_exact - x, dim=1)
    assert (cosine > 0.9).all()
    before = soft_smoothed_loss(nn.Identity(), x, y, sigma, noise)
    assert (soft_smoothed_loss(nn.Identity(), x_cheap, y, sigma, noise) > before).all()


def test_ddn_step_sizes_anneal_by_cosine_from_one_to_min():
    sizes = SmoothAdvDDN(eps=1.0, steps=4).step_sizes()
    assert sizes[-1] == pytest.approx(0.01)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < 1.0
    # halfway through the schedule the step is the midpoint of 1 and 0.01
    assert sizes[1] == pytest.approx((1.0 + 0.01) / 2)
    assert SmoothAdvDDN(eps=1.0, steps=1).step_sizes() == pytest.approx([0.01])


def test_ddn_finds_a_small_adversarial_perturbation():
    # two classes, no noise: the decision boundary x0 = x1 is 0.2 / sqrt(2) = 0.14 away from x
    x, y, sigma = torch.tensor([[0.6, 0.4]]), torch.tensor([0]), torch.zeros(1)
    x_adv = SmoothAdvDDN(eps=0.5, steps=10, num_noise=1)(nn.Identity(), x, y, sigma, torch.zeros(1, 1, 2))
    assert x_adv.argmax(1).item() != 0  # the hard vote is wrong at x_adv
    assert 0.2 / 2**0.5 <= l2(x_adv - x).item() < 0.5 - 0.05  # the norm was driven below eps


def test_ddn_returns_x_when_the_vote_is_already_wrong():
    x, y = torch.tensor([[0.4, 0.6]]), torch.tensor([0])
    x_adv = SmoothAdvDDN(eps=0.5, steps=5)(nn.Identity(), x, y, torch.zeros(1), torch.zeros(1, 1, 2))
    torch.testing.assert_close(x_adv, x)


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: SmoothAdvPGD(eps=-0.1, steps=2), "eps.*-0.1"),
        (lambda: SmoothAdvPGD(eps=0.5, steps=0), "steps.*0"),
        (lambda: SmoothAdvPGD(eps=0.5, steps=2, num_noise=0), "num_noise.*0"),
        (lambda: SmoothAdvDDN(eps=-1.0, steps=2), "eps.*-1.0"),
        (lambda: SmoothAdvDDN(eps=0.5, steps=2, gamma=1.5), "gamma.*1.5"),
        (lambda: SmoothAdvDDN(eps=0.5, steps=2, init_norm=0.0), "init_norm.*0.0"),
    ],
)
def test_invalid_parameters_name_the_value(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


def test_eps_set_later_is_validated_too():
    attack = SmoothAdvPGD(eps=0.5, steps=2)
    with pytest.raises(ValueError, match="eps.*-0.25"):
        attack.eps = -0.25


def test_noise_of_the_wrong_shape_is_an_error():
    model, x, y, sigma, _ = linear_case()
    with pytest.raises(ValueError, match="noise"):
        SmoothAdvPGD(eps=0.5, steps=2)(model, x, y, sigma, torch.randn(3, 2, 4))
