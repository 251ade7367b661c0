"""The level selector h_e of the inductive certificate: a network trained to predict, from a noisy image, the noise
level that sample-wise finetuning chose for it.

Its labels are the per-sample table the finetuning keeps (``SampleWiseSigma.table``, by dataset index), turned
into grid indices; it is trained with Gaussian augmentation at its own level ``sigma_e`` (by default the largest
level of the grid), because certification smooths it at that level. It is saved in the same checkpoint file as
the classifier: weights under ``selector.``, and ``meta["selector"]`` holds its architecture, the grid and sigma_e.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from typing_extensions import override

from ssmooth.lit.module import SmoothingModule
from ssmooth.noise import ConstantSigma
from ssmooth.objectives import GaussianAugmentation

PREFIX = "selector."


def default_selector_model(model_cfg: dict) -> dict:
    """The selector's architecture when none is given: the classifier's family, smaller where the family has a
    size option (half the MLP widths, ResNet-20 for a CIFAR ResNet, half a tiny net's width). LeNet has none, so
    an MNIST selector is a LeNet too."""
    cfg = dict(model_cfg)
    name = cfg.get("name")
    if name == "mlp":
        cfg["hidden"] = [max(8, int(h) // 2) for h in cfg.get("hidden", (256, 256))]
    elif name == "cifar_resnet":
        cfg["depth"] = 20
    elif name == "tiny":
        cfg["width"] = max(2, int(cfg.get("width", 8)) // 2)
    return cfg


def level_targets(table: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """The grid index of every entry of a sample-wise table (long, same shape); raises if an entry is off the grid."""
    levels = torch.tensor([float(s) for s in grid], dtype=table.dtype, device=table.device)
    distance = (table[:, None] - levels[None, :]).abs()
    targets = distance.argmin(dim=1)
    off = distance.gather(1, targets[:, None]).squeeze(1) > 1e-6 * levels.max()
    if bool(off.any()):
        raise ValueError(f"the sigma table holds levels off the grid {list(grid)}: e.g. {table[off][:3].tolist()}")
    return targets


class SelectorModule(SmoothingModule):
    """Trains h_e: cross-entropy of ``h_e(x + sigma_e * eps)`` against the grid index chosen for the sample.

    ``targets`` holds one grid index per dataset index. Fit it with training data only: the test split has class
    labels, not levels, so the inherited validation step does not apply.
    """

    def __init__(self, selector: nn.Module, targets: torch.Tensor, sigma_e: float, num_levels: int, optimizer,
                 scheduler=None, meta: dict | None = None):
        if not sigma_e > 0:
            raise ValueError(f"selector.sigma_e must be > 0, got {sigma_e}")
        super().__init__(model=selector, objective=GaussianAugmentation(), noise=ConstantSigma(sigma_e),
                         optimizer=optimizer, scheduler=scheduler, num_classes=num_levels, meta=meta)
        self.register_buffer("targets", targets.long())

    @override
    def training_step(self, batch, batch_idx):
        x, _, index = batch
        level = self.targets[index.to(self.targets.device)].to(x.device)
        return super().training_step((x, level, index), batch_idx)


def save_with_selector(classifier_ckpt: str | Path, selector: nn.Module, selector_meta: dict,
                       out: str | Path) -> Path:
    """Write ``out``: the classifier's checkpoint with the selector's weights (under ``selector.``) and
    ``meta["selector"]`` added. Written to a temporary file and renamed, so a crash never leaves half a file."""
    ckpt = torch.load(classifier_ckpt, map_location="cpu", weights_only=False)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(PREFIX)}
    ckpt["state_dict"].update({PREFIX + k: v.detach().cpu() for k, v in selector.state_dict().items()})
    ckpt["ssmooth"] = {**ckpt["ssmooth"], "selector": selector_meta}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


def selector_state(state_dict: dict) -> dict:
    """The selector's own weights out of a checkpoint's state_dict (keys under ``selector.``)."""
    return {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}


def load_selector(meta: dict, state_dict: dict, info) -> tuple[nn.Module, list[float], float]:
    """``(h_e, grid, sigma_e)`` from a checkpoint read by ``load_checkpoint``; ValueError if it has no selector."""
    from ssmooth.models import create_model

    if "selector" not in meta:
        raise ValueError("the checkpoint has no level selector (train one with the pipeline's selector stage)")
    sel = meta["selector"]
    options = dict(sel["model"])
    name, normalize = options.pop("name"), options.pop("normalize", True)
    selector = create_model(name, num_classes=len(sel["grid"]), input_shape=info.input_shape,
                            mean=info.mean if normalize else None, std=info.std if normalize else None, **options)
    selector.load_state_dict(selector_state(state_dict))
    return selector, [float(s) for s in sel["grid"]], float(sel["sigma_e"])
