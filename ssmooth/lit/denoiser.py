"""Training a denoiser in front of a frozen classifier (denoised smoothing, Salman et al. 2020).

Objectives, for a noisy input ``x + sigma * eps`` and the denoiser D:
- ``mse``: ``mean (D(x + sigma eps) - x)^2``, a plain denoiser that knows nothing of the classifier;
- ``stability``: ``CE(f(D(x + sigma eps)), f(x))``, the frozen classifier's cross-entropy on the denoised input
  against its OWN label on the clean input (the true label is not needed, so unlabelled data would do);
- ``mse+stability``: MSE for the first ``mse_epochs`` epochs, then stability, the order Salman et al. found best.
Each sample's level is the one level, or one drawn per sample from a grid (per-sample levels).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ssmooth.models.denoisers import DenoisedClassifier
from ssmooth.objectives import ObjectiveOutput

DENOISER_OBJECTIVES = ("mse", "stability", "mse+stability")


def denoiser_loss(model: DenoisedClassifier, x: torch.Tensor, sigma: torch.Tensor, objective: str,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits of the classifier on the denoised inputs)`` for objective ``mse`` or ``stability``."""
    if noise is None:
        noise = torch.randn_like(x)
    noisy = x + sigma.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) * noise
    denoised = model.denoiser(noisy, sigma)
    if objective == "mse":
        with torch.no_grad():
            logits = model.classifier(denoised)
        return F.mse_loss(denoised, x), logits
    if objective == "stability":
        with torch.no_grad():
            target = model.classifier(x).argmax(dim=1)
        logits = model.classifier(denoised)
        return F.cross_entropy(logits, target), logits.detach()
    raise ValueError(f"denoiser objective {objective!r} must be one of {DENOISER_OBJECTIVES}")


def clean_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, epoch: int = 0,
                    noise=None) -> ObjectiveOutput:
    """Cross-entropy on clean inputs (``sigma`` unused): the off-the-shelf classifier denoised smoothing starts
    from, when the recipe trains one itself."""
    logits = model(x)
    return ObjectiveOutput(F.cross_entropy(logits, y), logits.detach())


class DenoiserModule(L.LightningModule):
    """Trains ``model.denoiser`` (a ``DenoisedClassifier``) with ``objective``; the classifier stays frozen.

    ``levels``: one level, or the grid each sample's level is drawn from. ``meta`` travels in the checkpoint.
    """

    def __init__(self, model: DenoisedClassifier, objective: str, levels: Sequence[float],
                 optimizer: Callable[..., torch.optim.Optimizer], mse_epochs: int = 0, meta: dict | None = None):
        super().__init__()
        if objective not in DENOISER_OBJECTIVES:
            raise ValueError(f"denoiser objective {objective!r} must be one of {DENOISER_OBJECTIVES}")
        if not levels or min(levels) <= 0:
            raise ValueError(f"denoiser training levels must be > 0, got {list(levels)}")
        self.model = model
        self.objective = objective
        self.register_buffer("levels", torch.tensor([float(s) for s in levels]))
        self.optimizer_factory = optimizer
        self.mse_epochs = int(mse_epochs)
        self.meta = dict(meta or {})

    def objective_now(self) -> str:
        if self.objective == "mse+stability":
            return "mse" if self.current_epoch < self.mse_epochs else "stability"
        return self.objective

    @override
    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        pick = torch.randint(len(self.levels), (x.shape[0],), device=x.device)
        sigma = self.levels[pick]
        loss, logits = denoiser_loss(self.model, x, sigma, self.objective_now())
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        # The frozen classifier's accuracy on denoised noisy inputs: what denoising buys, one draw per image.
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("train/denoised_acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    @override
    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(params=self.model.denoiser.parameters())

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ssmooth"] = self.meta
