"""Known-answer tests for the training objectives (SPEC section 2), values computed by hand with numpy.

The model in most tests is the identity on [B, K] inputs, so the logits of draw j of sample i are exactly
``x_i + sigma_i * noise_ij``: choosing the noise chooses the logits, and the expected loss follows by hand.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn

from ssmooth.attacks import SmoothAdvDDN, SmoothAdvPGD
from ssmooth.objectives import (
    MACER,
    Consistency,
    GaussianAugmentation,
    ObjectiveOutput,
    SmoothAdv,
    soft_smoothed_loss,
)

PHI_INV = NormalDist().inv_cdf


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def noise_giving(logits: np.ndarray, x: np.ndarray, sigma: np.ndarray) -> torch.Tensor:
    """The noise [B, m, K] that makes the identity model output ``logits`` [B, m, K] at x [B, K]."""
    return torch.tensor((logits - x[:, None, :]) / sigma[:, None, None], dtype=torch.float64)


def batch(logits: np.ndarray, sigma: list[float]):
    """x = 0.5 everywhere (inside [0, 1]), float64 tensors and the noise realizing ``logits``."""
    sigma_np = np.array(sigma, dtype=np.float64)
    x_np = np.full((logits.shape[0], logits.shape[2]), 0.5)
    return torch.tensor(x_np), torch.tensor(sigma_np), noise_giving(logits, x_np, sigma_np)


class Recorder(nn.Module):
    """Records every input batch; a fixed linear read-out gives logits for 3 classes."""

    def __init__(self, in_features: int):
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.head = nn.Linear(in_features, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.detach().clone())
        return self.head(z.flatten(1))


class ShiftAttack:
    """A stand-in attack: returns x + 0.1 and records how it was called."""

    def __init__(self, eps: float = 1.0, num_noise: int = 2):
        self.eps, self.num_noise = eps, num_noise
        self.calls: list[dict] = []

    def __call__(self, model, x, y, sigma, noise):
        self.calls.append({"eps": self.eps, "modes": [m.training for m in model.modules()], "noise": noise.clone()})
        return x + 0.1


# --------------------------------------------------------------------------------------------------- Gaussian


def test_gaussian_is_cross_entropy_of_one_noisy_draw():
    logits = np.array([[[2.0, 0.0, 1.0]], [[0.0, 0.3, -1.0]], [[-2.0, 1.0, 4.0]]])
    y = np.array([0, 2, 1])
    x, sigma, noise = batch(logits, [0.25, 1.0, 2.0])

    out = GaussianAugmentation()(nn.Identity(), x, torch.tensor(y), sigma, noise=noise)

    expected = -np.mean(np.log(softmax(logits[:, 0])[np.arange(3), y]))
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(out.logits.numpy(), logits[:, 0], rtol=1e-9)
    assert not out.logits.requires_grad


# --------------------------------------------------------------------------------------------------- SmoothAdv


def test_soft_smoothed_loss_is_log_of_mean_softmax_not_mean_of_log_softmax():
    # one draw confidently right, one confidently wrong: the two candidate losses are far apart
    logits = np.array([[[5.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])
    x, sigma, noise = batch(logits, [0.5])

    loss = soft_smoothed_loss(nn.Identity(), x, torch.tensor([0]), sigma, noise)

    p_y = softmax(logits[0])[:, 0]
    log_of_mean, mean_of_log = -np.log(p_y.mean()), -np.mean(np.log(p_y))
    assert abs(log_of_mean - mean_of_log) > 1.0
    assert loss.item() == pytest.approx(log_of_mean, rel=1e-9)


@pytest.mark.parametrize("multi_noise", [True, False])
def test_smoothadv_trains_on_the_attacked_point_with_the_same_draws(multi_noise):
    logits = np.array([[[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]], [[0.2, 0.1, 0.0], [-1.0, 0.0, 3.0]]])
    y = np.array([0, 2])
    x, sigma, noise = batch(logits, [0.5, 1.0])
    attack = ShiftAttack(num_noise=2)

    out = SmoothAdv(attack, num_noise=2, multi_noise=multi_noise)(nn.Identity(), x, torch.tensor(y), sigma, noise=noise)

    torch.testing.assert_close(attack.calls[0]["noise"], noise)
    shifted = logits + 0.1  # the identity model at x' = x + 0.1 with the same noise
    probs = softmax(shifted)
    if multi_noise:  # cross-entropy over all B * m copies; logits are log of the mean softmax
        expected = -np.mean(np.log(probs[np.arange(2), :, y]))
        expected_logits = np.log(probs.mean(axis=1))
    else:  # only the first draw of each sample
        expected = -np.mean(np.log(probs[np.arange(2), 0, y]))
        expected_logits = shifted[:, 0]
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(out.logits.numpy(), expected_logits, rtol=1e-7, atol=1e-9)


def test_smoothadv_warms_eps_up_linearly():
    attack = ShiftAttack(eps=1.0, num_noise=1)
    objective = SmoothAdv(attack, num_noise=1, warmup_epochs=4)
    x, y, sigma = torch.full((2, 3), 0.5), torch.tensor([0, 1]), torch.full((2,), 0.25)
    for epoch in [0, 1, 3, 9]:
        objective(nn.Identity(), x, y, sigma, epoch=epoch)
    assert [call["eps"] for call in attack.calls] == pytest.approx([0.25, 0.5, 1.0, 1.0])
    assert objective.epsilon(2) == pytest.approx(0.75)


def test_smoothadv_attacks_in_eval_mode_and_restores_each_modules_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))
    model.train()
    model[2].eval()  # a part the caller froze must stay frozen
    attack = ShiftAttack(num_noise=1)

    SmoothAdv(attack, num_noise=1)(model, torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.5))

    assert not any(attack.calls[0]["modes"])
    assert [m.training for m in model] == [True, True, False, True]


def test_smoothadv_attack_forwards_leave_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    objective = SmoothAdv(SmoothAdvPGD(eps=0.5, steps=3, num_noise=2), num_noise=2)

    objective(model, torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.5))

    assert model[1].num_batches_tracked.item() == 1  # the training forward only, not the 3 attack steps


def test_smoothadv_rejects_bad_configurations():
    with pytest.raises(ValueError, match="attack"):
        SmoothAdv(None)
    with pytest.raises(ValueError, match="num_noise"):
        SmoothAdv(SmoothAdvPGD(eps=0.5, steps=2, num_noise=4), num_noise=2)
    with pytest.raises(ValueError, match="no_grad_attack"):
        SmoothAdv(SmoothAdvDDN(eps=0.5, steps=2), no_grad_attack=True)
    with pytest.raises(ValueError, match="warmup_epochs.*0"):
        SmoothAdv(SmoothAdvPGD(eps=0.5, steps=2), warmup_epochs=0)


def test_smoothadv_passes_no_grad_attack_to_the_attack():
    class NoGradCapable(ShiftAttack):
        supports_no_grad = True

        def __call__(self, model, x, y, sigma, noise, **options):
            self.options = options
            return super().__call__(model, x, y, sigma, noise)

    attack = NoGradCapable(num_noise=1)
    SmoothAdv(attack, num_noise=1, no_grad_attack=True)(
        nn.Identity(), torch.full((2, 3), 0.5), torch.tensor([0, 1]), torch.full((2,), 0.25))
    assert attack.options == {"no_grad": True}


# --------------------------------------------------------------------------------------------------- MACER


def test_macer_hinge_keeps_only_correct_samples_with_small_finite_gap():
    lbd, gamma, beta = 12.0, 2.0, 4.0
    logits = np.array([
        [[1.0, 0.0, 0.5], [1.2, 0.1, 0.4], [0.8, 0.0, 0.6]],  # 0: wrong (label 2)
        [[6.0, 0.0, 0.0], [5.5, 0.0, 0.5], [6.5, 0.2, 0.0]],  # 1: right but |d| > gamma
        [[0.3, 0.1, 0.0], [0.1, 0.0, 0.2], [0.4, 0.3, -0.2]],  # 2: right, kept
        [[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0]],  # 3: right only by the beta-sharpened average
    ])
    y = np.array([2, 0, 0, 1])
    sigma = [0.5, 0.25, 1.0, 0.75]
    x, sigma_t, noise = batch(logits, sigma)

    out = MACER(num_noise=3, lbd=lbd, gamma=gamma, beta=beta)(nn.Identity(), x, torch.tensor(y), sigma_t, noise=noise)

    mean_p = softmax(logits).mean(axis=1)
    loss_cls = -np.log(mean_p[np.arange(4), y]).sum()
    sharp = softmax(beta * logits).mean(axis=1)
    gaps, kept = [], []
    for i in range(4):
        p1, p2 = np.sort(sharp[i])[::-1][:2]
        d = PHI_INV(p2) - PHI_INV(p1)
        gaps.append(d)
        if np.argmax(sharp[i]) == y[i] and abs(d) <= gamma:
            kept.append(i)
    # the batch exercises every branch of the hinge
    assert kept == [2, 3]
    assert np.argmax(sharp[0]) != y[0] and abs(gaps[1]) > gamma
    assert np.argmax(mean_p[3]) != y[3]  # sample 3 counts because correctness is judged on the sharpened mean
    loss_rob = sum(sigma[i] / 2 * (gaps[i] + gamma) for i in kept)
    expected = (loss_cls + lbd * loss_rob) / 4

    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(out.logits.numpy(), np.log(mean_p), rtol=1e-7)


def test_macer_robustness_term_uses_each_samples_sigma():
    logits = np.array([[[0.3, 0.1, 0.0], [0.1, 0.0, 0.2]]] * 2)
    y = torch.tensor([0, 0])
    small = MACER(num_noise=2, lbd=1.0)(nn.Identity(), *_xy_sigma_noise(logits, [0.5, 0.5], y))
    mixed = MACER(num_noise=2, lbd=1.0)(nn.Identity(), *_xy_sigma_noise(logits, [0.5, 1.5], y))
    sharp = softmax(16.0 * logits[0]).mean(axis=0)
    p1, p2 = np.sort(sharp)[::-1][:2]
    hinge = PHI_INV(p2) - PHI_INV(p1) + 8.0
    # the second sample's sigma grows by 1.0: the loss grows by 1.0 / 2 * hinge / B
    assert mixed.loss.item() - small.loss.item() == pytest.approx(0.5 * hinge / 2, rel=1e-6)


def _xy_sigma_noise(logits, sigma, y):
    x, sigma_t, noise = batch(logits, sigma)
    return x, y, sigma_t, 0, noise


def test_macer_gradient_stays_finite_when_a_sample_saturates():
    # p1 rounds to exactly 1 in float32 for the first sample: Phi^-1(p1) = inf must not leak into the gradient
    x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.49, 0.48]])
    scale = nn.Parameter(torch.tensor(20.0))

    class Scaled(nn.Module):
        def forward(self, z):
            return scale * z

    out = MACER(num_noise=2)(Scaled(), x, torch.tensor([0, 0]), torch.zeros(2), noise=torch.zeros(2, 2, 3))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(scale.grad) and scale.grad != 0


# --------------------------------------------------------------------------------------------------- Consistency


def test_consistency_is_ce_plus_kl_to_the_mean_plus_entropy_of_the_mean():
    lbd, eta = 10.0, 0.5
    logits = np.array([[[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]], [[0.5, 0.5, 3.0], [1.0, -1.0, 2.0]]])
    y = np.array([0, 2])
    x, sigma, noise = batch(logits, [0.5, 1.0])

    out = Consistency(num_noise=2, lbd=lbd, eta=eta)(nn.Identity(), x, torch.tensor(y), sigma, noise=noise)

    p = softmax(logits)  # [B, m, K]
    p_bar = p.mean(axis=1)
    ce = -np.mean(np.log(p[np.arange(2), :, y]))
    kl = np.mean([[np.sum(p_bar[i] * np.log(p_bar[i] / p[i, j])) for j in range(2)] for i in range(2)])
    entropy = np.mean(-np.sum(p_bar * np.log(p_bar), axis=1))
    assert kl > 0.05 and entropy > 0.05
    assert out.loss.item() == pytest.approx(ce + lbd * kl + eta * entropy, rel=1e-9)
    np.testing.assert_allclose(out.logits.numpy(), np.log(p_bar), rtol=1e-9)


# --------------------------------------------------------------------------------------------------- shared contract


def _objectives():
    return {
        "gaussian": (GaussianAugmentation(), 1),
        "smoothadv": (SmoothAdv(SmoothAdvPGD(eps=0.0, steps=1, num_noise=2), num_noise=2), 2),
        "macer": (MACER(num_noise=3), 3),
        "consistency": (Consistency(num_noise=2), 2),
    }


@pytest.mark.parametrize("name", ["gaussian", "smoothadv", "macer", "consistency"])
def test_noise_scale_is_per_sample_and_copies_go_through_the_network_once(name):
    torch.manual_seed(0)
    objective, draws = _objectives()[name]
    model = Recorder(256)
    x = torch.full((2, 1, 16, 16), 0.5)

    objective(model, x, torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))

    assert len(model.inputs) == 1  # eps = 0 makes the SmoothAdv attack a no-op, leaving the training forward
    seen = model.inputs[0].view(2, draws, 1, 16, 16)
    torch.testing.assert_close(seen[0], x[0].expand(draws, 1, 16, 16), rtol=0, atol=0)
    offsets = seen[1] - x[1]
    assert offsets.mean().abs() < 0.2
    assert offsets.std().item() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("name", ["gaussian", "smoothadv", "macer", "consistency"])
def test_loss_is_differentiable_and_logits_are_detached(name):
    torch.manual_seed(0)
    objective, _ = _objectives()[name]
    model = Recorder(12)
    out = objective(model, torch.rand(4, 12), torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.5))
    out.loss.backward()
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert out.logits.shape == (4, 3) and not out.logits.requires_grad


def test_sigma_must_be_one_level_per_sample():
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sigma"):
        GaussianAugmentation()(nn.Identity(), x, y, torch.tensor(0.5))
    with pytest.raises(ValueError, match="noise"):
        MACER(num_noise=4)(nn.Identity(), x, y, torch.full((2,), 0.5), noise=torch.zeros(2, 3, 3))


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: MACER(num_noise=0), "num_noise.*0"),
        (lambda: MACER(lbd=-1.0), "lbd.*-1.0"),
        (lambda: MACER(gamma=-0.5), "gamma.*-0.5"),
        (lambda: MACER(beta=0.0), "beta.*0.0"),
        (lambda: Consistency(num_noise=1), "num_noise.*1"),
        (lambda: Consistency(lbd=-2.0), "lbd.*-2.0"),
        (lambda: Consistency(eta=-0.1), "eta.*-0.1"),
        (lambda: SmoothAdv(SmoothAdvPGD(eps=0.5, steps=1), num_noise=0), "num_noise.*0"),
    ],
)
def test_invalid_parameters_name_the_value(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()
