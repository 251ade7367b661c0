"""l2 attacks on the SOFT smoothed classifier, for SmoothAdv training (Salman et al. 2019).

Both attacks maximize ``-log(mean_j softmax(f(x' + sigma * eps_j))_y)`` over the m draws they are given and are
called as ``attack(model, x, y, sigma, noise)`` with ``noise`` ``[B, m, *shape]`` standard normal (``None``: draw
``num_noise``). They return ``x'`` with ``||x' - x||_2 <= eps`` and ``x'`` in [0, 1], never touch the parameters'
``.grad`` (gradients are taken with ``torch.autograd.grad`` w.r.t. the perturbation only) and never change the
model's train/eval mode: the caller puts the model in eval mode (``SmoothAdv`` does).
The step size is called ``step_size``: ``alpha`` is the certificate's failure probability in this project.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmooth.objectives import check_batch, draw_noise, noisy_logits, smoothed_log_probs, soft_smoothed_loss


def _l2(delta: Tensor) -> Tensor:
    return delta.flatten(1).norm(dim=1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *[1] * (like.dim() - 1))


def _unit(direction: Tensor) -> Tensor:
    """Per-sample l2-normalized direction; a zero direction becomes a random unit one (no NaN, still moves)."""
    norms = _l2(direction)
    flat = norms == 0
    if flat.any():
        direction = direction.clone()
        direction[flat] = torch.randn_like(direction[flat])
        norms = _l2(direction)
    return direction / _per_sample(norms, direction)


def _project(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """Into [0, 1] around x, then into the l2 ball of radius eps (shrinking keeps x + delta in [0, 1])."""
    delta = (x + delta).clamp(0, 1) - x
    norms = _l2(delta)
    return delta * _per_sample((eps / norms.clamp_min(1e-12)).clamp(max=1.0), delta)


def _ascent_gradient(model: nn.Module, x: Tensor, delta: Tensor, y: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = soft_smoothed_loss(model, x + delta, y, sigma, noise).sum()
        (grad,) = torch.autograd.grad(loss, [delta])
    return grad


def _check_common(eps: float, steps: int, num_noise: int) -> None:
    if not steps >= 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not num_noise >= 1:
        raise ValueError(f"num_noise must be >= 1, got {num_noise}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


class _SmoothAdvAttack:
    supports_no_grad = False

    def __init__(self, eps: float, steps: int, num_noise: int):
        _check_common(eps, steps, num_noise)
        self.steps = int(steps)
        self.num_noise = int(num_noise)
        self.eps = eps

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        # settable so that SmoothAdv can warm it up epoch by epoch
        if not value >= 0:
            raise ValueError(f"eps must be >= 0, got {value}")
        self._eps = float(value)

    def _inputs(self, x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        check_batch(x, y, sigma, noise)
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("attack inputs must lie in [0, 1]")
        return x.detach(), (draw_noise(x, self.num_noise) if noise is None else noise.detach())


class SmoothAdvPGD(_SmoothAdvAttack):
    """SmoothAdv PGD: ``steps`` steps of size ``2 * eps / steps`` along the l2-normalized gradient of the soft
    smoothed loss, each followed by projection to [0, 1] and to the eps-ball; starts at x (as the reference).

    ``no_grad=True`` (SmoothAdv's ``no_grad_attack``): the direction is estimated from forward passes only,
    ``-mean_j p_y(x' + sigma * eps_j) * eps_j`` (reference ``_attack_mutlinoise_no_grad``; Stein's lemma gives
    ``grad E[p_y(x + sigma * eps)] = E[eps * p_y(x + sigma * eps)] / sigma``, and the positive factor
    ``1 / sigma`` and the ``1 / p`` of the log vanish in the normalization).
    """

    supports_no_grad = True

    def __init__(self, eps: float, steps: int, num_noise: int = 1):
        super().__init__(eps, steps, num_noise)

    @property
    def step_size(self) -> float:
        return 2 * self.eps / self.steps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor | None = None,
                 *, no_grad: bool = False) -> Tensor:
        x, noise = self._inputs(x, y, sigma, noise)
        if self.eps == 0:
            return x.clone()
        delta = torch.zeros_like(x)
        for _ in range(self.steps):
            if no_grad:
                direction = self._estimated_direction(model, x + delta, y, sigma, noise)
            else:
                direction = _ascent_gradient(model, x, delta, y, sigma, noise)
            delta = _project(delta + self.step_size * _unit(direction), x, self.eps)
        return (x + delta).detach()

    @staticmethod
    @torch.no_grad()
    def _estimated_direction(model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        probs = F.softmax(noisy_logits(model, x, sigma, noise), dim=-1)  # [B, m, K]
        p_y = probs.gather(2, y.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(2)  # [B, m]
        return -(p_y.view(*p_y.shape, *[1] * (x.dim() - 1)) * noise).mean(dim=1)

    def __repr__(self) -> str:
        return f"SmoothAdvPGD(eps={self.eps}, steps={self.steps}, num_noise={self.num_noise})"


class SmoothAdvDDN(_SmoothAdvAttack):
    """SmoothAdv DDN (Rony et al. 2019, "Decoupling Direction and Norm"), on the soft smoothed loss.

    A minimal-norm attack: per sample a norm budget starts at ``init_norm`` (default: eps, which is what the
    reference training script sets every epoch); each step moves along the normalized gradient by a step size
    annealed by a cosine from ``step_size`` to ``min_step_size`` (the reference's SGD lr 1 with
    ``CosineAnnealingLR(eta_min=0.01)``, stepped before each update, so step i uses the schedule at i + 1 and a
    single-step attack moves by ``min_step_size``), then rescales the perturbation to the budget, which shrinks
    by ``(1 - gamma)`` while the smoothed HARD vote over the draws is wrong and grows by ``(1 + gamma)`` while
    it is right (capped at the farthest point of [0, 1]^d). The smallest perturbation seen at which the vote
    was wrong is kept and finally projected to the eps-ball; a sample never misclassified gets x back.
    Unlike the reference, perturbations are not quantized to 256 levels: inputs need not be 8-bit images, and
    rounding could leave the eps-ball and [0, 1].
    """

    def __init__(self, eps: float, steps: int, num_noise: int = 1, gamma: float = 0.05,
                 init_norm: float | None = None, step_size: float = 1.0, min_step_size: float = 0.01):
        super().__init__(eps, steps, num_noise)
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if init_norm is not None and not init_norm > 0:
            raise ValueError(f"init_norm must be > 0 (or None for eps), got {init_norm}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if not 0 <= min_step_size <= step_size:
            raise ValueError(f"min_step_size must be in [0, step_size={step_size}], got {min_step_size}")
        self.gamma = float(gamma)
        self.init_norm = None if init_norm is None else float(init_norm)
        self.step_size = float(step_size)
        self.min_step_size = float(min_step_size)

    def step_sizes(self) -> list[float]:
        """The step size of each of the ``steps`` updates."""
        span = self.step_size - self.min_step_size
        return [self.min_step_size + span * (1 + math.cos(math.pi * (i + 1) / self.steps)) / 2
                for i in range(self.steps)]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor | None = None) -> Tensor:
        x, noise = self._inputs(x, y, sigma, noise)
        if self.eps == 0:
            return x.clone()
        batch = x.shape[0]
        start = self.eps if self.init_norm is None else self.init_norm
        worst_norm = _l2(torch.maximum(x, 1 - x))
        norm = torch.full((batch,), start, device=x.device, dtype=x.dtype)
        delta = torch.zeros_like(x)
        best_l2 = worst_norm.clone()
        best_delta = torch.zeros_like(x)
        for step_size in self.step_sizes():
            delta = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = noisy_logits(model, x + delta, sigma, noise)  # [B, m, K]
                loss = -smoothed_log_probs(logits).gather(1, y[:, None]).sum()
                (grad,) = torch.autograd.grad(loss, [delta])
            delta = delta.detach()
            with torch.no_grad():
                votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(dim=1)  # hard vote over the draws
                is_adv = votes.argmax(-1) != y
                l2 = _l2(delta)
                better = is_adv & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best_delta[better] = delta[better]

                delta = delta + step_size * _unit(grad)
                norm = (norm * (1 - (2 * is_adv.to(x.dtype) - 1) * self.gamma)).minimum(worst_norm)
                delta = delta * _per_sample(norm / _l2(delta).clamp_min(1e-12), delta)
                delta = (x + delta).clamp(0, 1) - x
        return (x + _project(best_delta, x, self.eps)).detach()

    def __repr__(self) -> str:
        return (f"SmoothAdvDDN(eps={self.eps}, steps={self.steps}, num_noise={self.num_noise}, gamma={self.gamma}, "
                f"init_norm={self.init_norm})")
