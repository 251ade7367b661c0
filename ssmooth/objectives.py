"""Training objectives at a per-sample noise level (docs/METHOD.md): Gaussian, SmoothAdv, MACER, Consistency.

Every objective is called as ``objective(model, x, y, sigma, epoch=0, noise=None)`` and returns an
``ObjectiveOutput(loss, logits)``:
- ``sigma`` is a float tensor ``[B]``: each sample is smoothed at its own level (a constant policy fills it);
- ``noise`` is optional ``[B, m, *shape]`` standard-normal draws; ``None`` draws them (tests pass their own);
- ``logits`` ``[B, num_classes]`` (detached) is what training accuracy is measured on. Multi-draw objectives
  return ``log(mean_j softmax(f(x + sigma * eps_j)))``, the log-probabilities of the soft smoothed classifier,
  so that argmax is its prediction.
Noise is added in pixel space and never clipped (the model normalizes in its first layer). The m noisy copies
of a batch go through the network as ONE batch ``[B * m, *shape]``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ObjectiveOutput:
    loss: Tensor  # scalar, differentiable
    logits: Tensor  # [B, num_classes], detached


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: noise draws, noisy forward, the soft smoothed classifier


def draw_noise(x: Tensor, num_noise: int) -> Tensor:
    """``num_noise`` standard-normal draws per sample: ``[B, num_noise, *x.shape[1:]]``."""
    return torch.randn(x.shape[0], num_noise, *x.shape[1:], device=x.device, dtype=x.dtype)


def check_batch(x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor | None = None, num_noise: int | None = None):
    """Shape checks that turn a silent broadcast (a scalar sigma, noise of the wrong size) into an error."""
    batch = x.shape[0]
    if sigma.dim() != 1 or sigma.shape[0] != batch:
        raise ValueError(f"sigma must be a tensor of shape [B] = [{batch}], got {tuple(sigma.shape)}")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape [B] = [{batch}], got {tuple(y.shape)}")
    if noise is not None:
        if noise.dim() != x.dim() + 1 or noise.shape[0] != batch or noise.shape[2:] != x.shape[1:]:
            raise ValueError(f"noise must have shape [B, m, *x.shape[1:]] for x of shape {tuple(x.shape)}, "
                             f"got {tuple(noise.shape)}")
        if num_noise is not None and noise.shape[1] != num_noise:
            raise ValueError(f"noise has {noise.shape[1]} draws per sample, this objective uses num_noise={num_noise}")


def noisy_logits(model: nn.Module, x: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """``f(x_i + sigma_i * noise_ij)`` for all i, j in one forward pass: logits ``[B, m, num_classes]``."""
    batch, num_noise = noise.shape[:2]
    scale = sigma.to(x.dtype).view(batch, 1, *[1] * (x.dim() - 1))
    inputs = (x.unsqueeze(1) + scale * noise).flatten(0, 1)
    return model(inputs).reshape(batch, num_noise, -1)


def smoothed_log_probs(logits: Tensor) -> Tensor:
    """``log(mean_j softmax(logits[:, j]))`` ``[B, K]`` from ``[B, m, K]``: the soft smoothed classifier.

    Computed as a log-sum-exp of log-softmax so that a tiny mean probability does not round to log(0).
    """
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])


def soft_smoothed_loss(model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """Per-sample ``-log(mean_j softmax(f(x + sigma * noise_j))_y)`` ``[B]`` (Salman et al. 2019, eq. (S)).

    The log of the MEAN probability, not the mean of the log-probabilities: the attack targets the smoothed
    classifier, which one confidently-right draw can hold up even when another draw is wrong.
    """
    return -smoothed_log_probs(noisy_logits(model, x, sigma, noise)).gather(1, y[:, None]).squeeze(1)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (BatchNorm uses running statistics and does not update them), then every
    submodule gets back its own previous mode (not ``model.train()``, which would unfreeze frozen parts)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _at_least(name: str, value, minimum) -> None:
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# The objectives


class GaussianAugmentation:
    """Cohen et al. 2019: cross-entropy of ``f(x + sigma * eps)``, one draw per sample per step."""

    num_noise = 1

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int = 0,
                 noise: Tensor | None = None) -> ObjectiveOutput:
        check_batch(x, y, sigma, noise, self.num_noise)
        noise = draw_noise(x, self.num_noise) if noise is None else noise
        logits = noisy_logits(model, x, sigma, noise)[:, 0]
        return ObjectiveOutput(F.cross_entropy(logits, y), logits.detach())

    def __repr__(self) -> str:
        return "GaussianAugmentation()"


class SmoothAdv:
    """Salman et al. 2019: adversarial training of the soft smoothed classifier.

    Per batch: draw m noise vectors per sample; find ``x'`` in the l2 ball of radius ``eps_epoch`` that
    maximizes ``-log(mean_j softmax(f(x' + sigma * eps_j))_y)`` (``attack``, run with the model in eval mode so
    that its forwards leave BatchNorm statistics alone); then train on ``f(x' + sigma * eps_j)`` with the SAME
    draws: cross-entropy over all m copies (``multi_noise=True``) or over the first copy only (``False``).

    ``eps_epoch = eps * min(1, (epoch + 1) / warmup_epochs)``, where ``eps`` is the attack's eps at construction;
    this objective owns the attack's ``eps`` from then on (and DDN's initial norm follows it, as in the
    reference training script). ``warmup_epochs=1`` means no warm-up.

    ``no_grad_attack``: the reference's "cheap trick" (``PGD_L2._attack_mutlinoise_no_grad``): the attack direction
    is estimated from forward passes only, as ``-mean_j p_y(x' + sigma * eps_j) * eps_j`` (Stein's lemma: the
    gradient of the smoothed probability is ``E[eps * p_y(x + sigma * eps)] / sigma``), so no backward pass
    through the network is made. It exists for PGD only (the reference raises NotImplementedError for DDN).

    ``logits``: ``log(mean_j softmax)`` over the m draws at ``x'`` with ``multi_noise``, else the trained copy's.
    Differences from the reference script, on purpose: one objective call handles the whole batch it is given
    (the reference splits each loader batch into m chunks of B/m images so that B images enter each forward),
    and the no-gradient attack is used for any m when asked (the reference silently falls back to gradients
    when m = 1).
    """

    def __init__(self, attack, num_noise: int = 1, warmup_epochs: int = 1, multi_noise: bool = True,
                 no_grad_attack: bool = False):
        if attack is None:
            raise ValueError("SmoothAdv needs an attack (attack=pgd or attack=ddn), got attack=None")
        if not callable(attack):
            raise ValueError(f"SmoothAdv's attack must be callable as attack(model, x, y, sigma, noise), "
                             f"got {attack!r}")
        _at_least("num_noise", num_noise, 1)
        _at_least("warmup_epochs", warmup_epochs, 1)
        attack_draws = getattr(attack, "num_noise", num_noise)
        if attack_draws != num_noise:
            raise ValueError(f"SmoothAdv num_noise={num_noise} but its attack has num_noise={attack_draws}: "
                             "the attack and the training step must use the same draws")
        if no_grad_attack and not getattr(attack, "supports_no_grad", False):
            raise ValueError(f"no_grad_attack=True is only defined for the PGD attack, got {type(attack).__name__}")
        self.attack = attack
        self.eps = float(attack.eps)
        self.num_noise = int(num_noise)
        self.warmup_epochs = int(warmup_epochs)
        self.multi_noise = bool(multi_noise)
        self.no_grad_attack = bool(no_grad_attack)

    def epsilon(self, epoch: int) -> float:
        """The attack radius at ``epoch`` (0-based): linear warm-up reaching ``eps`` at ``epoch = warmup - 1``."""
        return self.eps * min(1.0, (epoch + 1) / self.warmup_epochs)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int = 0,
                 noise: Tensor | None = None) -> ObjectiveOutput:
        check_batch(x, y, sigma, noise, self.num_noise)
        noise = draw_noise(x, self.num_noise) if noise is None else noise
        self.attack.eps = self.epsilon(epoch)
        extra = {"no_grad": True} if self.no_grad_attack else {}
        with eval_mode(model):
            x_adv = self.attack(model, x, y, sigma, noise, **extra).detach()
        if self.multi_noise:
            logits = noisy_logits(model, x_adv, sigma, noise)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(self.num_noise))
            return ObjectiveOutput(loss, smoothed_log_probs(logits.detach()))
        logits = noisy_logits(model, x_adv, sigma, noise[:, :1])[:, 0]
        return ObjectiveOutput(F.cross_entropy(logits, y), logits.detach())

    def __repr__(self) -> str:
        return (f"SmoothAdv(attack={self.attack!r}, num_noise={self.num_noise}, warmup_epochs={self.warmup_epochs}, "
                f"multi_noise={self.multi_noise}, no_grad_attack={self.no_grad_attack})")


class MACER:
    """Zhai et al. 2020: maximize the certified radius of the soft smoothed classifier, attack-free.

    With k draws per sample:
    - ``L_cls = sum_i -log(mean_j softmax(f(x_i + sigma_i eps_ij))_{y_i})``;
    - ``q_i = mean_j softmax(beta * f(x_i + sigma_i eps_ij))``, top two ``p1 >= p2``; a sample is "correct" when
      the top class of ``q_i`` is ``y_i`` (the reference decides correctness on the beta-sharpened average, its
      G_theta, not on the unsharpened one); ``d_i = Phi^-1(p2) - Phi^-1(p1)``;
    - ``L_rob = sum over correct i with finite d_i and |d_i| <= gamma of (sigma_i / 2) * (d_i + gamma)``
      (the hinge: samples already far from the boundary, or saturated to p1 = 1, give no gradient);
    - loss ``(L_cls + lbd * L_rob) / B``. ``logits``: ``log(mean_j softmax)`` (beta = 1).
    """

    def __init__(self, num_noise: int = 16, lbd: float = 12.0, gamma: float = 8.0, beta: float = 16.0):
        _at_least("num_noise", num_noise, 1)
        _at_least("lbd", lbd, 0)
        _at_least("gamma", gamma, 0)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.num_noise, self.lbd, self.gamma, self.beta = int(num_noise), float(lbd), float(gamma), float(beta)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int = 0,
                 noise: Tensor | None = None) -> ObjectiveOutput:
        check_batch(x, y, sigma, noise, self.num_noise)
        noise = draw_noise(x, self.num_noise) if noise is None else noise
        logits = noisy_logits(model, x, sigma, noise)
        if logits.shape[-1] < 2:
            raise ValueError(f"MACER needs at least two classes, got {logits.shape[-1]}")
        log_probs = smoothed_log_probs(logits)
        loss_cls = -log_probs.gather(1, y[:, None]).sum()

        top2, top2_class = F.softmax(self.beta * logits, dim=-1).mean(dim=1).topk(2, dim=-1)
        normal = torch.distributions.Normal(torch.zeros((), device=x.device), torch.ones((), device=x.device))
        with torch.no_grad():
            d = normal.icdf(top2[:, 1]) - normal.icdf(top2[:, 0])
            keep = (top2_class[:, 0] == y) & torch.isfinite(d) & (d.abs() <= self.gamma)
        # Recomputed on the kept rows only: Phi^-1 at p1 = 1 is infinite and its gradient would turn the
        # whole batch's gradient into NaN even behind a mask.
        kept = top2[keep]
        d_kept = normal.icdf(kept[:, 1]) - normal.icdf(kept[:, 0])
        loss_rob = (sigma[keep].to(d_kept.dtype) / 2 * (d_kept + self.gamma)).sum()
        loss = (loss_cls + self.lbd * loss_rob) / x.shape[0]
        return ObjectiveOutput(loss, log_probs.detach())

    def __repr__(self) -> str:
        return f"MACER(num_noise={self.num_noise}, lbd={self.lbd}, gamma={self.gamma}, beta={self.beta})"


class Consistency:
    """Jeong & Shin 2020: consistency regularization of the predictions under noise.

    With m draws, p_j = softmax(f(x + sigma * eps_j)) and p_bar = mean_j p_j:
    loss = CE averaged over the B * m noisy copies
           + lbd * mean_i mean_j KL(p_bar || p_j)
           + eta * mean_i H(p_bar)
    (the reference's default form; its KL keeps the gradient through p_bar, as here). m >= 2, since with one
    draw the KL term is identically zero. ``logits``: ``log(p_bar)``.
    """

    def __init__(self, num_noise: int = 2, lbd: float = 10.0, eta: float = 0.5):
        _at_least("num_noise", num_noise, 2)
        _at_least("lbd", lbd, 0)
        _at_least("eta", eta, 0)
        self.num_noise, self.lbd, self.eta = int(num_noise), float(lbd), float(eta)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int = 0,
                 noise: Tensor | None = None) -> ObjectiveOutput:
        check_batch(x, y, sigma, noise, self.num_noise)
        noise = draw_noise(x, self.num_noise) if noise is None else noise
        logits = noisy_logits(model, x, sigma, noise)
        log_probs = F.log_softmax(logits, dim=-1)  # [B, m, K]
        loss_ce = F.nll_loss(log_probs.flatten(0, 1), y.repeat_interleave(self.num_noise))
        mean_probs = log_probs.exp().mean(dim=1)  # [B, K]
        # clamped like the reference: a probability that underflows to 0 must not give log(0) * 0 = NaN
        log_mean = mean_probs.clamp_min(1e-20).log()
        kl = (mean_probs[:, None] * (log_mean[:, None] - log_probs)).sum(-1).mean()
        entropy = -(mean_probs * log_mean).sum(-1).mean()
        loss = loss_ce + self.lbd * kl + self.eta * entropy
        return ObjectiveOutput(loss, smoothed_log_probs(logits.detach()))

    def __repr__(self) -> str:
        return f"Consistency(num_noise={self.num_noise}, lbd={self.lbd}, eta={self.eta})"
