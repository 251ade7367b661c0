"""The LightningModule that trains a base classifier under noise: one module for every objective and policy."""
from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
import torchmetrics
from torch import nn
from typing_extensions import override


class SmoothingModule(L.LightningModule):
    """Pretraining (stage A): ``objective(model, x, y, noise(index))`` on every batch.

    ``noise`` is a policy module mapping dataset indices to per-sample levels; it is a submodule so a
    sample-wise table is saved in the checkpoint with the weights. ``meta`` describes how to rebuild the model
    (architecture, normalization, dataset, classes) and travels in every checkpoint, so certifying a checkpoint
    never asks the user to repeat it.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable,
        noise: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        num_classes: int = 10,
        meta: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.objective = objective
        self.noise = noise
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.meta = dict(meta or {})
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @override
    def training_step(self, batch, batch_idx):
        x, y, index = batch
        sigma = self.noise(index)
        out = self.objective(self.model, x, y, sigma, epoch=self.current_epoch)
        self.train_acc(out.logits, y)
        self.log("train/loss", out.loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/sigma_mean", sigma.mean(), on_step=False, on_epoch=True, batch_size=len(y))
        return out.loss

    @override
    def validation_step(self, batch, batch_idx):
        # Accuracy of the base classifier under one draw of noise at the base level: a cheap monitor, not a
        # certificate.
        x, y, index = batch
        sigma = torch.full((len(y),), self.base_sigma, device=x.device)
        noisy = x + torch.randn_like(x) * sigma.view(-1, *[1] * (x.dim() - 1))
        self.val_acc(self.model(noisy), y)
        self.log("val/noisy_acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))

    @property
    def base_sigma(self) -> float:
        return float(self.noise.sigma)

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "epoch"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ssmooth"] = self.meta


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read an ssmooth checkpoint without Lightning: returns (meta, state_dict of the whole module).

    Raises FileNotFoundError / ValueError naming the path when it is missing, unreadable or not ssmooth's.
    """
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        found = checkpoints_in(path)
        holds = f"; it holds {', '.join(found)}" if found else "; it holds no .ckpt file"
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file{holds}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "ssmooth" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} is not an ssmooth checkpoint (no 'ssmooth' metadata)")
    return ckpt["ssmooth"], ckpt["state_dict"]


def checkpoints_in(folder, limit: int = 5) -> list[str]:
    """The ``.ckpt`` files in ``folder``, in its ``checkpoints/`` (a run folder) or in its stages' ``checkpoints/``
    (a pipeline folder), last.ckpt first. Never a deep search: the folder may be large."""
    from pathlib import Path

    found = [p for pattern in ("*.ckpt", "checkpoints/*.ckpt", "*/checkpoints/*.ckpt") for p in Path(folder).glob(pattern)]
    found.sort(key=lambda p: (p.name != "last.ckpt", str(p)))
    names = [str(p) for p in found[:limit]]
    return names + [f"... ({len(found) - limit} more)"] if len(found) > limit else names


def model_state(state_dict: dict) -> dict:
    """The network's own weights out of a SmoothingModule state_dict (keys under ``model.``)."""
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
