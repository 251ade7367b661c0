"""The level selector h_e of the inductive certificate: a network that maps a noisy image to a level of the grid.

Two ways to train it (``selector.targets``):
- ``radius`` (the default): on what certifies. For every training image and level s_k, the radius the test-time
  rule would give with the label, ``R_k = s_k * Phi^-1(p_y)`` (0 where p_y <= 1/2), from a few noisy draws per
  level; soft targets ``softmax(R / temperature)``; images with R = 0 at every level are dropped. The loss is soft
  cross-entropy over ``copies`` noisy copies, plus ``consistency`` * KL(mean prediction || each copy's) and
  ``entropy`` * the entropy of the mean prediction, optionally weighted by 1 / q_k (q_k: the share of images
  whose best level is k).
- ``table``: hard cross-entropy on the per-sample table the finetuning kept (``SampleWiseSigma.table``). It
  tends to learn the majority level.
Either way it is trained under Gaussian noise at its own level ``sigma_e`` (by default the base level of the
grid), because certification smooths it at that level. It is saved in the same checkpoint file as the
classifier: weights under ``selector.``, and ``meta["selector"]`` holds its architecture, the grid and sigma_e.
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


def radius_targets(model: nn.Module, dataset, grid: Sequence[float], *, num_samples: int = 100, seed: int = 0,
                   batch_size: int = 1000, cap: float | None = None, points_per_call: int | None = None,
                   progress=None) -> torch.Tensor:
    """``R`` [N, len(grid)] float64: for each item ``(x, y, index)`` of ``dataset`` and each level, the radius
    ``s_k * Phi^-1(p_y)`` from ``num_samples`` draws (0 where the label does not get more than half the votes).

    The draws come from per-image noise streams of their own seed (derived from ``seed``; never the streams
    that certify test points), batched like certification. ``cap`` bounds p_y from above, as CERTIFY can reach
    at most ``alpha ** (1 / n)``; default ``1 - 1 / (2 m)``."""
    from ssmooth.certify.core import _device_of
    from ssmooth.certify.streams import point_seed, point_streams
    from ssmooth.selection import sigma_scores

    target_seed = point_seed(seed, -2, "selector")  # a run seed of its own for training targets
    m, k = int(num_samples), len(grid)
    hi = cap if cap is not None else 1 - 1 / (2 * m)
    clip = (1 / (2 * m), max(hi, 1 - 1 / (2 * m)))
    step = points_per_call or max(1, batch_size // m)
    device = _device_of(model)
    out = []
    for start in range(0, len(dataset), step):
        items = [dataset[i] for i in range(start, min(start + step, len(dataset)))]
        x = torch.stack([item[0] for item in items]).to(device)
        labels = torch.stack([torch.as_tensor(item[1]) for item in items]).to(device)
        streams = point_streams(target_seed, [int(item[2]) for item in items], "level", x.shape[1:], k * m,
                                device=device)
        scores = sigma_scores(model, x, grid, m, labels, batch_size=batch_size, clip=clip, streams=streams)
        out.append(scores.clamp(min=0).cpu())
        if progress is not None:
            progress(len(items))
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.float64)


def soft_targets(radii: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(R / temperature)`` per image; the targets of the radius-trained selector."""
    if not temperature > 0:
        raise ValueError(f"selector.temperature must be > 0, got {temperature}")
    return torch.softmax(radii.double() / temperature, dim=1).float()


def balance_weights(radii: torch.Tensor) -> torch.Tensor:
    """Per image ``1 / q_k`` for its best level k (q_k: the share of images whose best level is k), scaled to
    mean 1, so that a rare best level is not drowned by the majority one."""
    best = radii.argmax(dim=1)
    share = torch.bincount(best, minlength=radii.shape[1]).float() / max(1, len(best))
    weights = 1.0 / share[best]
    return weights / weights.mean()


def selector_radius_targets(classifier: nn.Module, train_set, grid: Sequence[float], size: int, options: dict, *,
                            seed: int, cap: float, batch_size: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Soft targets [size, K] and loss weights [size] by dataset index for the training images (``options``: the
    ``selector.*`` settings), and what to report about them (images kept, best-level shares, cost)."""
    import time

    if options.get("targets", "radius") != "radius":
        raise ValueError(f"selector.targets must be 'radius' or 'table', got {options.get('targets')!r}")
    limit = options.get("target_images")
    if limit is not None and not int(limit) >= 1:
        raise ValueError(f"selector.target_images must be null (all) or >= 1, got {limit}")
    if limit is not None and int(limit) < len(train_set):
        # evenly spread over the training set, the same images on every run
        train_set = train_set.subset(torch.linspace(0, len(train_set) - 1, int(limit)).round().long())
    began = time.perf_counter()
    classifier = classifier.to(device)
    radii = radius_targets(classifier, train_set, grid, num_samples=int(options.get("target_samples", 100)),
                           seed=seed, batch_size=batch_size, cap=cap)
    kept = radii.max(dim=1).values > 0  # images no level certifies teach nothing about levels
    weights = torch.zeros(size)
    chosen = balance_weights(radii[kept]) if options.get("balance", False) and bool(kept.any()) \
        else torch.ones(int(kept.sum()))
    weights[train_set.indices[kept]] = chosen
    targets = torch.zeros(size, len(grid))
    targets[train_set.indices] = soft_targets(radii, float(options.get("temperature", 0.1)))
    best = radii[kept].argmax(dim=1)
    stats = {"images": len(train_set), "kept": int(kept.sum()),
             "best_level_share": {f"{float(s):g}": round(float((best == k).float().mean()), 4) if len(best) else 0.0
                                  for k, s in enumerate(grid)},
             "forward_passes": len(train_set) * len(grid) * int(options.get("target_samples", 100)),
             "wall_time_s": round(time.perf_counter() - began, 2)}
    return targets, weights, stats


class RadiusSelectorModule(SmoothingModule):
    """Trains h_e on soft targets over the grid (``targets`` [N, K] by dataset index, ``weights`` [N]; images with
    weight 0 are skipped): soft cross-entropy on ``copies`` noisy copies at sigma_e, plus ``consistency`` *
    KL(mean prediction || each copy) and ``entropy`` * entropy of the mean prediction."""

    def __init__(self, selector: nn.Module, targets: torch.Tensor, weights: torch.Tensor, sigma_e: float,
                 optimizer, scheduler=None, meta: dict | None = None, copies: int = 2, consistency: float = 0.0,
                 entropy: float = 0.0):
        if not sigma_e > 0:
            raise ValueError(f"selector.sigma_e must be > 0, got {sigma_e}")
        if copies < 1 or consistency < 0 or entropy < 0:
            raise ValueError(f"selector: copies >= 1, consistency >= 0, entropy >= 0; got {copies}, {consistency}, "
                             f"{entropy}")
        super().__init__(model=selector, objective=GaussianAugmentation(), noise=ConstantSigma(sigma_e),
                         optimizer=optimizer, scheduler=scheduler, num_classes=targets.shape[1], meta=meta)
        self.register_buffer("targets", targets.float())
        self.register_buffer("weights", weights.float())
        self.copies, self.consistency, self.entropy = int(copies), float(consistency), float(entropy)

    @override
    def training_step(self, batch, batch_idx):
        x, _, index = batch
        index = index.to(self.targets.device)
        target, weight = self.targets[index].to(x.device), self.weights[index].to(x.device)
        sigma = float(self.noise.sigma)
        noisy = x.repeat(self.copies, *[1] * (x.dim() - 1))
        noisy = noisy + torch.randn_like(noisy) * sigma
        log_p = torch.log_softmax(self.model(noisy), dim=1).view(self.copies, len(x), -1)
        loss = -(target.unsqueeze(0) * log_p).sum(dim=2).mean(dim=0)  # soft cross-entropy, per image
        mean_p = log_p.exp().mean(dim=0)
        log_mean = mean_p.clamp_min(1e-12).log()
        if self.consistency:
            kl = (mean_p.unsqueeze(0) * (log_mean.unsqueeze(0) - log_p)).sum(dim=2).mean(dim=0)
            loss = loss + self.consistency * kl
        if self.entropy:
            loss = loss - self.entropy * (mean_p * log_mean).sum(dim=1)
        loss = (weight * loss).sum() / weight.sum().clamp_min(1e-12)
        self.train_acc(log_p[0], target.argmax(dim=1))
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))
        return loss


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
