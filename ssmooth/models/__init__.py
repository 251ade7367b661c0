"""Model registry: ``create_model(name, num_classes=..., input_shape=..., mean=..., std=...)``.

Every model is ``nn.Sequential(normalize=Normalize(mean, std), body=<network>)`` and maps inputs
``[k, *input_shape]`` in [0,1] to logits ``[k, num_classes]``. Normalization is the FIRST layer because
smoothing adds Gaussian noise in [0,1] pixel space: the certified l2 radius is measured there, so the noise must
reach the network before any rescaling. Keeping mean/std as buffers puts them in every state_dict and checkpoint,
so a saved model cannot be evaluated with the wrong normalization.

A builder registered with ``@register_model("name")`` takes ``num_classes`` and ``input_shape`` and its own
keyword options, and returns the body (without normalization).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder(*, num_classes, input_shape, **options) -> nn.Module`` under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorator


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dimension 1); mean and std are buffers, saved with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be non-empty sequences of equal length, got {mean} and {std}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 2)  # broadcast over the channel dimension of [k, C, ...]
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` with normalization as its first layer.

    ``mean``/``std``: one float per channel (``input_shape[0]``), or both None for no normalization (the layer
    is then the identity, mean 0 and std 1, still stored so that every checkpoint has the same keys).
    ``kwargs`` are the model's own options (``hidden`` for mlp, ``depth`` for cifar_resnet, ...).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or any(s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be positive sizes [C, H, W], got {input_shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    channels = input_shape[0]
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std or neither, got mean={mean}, std={std}")
    if mean is None:
        mean, std = (0.0,) * channels, (1.0,) * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean/std need one value per channel ({channels} for input_shape {input_shape}), got {mean}, {std}"
        )

    builder = MODELS[name]
    options = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"model {name!r} got unknown option(s) {unknown}; it accepts {options}")

    body = builder(num_classes=int(num_classes), input_shape=input_shape, **kwargs)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), body=body))


# Imported last: each module registers its builders with the decorator above.
from ssmooth.models import cifar_resnet, lenet, mlp, resnet50  # noqa: E402,F401

__all__ = ["MODELS", "Normalize", "create_model", "register_model"]
